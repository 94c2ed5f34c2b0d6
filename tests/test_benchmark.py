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
        # 3 online evaluations, all in the dip's window
        offline = [d[0] for d in per_seed]
        dips = [min(0.0, min(v for s, v in d.items() if s > 0) - d[0]) for d in per_seed]
        means = [np.mean([v for s, v in d.items() if s > 0]) for d in per_seed]
        gains = np.subtract(finals, offline)
        cells = [f"{np.mean(v):.1f} ± {np.std(v):.1f} (2)" for v in (offline, dips, finals, means)]
        row = f"| {ENV} | {label} | " + " | ".join(
            [*cells, f"{gains.mean():.1f} ± {gains.std():.1f} (2)"]
        )
        assert row + " |" in table
        aggs = data["fig3"]["aggregates"]
        assert aggs["final"][exp]["mean"] == pytest.approx(np.mean(finals))
        assert aggs["online_mean"][exp]["mean"] == pytest.approx(np.mean(means))
        for agg in (aggs["final"][exp], aggs["online_mean"][exp]):
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


TAG = "eval/normalized_score"
THOUSANDS = list(range(0, 11_000, 1000))  # step 0, then 10 online evaluations
# offline 50; the 5-evaluation window (1000-5000) bottoms out at 38; 30 at 6000 lies outside it
DIPS_AND_RECOVERS = [50.0, 44.0, 38.0, 41.0, 47.0, 52.0, 30.0, 55.0, 58.0, 60.0, 62.0]


def row(env, label, cells):
    return f"| {env} | {label} | " + " | ".join(cells) + " |"


def one_run(*values):
    """The cells of a row with one run: no spread."""
    return [f"{v} ± 0.0 (1)" for v in values]


# seeds 1, 2, 3 of "sac" below: offline [50, 52]; dip [-12, -5]; final [62, 51, 45]; online mean
# [48.7, 49.25, 42.33]; gain [12, -1]. Seed 3 has no step 0: it counts for final and online mean.
SAC_CELLS = (
    "51.0 ± 1.0 (2)",
    "-8.5 ± 3.5 (2)",
    "52.7 ± 7.0 (3)",
    "46.8 ± 3.1 (3)",
    "5.5 ± 6.5 (2)",
)
SAC_ROW = row("e", "SAC", SAC_CELLS)


def test_o2o_metrics_of_a_curve_that_dips_and_recovers():
    m = bench.o2o_metrics(THOUSANDS, DIPS_AND_RECOVERS)
    assert m["offline"] == 50.0
    # 10% of 10,000 steps is one evaluation, so the first 5: min(44, 38, 41, 47, 52) - 50
    assert m["dip"] == -12.0
    assert m["final"] == 62.0
    # the 10 evaluations after step 0, not step 0's 50: 487 / 10
    assert m["online_mean"] == pytest.approx(48.7)
    assert m["gain"] == 12.0


def test_o2o_metrics_of_a_curve_that_never_dips():
    m = bench.o2o_metrics([0, 1000, 2000, 3000, 4000, 5000], [40.0, 41.0, 42.0, 43.0, 45.0, 46.0])
    assert m["dip"] == 0.0  # clipped: its lowest online score is 1 above the start
    assert m["gain"] == 6.0 and m["online_mean"] == pytest.approx(43.4)
    flat = bench.o2o_metrics([0, 100, 200], [40.0, 40.0, 40.0])
    assert flat["dip"] == 0.0 and flat["gain"] == 0.0


def test_the_dip_looks_at_least_at_the_first_5_evaluations():
    # 10% of 20,000 steps covers 2 evaluations: the window is the first 5 (1000-5000) instead
    steps = list(range(0, 21_000, 1000))
    scores = [50.0, 49.0, 48.0, 47.0, 46.0, 40.0, 20.0] + [55.0] * 14
    assert bench.o2o_metrics(steps, scores)["dip"] == -10.0  # 40 at 5000; not 20 at 6000
    # fewer than 5 evaluations after step 0: all of them
    assert bench.o2o_metrics([0, 100, 200, 300], [50.0, 48.0, 45.0, 52.0])["dip"] == -5.0


def test_the_dip_looks_at_the_first_10_percent_of_a_long_run():
    # 100,000 steps, one evaluation per 1000: 10% is the first 10 evaluations (1000-10,000)
    steps = list(range(0, 101_000, 1000))
    scores = [50.0] + [49.0] * 9 + [35.0, 20.0] + [60.0] * 89
    assert len(scores) == len(steps)
    assert bench.o2o_metrics(steps, scores)["dip"] == -15.0  # 35 at 10,000; not 20 at 11,000


