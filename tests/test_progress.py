"""Progress lines of the long phases: at least one every 30 s of wall time, with the rate to two
significant figures and the time left (the shared `Progress`, checked here in one script; the
copies are identical, tests/test_shared_blocks.py)."""

import pytest

import off2on_finetune
from off2on_finetune import Progress, rate_text


@pytest.mark.parametrize(
    "rate, text",
    [(0.41666, "0.42"), (0.0042, "0.0042"), (5.27, "5.3"), (53.4, "53"), (530.2, "530"),
     (12_345.6, "12,346")],
)  # fmt: skip
def test_rates_keep_two_significant_figures(rate, text):
    assert rate_text(rate) == text


def test_a_line_every_30_seconds_with_rate_and_time_left(monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr(off2on_finetune.time, "time", lambda: clock[0])
    progress = Progress("epoch 1: update", total=5000)
    for done, now in ((1, 1010.0), (2, 1029.9)):  # under 30 s: quiet
        clock[0] = now
        progress(done)
    assert capsys.readouterr().out == ""
    clock[0] = 1030.0
    progress(13)  # 13 updates in 30 s: 0.43/s, 4987 left: 11,508 s
    assert capsys.readouterr().out == "  epoch 1: update 13/5,000: 0.43/s, 3.2 h left\n"
    clock[0] = 1059.0
    progress(20)
    assert capsys.readouterr().out == ""  # 29 s since the last line
    clock[0] = 1061.0
    progress(30, printed=True)  # the loop printed its own line: the 30 s start again
    clock[0] = 1090.0
    progress(40)
    assert capsys.readouterr().out == ""
    clock[0] = 1091.0
    progress(4_990)  # 4990 in 91 s: 55/s, 10 left
    assert capsys.readouterr().out == "  epoch 1: update 4,990/5,000: 55/s, 0 s left\n"


def test_a_resumed_phase_counts_its_rate_from_where_it_resumed(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(off2on_finetune.time, "time", lambda: clock[0])
    progress = Progress("CQL step", total=1_000_000, done=400_000)
    clock[0] = 60.0
    progress(400_120)  # 120 steps in 60 s since the resume: 2/s, 599,880 left
    assert capsys.readouterr().out == "  CQL step 400,120/1,000,000: 2/s, 83.3 h left\n"
