"""Code shared word for word between scripts. Each script stands alone, so a function two
scripts need is written in both; the header of each lists, block by block, what it shares and
with which scripts. These tests hold every listed copy identical, so the copies cannot drift."""

import ast
import difflib
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    f
    for f in os.listdir(ROOT)
    if f.endswith(".py") and "Shared word for word" in open(os.path.join(ROOT, f)).read()
)
BLOCK = re.compile(r"(\S[^\[]*?) \[([\w ]+)\]: (.*)")


def listing(script: str) -> dict:
    """The header's listing: {block: (the scripts holding it, this one included, [names])}.
    A block starts on a line indented by 4 spaces; its lines indented by 8 continue it."""
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script)).read()))
    lines = doc.split("Shared word for word")[1].splitlines()[1:]
    entries = []
    for line in lines:
        if not line.strip():
            break
        if line.startswith(" " * 4) and line[4] != " ":
            entries.append(line.strip())
        else:
            assert line.startswith(" " * 8) and entries, f"{script}: can't read '{line}'"
            entries[-1] += " " + line.strip()
    blocks = {}
    for entry in entries:
        match = BLOCK.fullmatch(entry)
        assert match, f"{script}: can't read '{entry}'"
        assert match.group(1) not in blocks, f"{script}: block '{match.group(1)}' listed twice"
        files = frozenset({script, *(f"{name}.py" for name in match.group(2).split())})
        blocks[match.group(1)] = (files, match.group(3).split())
    return blocks


def definitions(script: str) -> dict:
    """{name: source} of the module-level functions, classes and assignments, with decorators."""
    source = open(os.path.join(ROOT, script)).read()
    lines, found = source.splitlines(), {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            targets = [t.elts if isinstance(t, ast.Tuple) else [t] for t in node.targets]
            names = [t.id for ts in targets for t in ts if isinstance(t, ast.Name)]
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for name in names:
            found[name] = "\n".join(lines[start - 1 : node.end_lineno])
    for node in ast.parse(source).body:  # X += ... after X = ... is part of X
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] += "\n" + "\n".join(lines[node.lineno - 1 : node.end_lineno])
    return found


LISTINGS = {script: listing(script) for script in SCRIPTS}
SHARED = {  # (block, name) -> the scripts holding it
    (block, name): files
    for blocks in LISTINGS.values()
    for block, (files, names) in blocks.items()
    for name in names
}


def test_the_scripts_with_shared_code_are_found():
    assert {"cql_pretrain.py", "off2on_finetune.py"} <= set(SCRIPTS)
    assert all(LISTINGS[s] for s in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_listed_names_are_defined(script):
    defined = definitions(script)
    for block, (_, names) in LISTINGS[script].items():
        missing = [name for name in names if name not in defined]
        assert not missing, f"{script}, block '{block}': {missing} not defined at module level"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_named_lists_the_same_block(script):
    for block, (files, names) in LISTINGS[script].items():
        for other in sorted(files - {script}):
            assert other in LISTINGS, f"{script}, block '{block}': {other} lists no shared blocks"
            assert block in LISTINGS[other], (
                f"{script} shares '{block}' with {other}, which doesn't"
            )
            other_files, other_names = LISTINGS[other][block]
            assert other_files == files, (
                f"'{block}': {script} names {sorted(files)}, {other} {sorted(other_files)}"
            )
            assert other_names == names, f"'{block}': {script} lists {names}, {other} {other_names}"


@pytest.mark.parametrize("block, name", sorted(SHARED), ids=lambda x: x.replace(" ", "_"))
def test_shared_code_is_identical(block, name):
    files = sorted(SHARED[block, name])
    sources = {f: definitions(f)[name] for f in files}
    for other in files[1:]:
        before, after = sources[files[0]].splitlines(), sources[other].splitlines()
        diff = "\n".join(difflib.unified_diff(before, after, files[0], other, lineterm=""))
        assert before == after, f"'{name}' differs between {files[0]} and {other}:\n{diff}"


def test_a_changed_character_in_a_copy_is_seen(tmp_path, monkeypatch):
    original = definitions("cql_pretrain.py")["VectorizedLinear"]
    source = open(os.path.join(ROOT, "cql_pretrain.py")).read()
    (tmp_path / "cql_pretrain.py").write_text(
        source.replace("-bound, bound)", "-bound, bound )", 1)
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert definitions("cql_pretrain.py")["VectorizedLinear"] != original
