import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _isolated_minari(tmp_path, monkeypatch):
    """Never touch the user's Minari cache, never try the network for long."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari_datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
