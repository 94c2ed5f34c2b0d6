"""A run killed (SIGKILL) after a saved epoch and resumed with --resume ends exactly where the same
run left alone ends: the same weights, replay, RNG states and evaluation returns, bit for bit on
CPU. On HalfCheetah with 1000-step epochs, episodes end on the epoch boundaries; on Hopper they
end mid-epoch, so the saved state must carry the running episode (simulator, time limit, return).
"""

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
SMALL = "--batch-size 32 --eval-episodes 1 --save-every 1 --no-cuda"
RUNS = {  # name: (script, flags, state file); every run is seed 1
    "off2on_halfcheetah": (
        "off2on_finetune.py",
        "--env-id halfcheetah-random-v2 --random-dataset-size 3000 --ensemble-size 2 "
        "--checkpoint cheetah.pt --epoch-length 1000 --first-epoch-multiplier 1 "
        "--auroc-every 1 --auroc-samples 50",
        "off2on_finetune__halfcheetah-random-v2__n2__seed1.pt",
    ),
    "off2on_hopper": (
        "off2on_finetune.py",
        "--env-id hopper-random-v2 --random-dataset-size 3000 --ensemble-size 2 "
        "--checkpoint hopper.pt --epoch-length 200 --first-epoch-multiplier 2 "
        "--auroc-every 1 --auroc-samples 50",
        "off2on_finetune__hopper-random-v2__n2__seed1.pt",
    ),
    "awac_hopper": (
        "awac_finetune.py",
        "--env-id hopper-random-v2 --random-dataset-size 3000 --offline-steps 20 "
        "--epoch-length 200 --min-steps-before-training 200 --offline-batch-size 32 "
        "--policy-hidden-sizes 32 32 --q-hidden-sizes 32 32",
        "awac__hopper-random-v2__seed1.pt",
    ),
    "bcq_hopper": (
        "bcq_finetune.py",
        "--env-id hopper-random-v2 --random-dataset-size 3000 --offline-steps 20 "
        "--epoch-length 200 --hidden-sizes 32 32 --vae-hidden-sizes 32 32",
        "bcq-ft__hopper-random-v2__seed1.pt",
    ),
}
PRETRAIN = "--random-dataset-size 3000 --ensemble-size 2 --hidden-sizes 32 32 --total-steps 10"
PRETRAIN += " --bc-steps 5 --cql-n-actions 2 --batch-size 32 --eval-episodes 1 --no-cuda"


def command(name, exp_name, *extra):
    script, flags, _ = RUNS[name]
    epochs = int(re.search(r"--epoch-length (\d+)", flags).group(1)) * EPOCHS
    flags = f"{flags} {SMALL} --total-timesteps {epochs} --exp-name {exp_name}"
    return [sys.executable, os.path.join(ROOT, script), *flags.split(), *extra]


def state_file(work, name, exp_name):
    default_exp = RUNS[name][2].split("__")[0]
    return work / "checkpoints" / RUNS[name][2].replace(default_exp, exp_name, 1)


def killed_after_a_saved_epoch(cmd, path, env, cwd):
    """Start the run, SIGKILL it as soon as a state with 1 <= epoch < EPOCHS is on disk."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, deadline = None, time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if path.exists() and path.stat().st_mtime_ns != seen:
            seen = path.stat().st_mtime_ns
            try:
                epoch = torch.load(path, weights_only=True)["epoch"]
            except Exception:  # replaced while being read: look again
                continue
            if 1 <= epoch < EPOCHS:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return epoch
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no saved epoch to kill after: {proc.stdout.read().decode()[-2000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume_exact")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "minari"), "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    run = dict(cwd=work, env=env, capture_output=True, text=True, timeout=400)
    pretrain = [sys.executable, os.path.join(ROOT, "cql_pretrain.py"), *PRETRAIN.split()]
    with ThreadPoolExecutor(2) as pool:
        made = pool.map(
            lambda a: subprocess.run(
                [*pretrain, "--env-id", a[0], "--checkpoint-path", a[1]], **run
            ),
            [("halfcheetah-random-v2", "cheetah.pt"), ("hopper-random-v2", "hopper.pt")],
        )
        for out in made:
            assert out.returncode == 0, out.stderr[-2000:]

        def pair(name):
            alone, killed = f"{name}-alone", f"{name}-killed"  # one state file each
            straight = subprocess.run(command(name, alone), **run)
            epoch = killed_after_a_saved_epoch(
                command(name, killed), state_file(work, name, killed), env, work
            )
            resumed = subprocess.run(command(name, killed, "--resume"), **run)
            return name, (straight, epoch, resumed)

        return work, dict(pool.map(pair, RUNS))


def tensors(value, prefix=""):
    """Every tensor of a (nested) checkpoint, by path; RNG states and floats included."""
    if torch.is_tensor(value):
        return {prefix: value}
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in tensors(item, f"{prefix}/{key}").items()
        }
    if (
        isinstance(value, (int, float, str))
        and "run_name" not in prefix
        and "metadata" not in prefix
    ):
        return {prefix: torch.tensor(hash(value) if isinstance(value, str) else value)}
    return {}


def evaluations(stdout):
    return re.findall(r"eval after ([\d,]+) online steps: return (-?[\d.]+)", stdout)


@pytest.mark.parametrize("name", list(RUNS))
def test_a_killed_and_resumed_run_is_the_run_left_alone(runs, name):
    work, results = runs
    straight, epoch, resumed = results[name]
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert re.search(rf"^Resuming .*epoch {epoch}$", resumed.stdout, re.M), resumed.stdout[:2000]
    # the evaluations after the resume are those of the run left alone, to the last digit
    after = evaluations(resumed.stdout)
    assert after and after == evaluations(straight.stdout)[-len(after) :]
    a = tensors(torch.load(state_file(work, name, f"{name}-alone"), weights_only=True))
    b = tensors(torch.load(state_file(work, name, f"{name}-killed"), weights_only=True))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