def test_a_curve_without_step_0_has_no_offline_dip_or_gain():
    m = bench.o2o_metrics([1000, 2000, 3000], [40.0, 42.0, 45.0])
    assert m["offline"] is None and m["dip"] is None and m["gain"] is None
    assert m["final"] == 45.0 and m["online_mean"] == pytest.approx(42.333333)
    started = bench.o2o_metrics([0], [40.0])  # no online step yet
    assert started == {**dict.fromkeys(bench.METRICS), "offline": 40.0}


def test_table_of_seeds_with_different_lengths_by_hand():
    runs = {
        ("e", "sac", 1): {TAG: (THOUSANDS, DIPS_AND_RECOVERS)},  # 50, -12, 62, 48.7, +12
        ("e", "sac", 2): {TAG: (THOUSANDS[:5], [52.0, 50.0, 47.0, 49.0, 51.0])},  # still running
        ("e", "sac", 3): {TAG: ([1000, 2000, 3000], [40.0, 42.0, 45.0])},  # no step 0
        ("e", "bcq-ft", 1): {TAG: ([0, 1000], [30.0, 20.0])},
    }
    methods = [("sac", "SAC"), ("bcq-ft", "BCQ-ft")]
    metrics = {x: bench.run_metrics(runs, ["e"], x, TAG) for x, _ in methods}
    seed2 = metrics["sac"]["e"][2]  # on its own 4000 steps: 4 online evaluations, all in the window
    assert seed2 == pytest.approx(
        {"offline": 52.0, "dip": -5.0, "final": 51.0, "online_mean": 49.25, "gain": -1.0}
    )
    # a reference run longer than the runs: its metrics up to their last step, 10,000
    steps = np.arange(0.0, 100_001.0, 1000.0)
    scores = np.full(len(steps), 70.0)
    scores[:11] = [40.0, 39.0, 41.0, 42.0, 43.0, 44.0, 45.0, 46.0, 30.0, 47.0, 50.0]
    last = bench.last_step(runs, "e", dict(methods), TAG)
    assert last == 10_000
    reference = bench.reference_metrics(("official", steps, scores), last)
    table = bench.markdown_table(metrics, ["e"], methods, [("official", {"e": reference})])
    lines = table.splitlines()
    assert lines[0] == "| dataset | method | offline | dip | final | online mean | gain |"
    assert lines[2] == SAC_ROW
    assert lines[3] == row("e", "BCQ-ft", one_run("30.0", "-10.0", "20.0", "20.0", "-10.0"))
    # the reference: final 50 at 10,000 (not 70), online mean 427 / 10, dip in 1000-5000 (39),
    # not 30 at 8000, which its full run's 10% window would reach
    assert lines[4] == row("e", "official", one_run("40.0", "-1.0", "50.0", "42.7", "10.0"))
    assert len(lines) == 5


def test_scores_at_steps_and_the_dip_by_hand():
    steps = [0, 1000, 2000, 3000]
    runs = {
        ("e", "off2on_finetune", 1): {TAG: (steps, [40.0, 35.0, 38.0, 30.0])},
        ("e", "off2on_finetune", 2): {TAG: (steps, [40.0, 41.0, 42.0, 45.0])},  # no drop: dip 0
        ("e", "off2on_finetune", 3): {TAG: (steps[:2], [40.0, 20.0])},  # still running
        ("e", "sac-ft", 1): {TAG: (steps, [30.0, 10.0, 20.0, 25.0])},
        ("other", "sac-ft", 1): {TAG: (steps, [0.0, 0.0, 0.0, 0.0])},
    }
    # the reference's dip is looked for up to the runs' last step, 3000: 36 - 38, not 25 at 4000
    ref_scores = np.array([38.0, 36.0, 39.0, 37.0, 25.0] + [50.0] * 36)
    reference = ("official", np.arange(0.0, 41_000.0, 1000.0), ref_scores)
    methods = [("off2on_finetune", "Ours"), ("sac-ft", "SAC-ft")]
    table = bench.step_table(runs, ["e"], methods, TAG, (0, 1000, 3000), [reference])
    lines = table.splitlines()
    assert lines[0] == "| dataset | method | 0 | 1,000 | 3,000 | dip |"
    # at 1000: 35, 41, 20 -> mean 32; dips, each seed's run having under 5 online evaluations:
    # 30 - 40, 0 (never below 40), 20 - 40 -> -10 ± 8.2
    std = np.std([35.0, 41.0, 20.0])
    cells = ["40.0 ± 0.0 (3)", f"32.0 ± {std:.1f} (3)", "37.5 ± 7.5 (2)", "-10.0 ± 8.2 (3)"]
    assert lines[2] == row("e", "Ours", cells)
    assert lines[3] == "| e | SAC-ft | 30.0 | 10.0 | 25.0 | -20.0 |"
    assert lines[4] == "| e | official | 38.0 | 36.0 | 37.0 | -2.0 |"
    assert len(lines) == 5


