"""benchmark.py: the sweep launcher (local pool and submitit's local executor, skip, resume,
failure), the numbers behind its figures and tables, and rliable's IQM.

The top-level benchmark.py is imported by path: tests/benchmark.py is the speed benchmark."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("sweep_tool", os.path.join(ROOT, "benchmark.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

ENV = "halfcheetah-random-v2"
EPOCHS = 3  # of 100 online steps each
TINY = (
    f"--random-dataset-size 2000 --hidden-sizes 16 16 --batch-size 32 --offline-steps 10 "
    f"--bc-steps 5 --cql-n-actions 2 --total-timesteps {EPOCHS * 100} --epoch-length 100 "
    "--first-epoch-multiplier 1 --eval-episodes 1 --auroc-every 1 --auroc-samples 50 "
    "--save-every 1 --no-cuda"
)
PRETRAIN_TINY = "--log-every 5 --eval-every 10 --save-every 5"
METHODS = ("off2on_finetune", "sac")  # one waits for pretraining, one does not
N_JOBS = 1 + 2 + 2 * 2  # the dataset, pretraining per seed, 2 methods x 2 seeds


def sweep_command(*flags, methods=METHODS, seeds=2, extra=TINY, pretrain_extra=PRETRAIN_TINY):
    command = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--env-ids", ENV]
    command += ["--methods", *methods, "--seeds", str(seeds), "--extra", extra]
    return command + ["--pretrain-extra", pretrain_extra, *flags]


def tf_scalars(run_dir):
    """{tag: {step: value}} read straight from the event files with TensorBoard's low-level
    loader (not the reader benchmark.py uses); a later file's value of a step wins."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    scalars = {}
    for name in sorted(f for f in os.listdir(run_dir) if "tfevents" in f):
        for event in EventFileLoader(os.path.join(run_dir, name)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":  # the loader's tensor form
                    scalars.setdefault(value.tag, {})[event.step] = value.tensor.float_val[0]
    return scalars


def run_dirs(work):
    """{(exp_name, seed): run folder} of the fine-tuning runs in work/runs."""
    out = {}
    for name in os.listdir(work / "runs"):
        env, exp, seed, _ = name.split("__")
        if exp in METHODS:
            out[(exp, int(seed))] = work / "runs" / name
    return out


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Three sweeps of the tiny grid in their own folders: local (killed mid-way once, then run
    to the end, then once more), submitit's local executor, and one whose pretraining fails."""
    base = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(base / "minari"), "HF_HUB_OFFLINE": "1"}
    out = {}

    def run(name, command, **kw):
        (base / name).mkdir(exist_ok=True)
        kw = dict(cwd=base / name, env=env, capture_output=True, text=True, timeout=300, **kw)
        return subprocess.run(command, **kw)

    # local: kill the whole sweep once a run has saved its first epoch, then rerun it
    (base / "local").mkdir()
    log = base / "local" / "sweeps" / "logs" / f"{ENV}__sac__1.log"
    proc = subprocess.Popen(
        sweep_command(), cwd=base / "local", env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "epoch 2/" in log.read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out["killed_log"] = log.read_text()
    out["local"] = run("local", sweep_command())
    out["local_again"] = run("local", sweep_command())
    # the failing sweep beside the submitit one: it fills the cores while jobs wait for others
    (base / "failing").mkdir()
    bad = sweep_command(methods=METHODS, seeds=1, pretrain_extra="--no-such-flag 3")
    failing = subprocess.Popen(
        bad,
        cwd=base / "failing",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out["submitit"] = run("submitit", sweep_command("--backend", "submitit-local"))
    stdout, stderr = failing.communicate(timeout=300)
    out["failing"] = subprocess.CompletedProcess(bad, failing.returncode, stdout, stderr)
    out["base"] = base
    return out


def test_local_sweep_finishes_every_run(sweeps):
    result, work = sweeps["local"], sweeps["base"] / "local"
    assert result.returncode == 0, result.stdout + result.stderr
    done = re.search(
        r"summary: (\d+) skipped, (\d+) done, (\d+) failed, (\d+) blocked", result.stdout
    )
    skipped, finished, failed, blocked = map(int, done.groups())
    assert skipped + finished == N_JOBS and failed == blocked == 0
    assert len(re.findall(r"^\[\d+/\d+\] done ", result.stdout, re.M)) == finished
    dirs = run_dirs(work)
    assert sorted(dirs) == [(m, s) for m in sorted(METHODS) for s in (1, 2)]
    for run_dir in dirs.values():
        assert any("tfevents" in f for f in os.listdir(run_dir))
    assert len(os.listdir(work / "sweeps" / "done")) == N_JOBS
    for seed in (1, 2):  # the pretraining job's partial file became the checkpoint
        assert (work / "checkpoints" / f"cql__{ENV}__n5__seed{seed}.pt").exists()
        assert not (work / "checkpoints" / f"cql__{ENV}__n5__seed{seed}.pt.partial").exists()


def test_killed_run_resumes_to_the_same_epochs(sweeps):
    assert "epoch 2/" in sweeps["killed_log"] and "Resuming" not in sweeps["killed_log"]
    log = (sweeps["base"] / "local" / "sweeps" / "logs" / f"{ENV}__sac__1.log").read_text()
    assert log.startswith(sweeps["killed_log"])  # appended to, not overwritten
    assert "Resuming" in log[len(sweeps["killed_log"]) :]
    for (exp, seed), run_dir in run_dirs(sweeps["base"] / "local").items():
        scalars = tf_scalars(run_dir)
        assert sorted(scalars["losses/qf_loss"]) == [100 * e for e in range(1, EPOCHS + 1)]
        assert sorted(scalars["eval/normalized_score"]) == [100 * e for e in range(EPOCHS + 1)]
    files = os.listdir(run_dirs(sweeps["base"] / "local")[("sac", 1)])
    assert sum("tfevents" in f for f in files) == 2  # the killed run went on in its own folder


def test_rerun_skips_finished_runs(sweeps):
    result = sweeps["local_again"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{N_JOBS} jobs: {N_JOBS} finished before (skipped), 0 to run" in result.stdout
    assert f"summary: {N_JOBS} skipped, 0 done, 0 failed, 0 blocked" in result.stdout


def test_submitit_local_executor_sweep(sweeps):
    result, work = sweeps["submitit"], sweeps["base"] / "submitit"
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"summary: 0 skipped, {N_JOBS} done, 0 failed, 0 blocked" in result.stdout
    dirs = run_dirs(work)
    assert len(dirs) == 4
    for run_dir in dirs.values():
        assert len(tf_scalars(run_dir)["losses/qf_loss"]) == EPOCHS
    assert os.listdir(work / "sweeps" / "submitit")  # the jobs went through submitit


def test_failed_run_is_reported_and_the_others_complete(sweeps):
    result, work = sweeps["failing"], sweeps["base"] / "failing"
    assert result.returncode == 1
    assert "summary: 0 skipped, 2 done, 1 failed, 1 blocked" in result.stdout
    failed = f"{ENV}__cql_pretrain__1"
    assert f"FAILED {failed}: exit code" in result.stdout
    assert "command: python cql_pretrain.py" in result.stdout and "--no-such-flag" in result.stdout
    assert "no-such-flag" in result.stdout.split("last lines:")[1]  # the log's tail: tyro's error
    assert f"  failed: {failed}" in result.stdout
    assert f"  blocked: {ENV}__off2on_finetune__1" in result.stdout
    assert list(run_dirs(work)) == [("sac", 1)]


def test_figures_and_tables_match_the_event_files(sweeps, tmp_path):
    work = sweeps["base"] / "local"
    args = bench.Args(plot=str(work / "runs"), out=str(tmp_path), bootstrap_reps=200)
    data = bench.plot_all(args)
    for name in ("fig3_curves", "fig3_aggregate", "fig4a_offline_fraction", "fig4b_q_auroc"):
        assert (tmp_path / f"{name}.png").exists() and (tmp_path / f"{name}.pdf").exists()
    assert json.loads((tmp_path / "data.json").read_text())["fig3"]["envs"] == [ENV]
    dirs = run_dirs(work)
    table = (tmp_path / "fig3_table.md").read_text()
    for exp, label in (("off2on_finetune", "Ours"), ("sac", "SAC")):
        per_seed = [tf_scalars(dirs[(exp, s)])["eval/normalized_score"] for s in (1, 2)]
        finals = [d[max(d)] for d in per_seed]
        assert data["fig3"]["final_scores"][exp][ENV] == pytest.approx(dict(zip((1, 2), finals)))
        curve = data["fig3"]["curves"][ENV][exp]
        values = np.array([[d[s] for s in sorted(d)] for d in per_seed])
        assert curve["steps"] == sorted(per_seed[0])
        np.testing.assert_allclose(curve["mean"], values.mean(0), rtol=1e-6)
        np.testing.assert_allclose(curve["std"], values.std(0), rtol=1e-6, atol=1e-9)
        cell = f"| {label} | {np.mean(finals):.1f} ± {np.std(finals):.1f} (2) |"
        assert cell in table
        agg = data["fig3"]["aggregates"][exp]
        assert agg["mean"] == pytest.approx(np.mean(finals))
        assert agg["iqm_ci"][0] <= agg["iqm"] <= agg["iqm_ci"][1]
    auroc = data["fig4b_q_auroc"][ENV]["off2on_finetune"]
    direct = [tf_scalars(dirs[("off2on_finetune", s)])["charts/q_auroc_ensemble"] for s in (1, 2)]
    np.testing.assert_allclose(auroc["mean"], np.mean([list(d.values()) for d in direct], 0))


def test_iqm_by_hand():
    scores = np.array([[7.0, 1.0, 12.0, 4.0], [3.0, 9.0, 2.0, 11.0], [5.0, 10.0, 6.0, 8.0]])
    # 12 runs x tasks: trim the 3 lowest (1, 2, 3) and 3 highest (10, 11, 12), mean of 4..9
    assert bench.iqm(scores) == pytest.approx(6.5)
    agg = bench.aggregates({"a": scores}, reps=100)["a"]
    assert agg["iqm"] == pytest.approx(6.5) and agg["mean"] == pytest.approx(6.5)
    assert agg["iqm_ci"][0] <= 6.5 <= agg["iqm_ci"][1]
    skewed = np.array([[0.0, 0.0, 0.0, 100.0]])  # IQM of 4 runs: the middle two, 0 and 0
    assert bench.iqm(skewed) == 0.0 and bench.aggregates({"b": skewed}, 50)["b"]["mean"] == 25.0


def test_dry_run_prints_dependencies_first():
    extra = "--total-timesteps 10000 --first-epoch-multiplier 1"
    command = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--grid", "fig3", "--dry-run"]
    result = subprocess.run(
        [*command, "--seeds", "2", "--extra", extra], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "note: awac_finetune.py has no --first-epoch-multiplier" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("python ")]
    jobs = bench.make_jobs(bench.Args(grid="fig3", seeds=2, extra=extra))
    assert len(lines) == len(jobs) == 12 * (1 + 2 * (1 + 6))  # per dataset, per seed, per method
    printed = set()
    for line, job in zip(lines, jobs):
        assert line.split("  # after ")[0] == "python " + " ".join(job.argv)
        assert set(job.deps) <= printed  # whatever a job waits for was printed before it
        printed.add(job.name)
        if "--dataset-only" not in job.argv:
            assert "--resume" in job.argv and "--seed" in job.argv
    assert len(printed) == len(jobs)  # one name, one log, one marker per job
    runs = [j for j in jobs if j.argv[0] != "cql_pretrain.py"]
    flags = ("--exp-name", "--env-id", "--seed")
    keys = {tuple(j.argv[j.argv.index(f) + 1] for f in flags) for j in runs}
    assert len(keys) == len(runs)
    awac = next(j for j in jobs if j.argv[0] == "awac_finetune.py")
    assert "--first-epoch-multiplier" not in awac.argv and "10000" in awac.argv
    ours = next(j for j in jobs if "off2on_finetune" in j.argv)
    assert ours.argv[ours.argv.index("--first-epoch-multiplier") + 1] == "1"
    assert ours.deps == ("halfcheetah-random-v2__cql_pretrain__1",)


def test_pretraining_gets_the_flags_finetuning_would_pass():
    args = bench.Args(grid="fig4d", seeds=1, env_ids=(ENV,), extra=TINY)
    args.pretrain_extra = "--log-every 7"
    pretrain = [j for j in bench.make_jobs(args) if "--checkpoint-path" in j.argv][0]
    flags = " ".join(pretrain.argv)
    assert "--total-steps 10" in flags and "--offline-steps" not in flags
    assert "--hidden-sizes 16 16" in flags and "--bc-steps 5" in flags and "--log-every 7" in flags
    assert "--total-timesteps" not in flags and "--epoch-length" not in flags
    final = f"checkpoints/cql__{ENV}__n5__seed1.pt"
    assert pretrain.rename == (f"{final}.partial", final)
    with pytest.raises(ValueError, match="not in grid fig3"):
        bench.make_jobs(bench.Args(methods=("nope",)))


def test_a_job_at_its_time_limit_is_requeued_as_itself():
    job = bench.Job("x", ("cql_pretrain.py", "--resume"))
    runner = bench.RunJob(job, "/tmp", "sweeps", threads=1)
    delayed = runner.checkpoint()  # what submitit calls on Slurm's time-limit signal
    assert delayed.function is runner and delayed.args == () and "--resume" in job.argv


def test_a_given_checkpoint_replaces_the_pretraining_jobs(tmp_path):
    checkpoint = tmp_path / "authors.pt"
    checkpoint.write_bytes(b"")
    args = bench.Args(grid="finetune", seeds=2, env_ids=(ENV,), checkpoint=str(checkpoint))
    jobs = bench.make_jobs(args)
    assert not [j for j in jobs if "--checkpoint-path" in j.argv]  # no pretraining
    assert len(jobs) == 1 + 2 * 6  # the dataset, then 6 methods x 2 seeds
    data = jobs[0]
    for job in jobs[1:]:
        assert job.deps == (data.name,)
        pretrained = job.argv[0] == "off2on_finetune.py"
        assert ("--checkpoint" in job.argv) == pretrained, job.argv  # not AWAC's own offline phase
        if pretrained:
            assert job.argv[job.argv.index("--checkpoint") + 1] == str(checkpoint)
    without = bench.make_jobs(bench.Args(grid="finetune", seeds=2, env_ids=(ENV,)))
    assert len([j for j in without if "--checkpoint-path" in j.argv]) == 2  # one per seed
    with pytest.raises(ValueError, match="--checkpoint nope.pt does not exist"):
        bench.make_jobs(bench.Args(grid="finetune", checkpoint="nope.pt"))


def test_scores_at_steps_and_the_dip_by_hand():
    tag = "eval/normalized_score"
    steps = [0, 1000, 2000, 3000]
    runs = {
        ("e", "off2on_finetune", 1): {tag: (steps, [40.0, 35.0, 38.0, 30.0])},
        ("e", "off2on_finetune", 2): {tag: (steps, [40.0, 41.0, 42.0, 45.0])},  # no drop: dip > 0
        ("e", "off2on_finetune", 3): {tag: (steps[:2], [40.0, 20.0])},  # not past dip_until yet
        ("e", "sac-ft", 1): {tag: (steps, [30.0, 10.0, 20.0, 25.0])},
        ("other", "sac-ft", 1): {tag: (steps, [0.0, 0.0, 0.0, 0.0])},
    }
    reference = ("official", np.array([0.0, 1000.0, 2000.0]), np.array([38.0, 36.0, 39.0]))
    methods = [("off2on_finetune", "Ours"), ("sac-ft", "SAC-ft")]
    table = bench.step_table(runs, ["e"], methods, tag, (0, 1000, 3000), 2000, [reference])
    lines = table.splitlines()
    assert lines[0] == "| dataset | method | 0 | 1,000 | 3,000 | dip |"
    # at 1000: 35, 41, 20 -> mean 32; dips (seeds 1, 2): 35 - 40, 41 - 40
    std = np.std([35.0, 41.0, 20.0])
    assert (
        lines[2]
        == f"| e | Ours | 40.0 ± 0.0 (3) | 32.0 ± {std:.1f} (3) | 37.5 ± 7.5 (2) | -2.0 ± 3.0 (2) |"
    )
    assert lines[3] == "| e | SAC-ft | 30.0 | 10.0 | 25.0 | -20.0 |"
    assert lines[4] == "| e | official | 38.0 | 36.0 |  | -2.0 |"
    assert len(lines) == 5


def test_reference_files_are_read_or_refused(tmp_path):
    good = tmp_path / "log.csv"
    good.write_text("# a comment\nepoch,env_steps,normalized_score\n0,0,38.9\n1,1000,36.9\n")
    label, steps, scores = bench.read_reference(f"official code={good}")
    assert (
        label == "official code" and steps.tolist() == [0, 1000] and scores.tolist() == [38.9, 36.9]
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,score\n0,1\n")
    for spec, says in ((str(good), "expected LABEL=FILE.csv"), (f"x={bad}", "needs numbers")):
        with pytest.raises(ValueError, match=says):
            bench.read_reference(spec)


def test_slurm_backend_without_slurm_says_what_works_here(tmp_path):
    bare = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no sbatch on this PATH
    base = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--env-ids", ENV, "--seeds", "1"]
    run = dict(cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=60)
    real = subprocess.run([*base, "--backend", "slurm"], **run)
    assert real.returncode != 0 and "Traceback" not in real.stderr, real.stderr
    assert real.stderr.strip().splitlines() == [
        "error: --backend slurm: no Slurm on this machine (`sbatch` is not on PATH); run from a "
        "Slurm login node, or use --backend local or submitit-local here"
    ]
    assert not (tmp_path / "sweeps").exists()  # nothing launched
    dry = subprocess.run([*base, "--backend", "slurm", "--dry-run"], **run)
    assert dry.returncode == 0 and "warning: --backend slurm: no Slurm" in dry.stdout


def test_an_extra_flag_no_script_has_is_an_error_before_anything_runs(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--grid", "fig3", "--dry-run"]
    out = subprocess.run(
        [*command, "--extra", "--total-timestep 3000"], cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "python " not in out.stdout  # no job printed
    assert "--extra --total-timestep: no script of this sweep" in out.stderr
    assert "did you mean --total-timesteps?" in out.stderr
    some = bench.make_jobs(bench.Args(grid="fig3", seeds=1, extra="--first-epoch-multiplier 1"))
    assert any("--first-epoch-multiplier" in j.argv for j in some)  # only some accept it: runs


def test_squeue_watcher_reads_states_and_ends_the_jobs_that_left_the_queue():
    # where sacct fails, job states come from squeue: a job no longer listed has ended
    watcher = bench.squeue_watcher_class()(delay_s=60)
    for job_id in ("11", "12", "13"):
        watcher.register_job(job_id)
    info = watcher.read_info(b"11|RUNNING|node1\n12|PENDING|\n")
    watcher._info_dict.update(info)
    assert info["11"]["State"] == "RUNNING" and info["12"]["State"] == "PENDING"
    assert [watcher.is_done(j, mode="cache") for j in ("11", "12", "13")] == [False, False, True]
    command = watcher._make_command()
    assert command[0] == "squeue" and not any(c.startswith("-j") for c in command)
