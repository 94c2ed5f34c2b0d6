import os
import subprocess
import sys

os.environ.setdefault(
    "MUJOCO_GL", "egl"
)  # before any test imports mujoco: headless rendering (pixel_envs.py)

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rendering_problem() -> str | None:
    """Why MuJoCo can't render headless here, or None. Checked in a child process: a GL backend
    that fails to load makes `import mujoco` itself fail."""
    code = "import mujoco; mujoco.Renderer(mujoco.MjModel.from_xml_string('<mujoco/>'), 8, 8)"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return None if child.returncode == 0 else (child.stderr.strip().splitlines() or ["?"])[-1]


RENDERING_PROBLEM = rendering_problem()
if RENDERING_PROBLEM:  # the other tests need no rendering: let them import mujoco
    RENDERING_PROBLEM = (
        f"the pixel tests can't render headless (MUJOCO_GL={os.environ.pop('MUJOCO_GL')}: "
        f"{RENDERING_PROBLEM}): install libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 "
        "(README, Install), or set MUJOCO_GL=osmesa with libosmesa6, or leave them out with "
        "-m 'not pixels'"
    )


def require_rendering():
    """Called by the pixel test modules before they import pixel_envs."""
    if RENDERING_PROBLEM:
        pytest.fail(RENDERING_PROBLEM, pytrace=False)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Never touch the user's Minari cache, never try the network for long, and work in a
    temporary folder (MuJoCo writes MUJOCO_LOG.TXT into the working directory when it warns)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari_datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def f64():
    """float64 default dtype for the test, restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def member_mlp(seq: nn.Sequential, i: int) -> nn.Sequential:
    """Member i of a vectorized MLP (either script's VectorizedLinear layers) as a plain
    nn.Sequential of nn.Linear / nn.ReLU with the same weights."""
    layers = []
    for m in seq:
        if type(m).__name__ == "VectorizedLinear":
            n_in, n_out = m.weight.shape[1:]
            lin = nn.Linear(n_in, n_out, dtype=m.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight[i].T)
                lin.bias.copy_(m.bias[i, 0])
            layers.append(lin)
        elif isinstance(m, nn.ReLU):
            layers.append(nn.ReLU())
        else:
            raise AssertionError(f"unexpected layer {m}")
    return nn.Sequential(*layers)
