"""benchmark.py --backend slurm against a real Slurm: the one-node cluster that `.ci/start-slurm`
starts (CI runs it before the suite; on a developer's Debian or Ubuntu machine, run it as root).
Skipped, with the reason, where no Slurm answers.

One tiny sweep: halfcheetah-random-v2's dataset and a SAC run long enough to outlast a 2-minute
limit's requeue signal (sent 90 s before the limit, and up to 60 s earlier), beside a dataset
that can't be had here (hopper-medium-v2, no network), whose job fails and whose run is blocked."""

import getpass
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("sweep_tool", os.path.join(ROOT, "benchmark.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def slurm_problem() -> str | None:
    if not shutil.which("sinfo"):
        return "no Slurm here (`sinfo` is not on PATH): start one with .ci/start-slurm (as root)"
    sinfo = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, timeout=30)
    if sinfo.returncode != 0 or not sinfo.stdout.strip():
        reason = (sinfo.stderr.strip().splitlines() or ["no partition"])[-1]
        return f"Slurm does not answer (sinfo: {reason}): start it with .ci/start-slurm"
    return None


PROBLEM = slurm_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")

ENV, MISSING = "halfcheetah-random-v2", "hopper-medium-v2"
STEPS, EPOCH = 8000, 200  # 40 epochs: about 40 s on one core, more than a 30-s job segment
RUN_FLAGS = (
    f"--random-dataset-size 2000 --hidden-sizes 16 16 --batch-size 32 --total-timesteps {STEPS} "
    f"--epoch-length {EPOCH} --eval-episodes 1 --save-every 1 --no-cuda"
)
SLURM_FLAGS = "--backend slurm --slurm-time 2 --slurm-gpus 0 --slurm-cpus 1 --slurm-mem-gb 1"
SLURM_FLAGS += " --slurm-max-requeues 50"  # a requeue signal may come before a run gets going


def sweep(work, env, *env_ids):
    command = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--env-ids", *env_ids]
    command += ["--methods", "sac", "--seeds", "1", "--extra", RUN_FLAGS, *SLURM_FLAGS.split()]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)


def release_requeued(stop: threading.Event, released: list):
    """Slurm holds a requeued job for 2 minutes before it may start again; lifting the hold (as
    an operator may) keeps the test short and changes nothing else."""
    query = ["squeue", "--noheader", f"--user={getpass.getuser()}", "--name=off2on"]
    query += ["--states=PENDING", "--format=%i|%r"]
    while not stop.wait(1.0):
        lines = subprocess.run(query, capture_output=True, text=True).stdout.split()
        for job_id, reason in (line.split("|") for line in lines):
            if reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
                released.append(job_id)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "minari"), "HF_HUB_OFFLINE": "1"}
    stop, released = threading.Event(), []
    releaser = threading.Thread(target=release_requeued, args=(stop, released), daemon=True)
    releaser.start()
    try:
        first = sweep(work, env, ENV, MISSING)
    finally:
        stop.set()
        releaser.join()
    again = sweep(work, env, ENV)
    return dict(work=work, first=first, again=again, released=released)


def test_every_job_ends_and_the_failed_one_is_reported_with_its_log(slurm):
    out = slurm["first"].stdout
    assert slurm["first"].returncode == 1, out + slurm["first"].stderr  # one failed, one blocked
    assert "summary: 0 skipped, 2 done, 1 failed, 1 blocked" in out, out
    assert f"done {ENV}__dataset" in out and f"done {ENV}__sac__1" in out
    assert f"FAILED {MISSING}__dataset: exit code 1" in out
    assert "error: Minari dataset 'mujoco/hopper/medium-v0' is not in" in out  # its log's tail
    assert f"blocked {MISSING}__sac__1: a job it waits for failed" in out
    checkpoint = slurm["work"] / "checkpoints" / f"sac__{ENV}__n1__seed1.pt"
    assert checkpoint.exists()


def test_the_run_was_requeued_at_its_time_limit_and_resumed(slurm):
    work = slurm["work"]
    assert slurm["released"], "no job was requeued"
    log = (work / "sweeps" / "logs" / f"{ENV}__sac__1.log").read_text()
    assert "Resuming" in log and f"epoch {STEPS // EPOCH}/{STEPS // EPOCH}" in log
    timed_out = [
        path
        for path in glob.glob(str(work / "sweeps" / "submitit" / "*" / "*_log.err"))
        if "this job is timed-out" in open(path).read()  # submitit's handler of the signal
    ]
    assert timed_out
    # a job signalled before the run's first save starts the run anew: the saved run's folder
    run_name = torch.load(work / "checkpoints" / f"sac__{ENV}__n1__seed1.pt")["run_name"]
    run_dir = str(work / "runs" / run_name)
    steps, _ = bench.read_scalars(run_dir)["eval/normalized_score"]
    assert steps == list(range(0, STEPS + 1, EPOCH))  # each evaluation once, none lost
    assert len(glob.glob(os.path.join(run_dir, "*tfevents*"))) >= 2  # resumed in the same folder


def test_the_launcher_says_each_event_once(slurm):
    out, err = slurm["first"].stdout, slurm["first"].stderr
    assert "Bypassing" not in out + err and "WARNING" not in out + err
    assert out.count("note: sacct fails") <= 1
    assert out.count("submitted ") == 3  # the two datasets and the run; the blocked run never
    assert len(out.splitlines()) < 40


def test_a_rerun_skips_everything(slurm):
    again = slurm["again"]
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 jobs: 2 finished before (skipped), 0 to run" in again.stdout
    assert "submitted" not in again.stdout
