"""What the suite needs of a machine, and what it leaves on it: a pixel test that can't render
says why in one line; every test runs in a temporary folder, so the checkout stays as it was."""

import os
import subprocess
import sys

import gymnasium as gym

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pixel_tests_that_cannot_render_say_why_in_one_line(tmp_path):
    env = {**os.environ, "MUJOCO_GL": "bogus"}  # a backend MuJoCo refuses, on any machine
    test = os.path.join(ROOT, "tests", "test_pixel_envs.py")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    reason = [line for line in out.stdout.splitlines() if "can't render headless" in line]
    assert reason, out.stdout[-3000:]
    assert "MUJOCO_GL=bogus" in reason[0] and "invalid value" in reason[0]
    assert "libegl1" in reason[0] and "-m 'not pixels'" in reason[0]
    assert "Traceback" not in out.stdout


def test_tests_run_in_a_temporary_folder():
    log = os.path.join(ROOT, "MUJOCO_LOG.TXT")
    before = os.stat(log).st_mtime_ns if os.path.exists(log) else None
    assert os.getcwd() != ROOT
    gym.make("HalfCheetah-v5").close()  # MuJoCo 4 warns (settotalmass) into ./MUJOCO_LOG.TXT
    assert os.path.exists("MUJOCO_LOG.TXT")
    assert (os.stat(log).st_mtime_ns if os.path.exists(log) else None) == before
