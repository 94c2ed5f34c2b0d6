"""--track (Weights & Biases, CleanRL's way) and --capture-video, end to end on tiny runs of
off2on_finetune.py, with W&B in offline mode (no network): the W&B run's history holds the
evaluations at the TensorBoard file's steps, a resumed run continues the same W&B run, and the
recorded evaluation episodes decode back to moving frames of the expected number and size."""

import glob
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["cql_pretrain", "off2on_finetune", "awac_finetune", "bcq_finetune", "fqe_baseline"]
SCRIPTS += ["vae_shift_probe"]
ENV = "halfcheetah-random-v2"
TINY = (
    f"--env-id {ENV} --exp-name sac --ensemble-size 1 --replay online-only --from-scratch "
    "--random-dataset-size 2000 --hidden-sizes 16 16 --batch-size 32 --epoch-length 200 "
    "--first-epoch-multiplier 1 --eval-episodes 1 --no-cuda"
).split()


def run(work, *flags, script="off2on_finetune.py", base=TINY):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "minari"), "HF_HUB_OFFLINE": "1"}
    env |= {"WANDB_MODE": "offline", "WANDB_DIR": str(work), "OMP_NUM_THREADS": "1"}
    env["WANDB_SILENT"] = "true"
    command = [sys.executable, os.path.join(ROOT, script), *base, *flags]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def wandb_records(path):
    """The records of an offline W&B run file: LevelDB's log format (32 KB blocks of chunks, each
    with a 7-byte header: CRC, length, type), after W&B's 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, record = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer or padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        record = chunk if kind in (1, 2) else record + chunk  # a first chunk starts a record
        pos += 7 + length
        if kind in (1, 4):  # a full record, or its last chunk
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed


def wandb_history(run_dir) -> list[dict]:
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): item.value_json
                    for item in record.history.item
                }
            )
    return rows


def tensorboard_steps(run_dir, tag):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for name in sorted(glob.glob(os.path.join(run_dir, "*tfevents*"))):
        for event in EventFileLoader(name).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A run of 2 epochs with --track and --capture-video --video-every 2 (evaluations at steps
    0, 200, 400), then resumed to 3 epochs (600)."""
    work = tmp_path_factory.mktemp("tracked")
    dataset = f"--env-id {ENV} --random-dataset-size 2000 --dataset-only".split()
    run(work, script="cql_pretrain.py", base=dataset)
    flags = ["--track", "--capture-video", "--video-every", "2"]
    first = run(work, "--total-timesteps", "400", *flags)
    again = run(work, "--total-timesteps", "600", "--resume", *flags)
    (run_dir,) = glob.glob(str(work / "runs" / f"{ENV}__sac__1__*"))
    return dict(work=work, first=first, again=again, run_dir=run_dir)


def test_wandb_history_holds_the_evaluations_at_the_tensorboard_steps(tracked):
    runs = sorted(glob.glob(str(tracked["work"] / "wandb" / "offline-run-*")))
    assert len(runs) == 2  # the first run, and the resumed one
    steps = []
    for run_dir in runs:
        rows = wandb_history(run_dir)
        steps += [int(r["global_step"]) for r in rows if "eval/normalized_score" in r]
    assert steps == tensorboard_steps(tracked["run_dir"], "eval/normalized_score")
    assert steps == [0, 200, 400, 600]


def test_a_resumed_run_continues_the_same_wandb_run(tracked):
    ids = {
        path.rsplit("-", 1)[1]
        for path in glob.glob(str(tracked["work"] / "wandb" / "offline-run-*"))
    }
    assert len(ids) == 1


def test_videos_of_the_first_last_and_every_second_evaluation(tracked):
    import imageio.v3 as iio

    folder = tracked["run_dir"].replace(os.sep + "runs" + os.sep, os.sep + "videos" + os.sep)
    names = sorted(os.listdir(folder))
    # evaluations 0, 1, 2 (steps 0, 200, 400) in the first run, then 3 (600, the last)
    assert names == ["step0.mp4", "step400.mp4", "step600.mp4"]
    for name in names:
        frames = iio.imread(os.path.join(folder, name))
        assert frames.shape == (1001, 240, 240, 3)  # the reset frame, then one per step
        assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 1  # the agent moved
        assert len({f.tobytes() for f in frames[:100]}) > 50  # and not in one jump
    assert tensorboard_steps(tracked["run_dir"], "eval/video") == [0, 400, 600]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_the_flags_and_a_resume_may_change_them(script):
    module = __import__(script)
    fields = module.Args.__dataclass_fields__
    assert {"track", "wandb_project_name", "wandb_entity"} <= fields.keys()
    assert fields["wandb_project_name"].default == "off2on"
    if hasattr(module, "VideoRecorder"):
        assert {"capture_video", "video_every"} <= fields.keys()
    if hasattr(module, "NOT_SETTINGS"):
        flags = {"track", "wandb_project_name", "wandb_entity", "capture_video", "video_every"}
        assert flags & fields.keys() <= set(module.NOT_SETTINGS)
