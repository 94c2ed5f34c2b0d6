"""End-to-end runs of cql_pretrain.py on a tiny generated dataset: checkpoint, logs, resume,
errors."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--env-id",
    "halfcheetah-random-v2",
    "--random-dataset-size",
    "3000",
    "--ensemble-size",
    "2",
    "--hidden-sizes",
    "32",
    "32",
    "--batch-size",
    "16",
    "--cql-n-actions",
    "2",
    "--bc-steps",
    "5",
    "--log-every",
    "5",
    "--eval-every",
    "10",
    "--eval-episodes",
    "1",
    "--save-every",
    "5",
    "--no-cuda",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("run")


def run(workdir, *extra, minari_dir=None):
    env = {
        **os.environ,
        "MINARI_DATASETS_PATH": str(minari_dir or workdir / "minari"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "cql_pretrain.py"), *TINY, *extra],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def params(path):
    checkpoint = torch.load(path, weights_only=True)
    return {
        f"{part}.{k}": v
        for part in ("actor", "qf", "qf_target")
        for k, v in checkpoint[part].items()
    } | {"log_alpha": checkpoint["log_alpha"]}


def test_run_writes_checkpoint_and_logs(workdir):
    out = run(workdir, "--total-steps", "20", "--checkpoint-path", "a.pt")
    assert out.returncode == 0, out.stderr
    assert "eval step 20" in out.stdout and "normalized" in out.stdout
    # HalfCheetah without MuJoCo 4's settotalmass deprecation warning (make_env)
    assert "settotalmass" not in out.stdout + out.stderr
    assert not (workdir / "MUJOCO_LOG.TXT").exists()
    checkpoint = torch.load(workdir / "a.pt", weights_only=True)
    meta = checkpoint["metadata"]
    sizes = (meta["obs_dim"], meta["action_dim"], meta["hidden_sizes"], meta["ensemble_size"])
    assert sizes == (17, 6, [32, 32], 2)
    assert meta["dataset_id"] == "halfcheetah-random-v2" and meta["env_id"] == "HalfCheetah-v5"
    assert checkpoint["format_version"] == 1 and checkpoint["global_step"] == 20
    assert checkpoint["actor"]["net.0.weight"].shape == (2, 17, 32)
    assert checkpoint["qf"]["net.0.weight"].shape == (4, 23, 32)  # two critics per agent
    assert checkpoint["log_alpha"].shape == (2,)
    assert all(torch.isfinite(v).all() for v in params(workdir / "a.pt").values())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (workdir / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "eval/normalized_score",
        "eval/return",
        "eval/member0_normalized_score",
        "eval/member1_normalized_score",
        "losses/qf_loss",
        "losses/cql_loss",
        "losses/actor_loss",
        "losses/alpha",
        "charts/SPS",
    } <= tags
    assert [e.step for e in events.Scalars("losses/qf_loss")] == [5, 10, 15, 20]


def test_resume_matches_uninterrupted_run(workdir):
    straight = run(workdir, "--total-steps", "20", "--checkpoint-path", "straight.pt")
    first = run(workdir, "--total-steps", "10", "--checkpoint-path", "resumed.pt")
    second = run(workdir, "--total-steps", "20", "--checkpoint-path", "resumed.pt", "--resume")
    for out in (straight, first, second):
        assert out.returncode == 0, out.stderr
    assert "Resuming resumed.pt at step 10" in second.stdout
    a, b = params(workdir / "straight.pt"), params(workdir / "resumed.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert torch.load(workdir / "resumed.pt", weights_only=True)["global_step"] == 20


def test_existing_checkpoint_is_not_overwritten_without_resume(workdir):
    out = run(workdir, "--total-steps", "5", "--checkpoint-path", "exists.pt")
    assert out.returncode == 0, out.stderr
    before = (workdir / "exists.pt").stat().st_mtime_ns
    out = run(workdir, "--total-steps", "5", "--checkpoint-path", "exists.pt")
    assert out.returncode != 0 and "--resume" in out.stderr and "Traceback" not in out.stderr
    assert (workdir / "exists.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "change, named",
    [
        (["--hidden-sizes", "64", "64"], "hidden_sizes"),
        (["--ensemble-size", "3"], "ensemble_size"),
        (["--env-id", "hopper-random-v2"], "dataset_id"),
        (["--cql-alpha", "10"], "cql_alpha"),
    ],
)
def test_mismatched_checkpoint_fails_clearly(workdir, change, named):
    if not (workdir / "base.pt").exists():
        assert run(workdir, "--total-steps", "5", "--checkpoint-path", "base.pt").returncode == 0
    out = run(workdir, "--total-steps", "10", "--checkpoint-path", "base.pt", "--resume", *change)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in out.stderr
    assert named in out.stderr and "base.pt" in out.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(workdir):
    # lr 1e20: the first update is finite and saved (save every step), the next one overflows
    flags = ["--total-steps", "10", "--q-lr", "1e20", "--save-every", "1", "--log-every", "1"]
    out = run(workdir, *flags, "--checkpoint-path", "nan.pt")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "non-finite loss at step 2" in out.stderr
    checkpoint = torch.load(workdir / "nan.pt", weights_only=True)
    assert checkpoint["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in params(workdir / "nan.pt").values())


def test_dataset_only_makes_the_dataset_and_nothing_else(tmp_path):
    out = run(tmp_path, "--dataset-only", "--checkpoint-path", "x.pt", minari_dir=tmp_path / "m")
    assert out.returncode == 0, out.stderr
    assert "Generating off2on/halfcheetah/random-n3000-v0" in out.stdout
    assert "halfcheetah-random-v2: 3,000 transitions, env HalfCheetah-v5" in out.stdout
    assert (tmp_path / "m" / "off2on" / "halfcheetah" / "random-n3000-v0").is_dir()
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "runs").exists()
    again = run(tmp_path, "--dataset-only", minari_dir=tmp_path / "m")  # made once
    assert again.returncode == 0 and "Generating" not in again.stdout


def test_a_finished_run_resumed_says_so_and_leaves_its_logs(workdir):
    out = run(workdir, "--total-steps", "10", "--checkpoint-path", "done.pt", "--exp-name", "done")
    assert out.returncode == 0, out.stderr
    before = sorted(workdir.glob("runs/*__done__*/*"))
    again = run(workdir, "--total-steps", "10", "--checkpoint-path", "done.pt", "--resume")
    assert again.returncode == 0, again.stderr
    assert "done.pt is complete (10 steps): nothing to resume" in again.stdout
    assert sorted(workdir.glob("runs/*__done__*/*")) == before and len(before) == 1


def test_a_dataset_path_that_is_not_hdf5_is_one_error_line(workdir):
    (workdir / "notes.txt").write_text("not a D4RL file\n")
    out = run(workdir, "--dataset-path", "notes.txt", "--checkpoint-path", "never.pt")
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: --dataset-path notes.txt is not an HDF5 file")
    assert "observations, actions, rewards, terminals, timeouts" in lines[0]
