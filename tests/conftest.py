import os
import sys

os.environ.setdefault(
    "MUJOCO_GL", "egl"
)  # before any test imports mujoco: headless rendering (pixel_envs.py)

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _isolated_minari(tmp_path, monkeypatch):
    """Never touch the user's Minari cache, never try the network for long."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari_datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


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