def write_run(runs_dir, name, steps, scores):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(runs_dir, name))
    for step, score in zip(steps, scores):
        writer.add_scalar(TAG, score, step)
    writer.close()


def test_plot_writes_the_metrics_table_and_aggregates_both_metrics(tmp_path):
    runs = tmp_path / "runs"
    curves = {  # sac: the seeds of test_table_of_seeds_with_different_lengths_by_hand
        ("sac", 1): (THOUSANDS, DIPS_AND_RECOVERS),
        ("sac", 2): (THOUSANDS[:5], [52.0, 50.0, 47.0, 49.0, 51.0]),
        ("sac", 3): ([1000, 2000, 3000], [40.0, 42.0, 45.0]),
        ("bcq-ft", 1): ([0, 1000, 2000], [30.0, 20.0, 40.0]),
        ("bcq-ft", 2): ([0, 1000, 2000], [30.0, 32.0, 34.0]),
    }
    for (exp, seed), (steps, scores) in curves.items():
        write_run(runs, f"e__{exp}__{seed}__1", steps, scores)
    args = bench.Args(plot=str(runs), out=str(tmp_path / "out"), bootstrap_reps=50)
    args.at_steps = (0, 1000)
    data = bench.plot_all(args)
    assert list(data) == ["fig3"]  # both methods are only in Figure 3's grid
    for name in ("fig3_curves", "fig3_aggregate"):
        assert (tmp_path / "out" / f"{name}.png").exists()
    text = (tmp_path / "out" / "fig3_table.md").read_text()
    # bcq-ft: offline [30, 30], dip [-10, 0], final [40, 34], online mean [30, 33], gain [10, 4]
    bcq = ["30.0 ± 0.0 (2)", "-5.0 ± 5.0 (2)", "37.0 ± 3.0 (2)", "31.5 ± 1.5 (2)", "7.0 ± 3.0 (2)"]
    assert SAC_ROW in text.splitlines()
    assert row("e", "BCQ-ft", bcq) in text.splitlines()
    assert "| dataset | method | 0 | 1,000 | dip |" in text  # --at-steps
    head = (
        "| method | final score: IQM [95% CI] | final score: mean [95% CI] | "
        "online mean: IQM [95% CI] | online mean: mean [95% CI] | runs x datasets |"
    )
    assert head in text
    aggs = data["fig3"]["aggregates"]
    assert aggs["final"]["sac"]["mean"] == pytest.approx((62 + 51 + 45) / 3)
    assert aggs["online_mean"]["sac"]["mean"] == pytest.approx((48.7 + 49.25 + 127 / 3) / 3)
    assert aggs["online_mean"]["bcq-ft"]["mean"] == pytest.approx(31.5)
    for metric in ("final", "online_mean"):
        for agg in aggs[metric].values():
            assert agg["iqm_ci"][0] <= agg["iqm"] <= agg["iqm_ci"][1]
    line = next(line for line in text.splitlines() if line.startswith("| BCQ-ft | "))
    cells = line.strip("| ").split(" | ")
    assert cells[2].startswith("37.0 [") and cells[4].startswith("31.5 [") and cells[5] == "2 x 1"


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


def test_track_reaches_every_training_run_grouped_by_grid_and_method(tmp_path):
    args = bench.Args(grid="fig3", seeds=1, env_ids=(ENV,), methods=("off2on_finetune", "sac"))
    args.track = True
    jobs = {job.name: job for job in bench.make_jobs(args)}
    assert "--track" not in jobs[f"{ENV}__dataset"].argv and not jobs[f"{ENV}__dataset"].wandb
    for name, method in (("cql_pretrain__1", "cql_pretrain"), ("sac__1", "sac")):
        job = jobs[f"{ENV}__{name}"]
        assert job.argv[-1] == "--track" and job.wandb == ("fig3", method)
    # the job's process gets them as W&B's environment variables
    code = "import os; print(os.environ['WANDB_RUN_GROUP'], os.environ['WANDB_JOB_TYPE'])"
    job = bench.Job("e__sac__1", ("-c", code), wandb=("fig3", "sac"))
    assert bench.RunJob(job, str(tmp_path), "sweeps", 1)() == 0
    assert (tmp_path / "sweeps" / "logs" / "e__sac__1.log").read_text().splitlines()[
        -1
    ] == "fig3 sac"
