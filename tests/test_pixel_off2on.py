"""pixel_off2on.py: vectorized conv networks against per-member twins, the frame-indexed replay,
member selection, the CQL term's shared encodings, and an end-to-end tiny run."""

import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import member_mlp, require_rendering

require_rendering()  # one line saying why, before pixel_off2on imports MuJoCo
pytestmark = pytest.mark.pixels

import pixel_off2on as px  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def member_encoder(encoder: px.VectorizedEncoder, i: int) -> nn.Module:
    """Member i of a vectorized encoder as three plain nn.Conv2d with the same weights."""
    convs = []
    for conv in encoder.convs:
        c_out, c_in = conv.out_channels // conv.groups, conv.in_channels // conv.groups
        plain = nn.Conv2d(c_in, c_out, 3, dtype=conv.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(conv.weight[i * c_out : (i + 1) * c_out])
            plain.bias.copy_(conv.bias[i * c_out : (i + 1) * c_out])
        convs.append(plain)

    def forward(frames):  # [B, 3, 48, 48] uint8 -> [B, 1024]
        x = frames.to(convs[0].weight.dtype) / 255
        x = F.max_pool2d(F.relu(convs[0](x)), 2)
        x = F.max_pool2d(F.relu(convs[1](x)), 2)
        return F.relu(convs[2](x)).flatten(1)

    return forward


def frames(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*shape, 3, 48, 48), dtype=torch.uint8, generator=generator)


def test_vectorized_encoder_equals_per_member_convs(f64):
    N, B = 3, 5
    encoder = px.VectorizedEncoder(N).double()
    x = frames(N, B)
    out = encoder(x)
    assert out.shape == (N, B, px.ENCODER_FEATURES)
    for i in range(N):
        torch.testing.assert_close(out[i], member_encoder(encoder, i)(x[i]))
    # members differ (own initialization), and member i sees only its own frames
    assert not torch.allclose(out[0], out[1])
    x2 = x.clone()
    x2[1] = frames(B, seed=1)
    torch.testing.assert_close(encoder(x2)[[0, 2]], out[[0, 2]])


def test_critic_and_actor_equal_per_member_twins(f64):
    N, B, A = 2, 4, 4
    qf, actor = px.Critic(A, (16, 8), N).double(), px.Actor(A, (16, 8), N).double()
    x, a = frames(N, B), torch.rand(N, B, A) * 2 - 1
    q = qf(x, a)
    mean, log_std = actor(x)
    assert q.shape == (N, 2, B)
    for i in range(N):
        for k in range(2):
            m = 2 * i + k
            features = member_encoder(qf.encoder, m)(x[i])
            expected = member_mlp(qf.net, m)(torch.cat([features, a[i]], -1)).squeeze(-1)
            torch.testing.assert_close(q[i, k], expected)
        out = member_mlp(actor.net, i)(member_encoder(actor.encoder, i)(x[i]))
        torch.testing.assert_close(mean[i], out[:, :A])
        torch.testing.assert_close(log_std[i], out[:, A:].clamp(px.LOG_STD_MIN, px.LOG_STD_MAX))


def test_q_data_and_proposals_encodes_once_and_equals_direct_evaluation(f64):
    N, B, A, K = 2, 3, 4, 5
    qf = px.Critic(A, (16,), N).double()
    x, a, proposals = frames(N, B), torch.rand(N, B, A) * 2 - 1, torch.rand(N, K, B, A) * 2 - 1
    q = px.q_data_and_proposals(qf, x, a, proposals)
    assert q.shape == (N, 2, K + 1, B)
    torch.testing.assert_close(q[:, :, 0], qf(x, a))
    for j in range(K):
        torch.testing.assert_close(q[:, :, 1 + j], qf(x, proposals[:, j]))


def test_load_pretrained_takes_the_chosen_members_conv_channels_included(f64):
    pretrained = px.CQLEnsemble(4, (16,), 3)
    state = pretrained.state_dict()
    networks = {k: state[k] for k in ("actor", "qf", "qf_target")}
    checkpoint = {"metadata": {"ensemble_size": 3}, **networks}
    agents = px.Off2OnEnsemble(4, (16,), 2)
    agents.load_pretrained(checkpoint, [2, 0])
    x, a = frames(1, 6)[0], torch.rand(6, 4) * 2 - 1
    x3, a3, x2, a2 = (px.members_view(v, n) for n in (3, 2) for v in (x, a))
    with torch.no_grad():
        q_all, q_new = pretrained.qf(x3, a3), agents.qf(x2, a2)
        torch.testing.assert_close(q_new, q_all[[2, 0]])
        torch.testing.assert_close(agents.qf_target(x2, a2), q_new)
        torch.testing.assert_close(agents.actor(x2)[0], pretrained.actor(x3)[0][[2, 0]])


# ---------------------------------------------------------------------------------------
# The replay: each frame stored once, next frames found by index
# ---------------------------------------------------------------------------------------
def tagged_frame(value):
    return np.full((3, 48, 48), value, np.uint8)


def fake_episodes(lengths):
    """Episodes whose frame t of episode e is filled with 10 e + t, so a frame names itself."""
    episodes = []
    for e, T in enumerate(lengths):
        episode = SimpleNamespace(
            observations=np.stack([tagged_frame(10 * e + t) for t in range(T + 1)]),
            actions=np.full((T, 4), e / 10, np.float32),
            rewards=np.arange(T, dtype=np.float32) + 100 * e,
            terminations=np.eye(T, dtype=np.float32)[-1] * (e % 2),
        )
        episodes.append(episode)
    return episodes


def test_offline_transitions_index_the_right_next_frame_across_episodes():
    data = px.FrameData(**px.episodes_to_frames(fake_episodes([3, 2, 4])), dataset_id="fake")
    assert len(data) == 9 and len(data.frames) == 12  # every frame once: T + 1 per episode
    replay = px.PixelReplay(data, online_capacity=10, online_episodes=2, mode="uniform")
    obs, actions, rewards, next_obs, terminations = replay.get(np.arange(9))
    tags = [(e, t) for e, T in enumerate([3, 2, 4]) for t in range(T)]
    for j, (e, t) in enumerate(tags):
        # s' is the episode's next frame, never the next episode's first frame
        assert obs[j, 0, 0, 0] == 10 * e + t and next_obs[j, 0, 0, 0] == 10 * e + t + 1
        assert rewards[j] == 100 * e + t and actions[j, 0] == pytest.approx(e / 10)
        assert terminations[j] == (t == [3, 2, 4][e] - 1 and e % 2)


def test_online_episodes_append_frames_and_index_them():
    data = px.FrameData(**px.episodes_to_frames(fake_episodes([2])), dataset_id="fake")
    sizes = dict(online_capacity=5, online_episodes=2, mode="balanced", epoch_length=3)
    replay = px.PixelReplay(data, **sizes)
    for e, T in ((5, 3), (6, 2)):  # two online episodes, frames tagged 10 e + t
        replay.start_episode(tagged_frame(10 * e))
        for t in range(T):
            replay.add(np.zeros(4), float(t), tagged_frame(10 * e + t + 1), t == T - 1)
    assert replay.n_online == 5 and replay.n_frames == 3 + 4 + 3
    obs, _, rewards, next_obs, terminations = replay.get(np.arange(2, 7))
    assert obs[:, 0, 0, 0].tolist() == [50, 51, 52, 60, 61]
    assert next_obs[:, 0, 0, 0].tolist() == [51, 52, 53, 61, 62]
    assert terminations.tolist() == [0, 0, 1, 0, 1] and rewards.tolist() == [0, 1, 2, 0, 1]
    # new transitions enter at P_new = M_off f / ((1 - f) epoch_length): f of the next batches
    assert replay.tree.get(np.arange(2, 7)) == pytest.approx([2 * 0.75 / (0.25 * 3)] * 5)
    # and the state round-trips
    other = px.PixelReplay(data, **sizes)
    other.load_state_dict(replay.state_dict())
    for x, y in zip(replay.get(np.arange(7)), other.get(np.arange(7))):
        assert torch.equal(x, y)
    assert other.tree.total == pytest.approx(replay.tree.total)


# ---------------------------------------------------------------------------------------
# The online loop's bodies: an episode's collection, one training step
# ---------------------------------------------------------------------------------------
def test_collect_episode_stores_a_time_limit_as_no_termination():
    env = gym.make(px.pixel_envs.TASKS["pick-place"], max_episode_steps=4)
    flags = []
    step = env.step
    env.step = lambda action: flags.append(step(action)) or flags[-1]
    data = px.FrameData(**px.episodes_to_frames(fake_episodes([3])), dataset_id="fake")
    replay = px.PixelReplay(data, online_capacity=10, online_episodes=2, mode="uniform")
    rng = np.random.default_rng(0)
    episode_return, steps = px.collect_episode(env, lambda frame: rng.uniform(-1, 1, 4), replay, 0)
    assert steps == 4 and replay.n_online == 4
    assert [f[3] for f in flags] == [False, False, False, True]  # truncated by the time limit
    obs, _, rewards, next_obs, terminations = replay.get(np.arange(3, 7))
    assert terminations.tolist() == [0.0] * 4  # stored as no termination
    for j, f in enumerate(flags):  # each stored s' is the frame the env returned
        assert torch.equal(next_obs[j], torch.as_tensor(f[0]))
        assert rewards[j].item() == pytest.approx(f[1])
    assert torch.equal(obs[1:], next_obs[:-1])
    assert episode_return == pytest.approx(sum(f[1] for f in flags))


def test_train_step_gives_the_rl_batch_priorities_of_its_w_before_the_ratio_step():
    torch.manual_seed(0)
    args = px.Args(batch_size=8, hidden_sizes=(8, 8), ensemble_size=2, density_ratio_lr=0.05)
    data = px.FrameData(**px.episodes_to_frames(fake_episodes([6, 6])), dataset_id="fake")
    replay = px.PixelReplay(data, online_capacity=10, online_episodes=1, epoch_length=10)
    replay.start_episode(frames(1, seed=1)[0, 0])
    for j, frame in enumerate(frames(1, 10, seed=2)[0]):
        replay.add(np.full(4, j / 10 - 0.5), 0.0, frame, False)
    agents = px.Off2OnEnsemble(4, (8, 8), 2)
    density_ratio = px.DensityRatio(4, (8, 8))
    optimizer = torch.optim.Adam(density_ratio.parameters(), lr=args.density_ratio_lr)
    learners = (agents, replay, density_ratio, optimizer)
    px.train_step(*learners, args)  # priorities that differ from transition to transition
    drawn = {}
    sample_indices, density_ratio_indices = replay.sample_indices, replay.density_ratio_indices
    replay.sample_indices = lambda n: drawn.setdefault("rl", sample_indices(n))
    replay.density_ratio_indices = lambda n: drawn.setdefault("ratio", density_ratio_indices(n))
    before = copy.deepcopy(density_ratio)
    px.train_step(*learners, args)

    idx, off_idx = drawn["rl"], drawn["ratio"][1]
    with torch.no_grad():
        w_batch, w_offline = (before(*replay.get(i)[:2]) for i in (idx, off_idx))
        expected = px.priority(w_batch, w_offline, args.temperature).numpy()
        w_batch, w_offline = (density_ratio(*replay.get(i)[:2]) for i in (idx, off_idx))
        after = px.priority(w_batch, w_offline, args.temperature).numpy()
    np.testing.assert_allclose(replay.tree.get(idx), expected, rtol=1e-5)
    assert np.abs(after / expected - 1).max() > 1e-3  # the test can tell before from after


# ---------------------------------------------------------------------------------------
# End to end: python pixel_off2on.py on a tiny generated dataset
# ---------------------------------------------------------------------------------------
TINY = "--task pick-place --dataset-size 300 --ensemble-size 2 --hidden-sizes 32 32 --batch-size 8"
TINY += " --offline-steps 3 --bc-steps 1 --cql-n-actions 2 --eval-episodes 1 --eval-every 1"
TINY += " --no-cuda"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory where the first run has generated the data, pretrained and fine-tuned
    2 episodes."""
    work = tmp_path_factory.mktemp("pixel")
    return SimpleNamespace(path=work, first_run=run(work, "--online-episodes", "2"))


def run(work, *args):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "minari"), "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, os.path.join(ROOT, "pixel_off2on.py"), *TINY.split(), *args]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=400)


def test_end_to_end_pretrains_finetunes_logs_and_resumes(work):
    out, work = work.first_run, work.path
    assert out.returncode == 0, out.stderr
    assert "pretraining 2 CQL agents on pixels" in out.stdout
    assert "eval after 2 episodes" in out.stdout
    assert (work / "checkpoints/cql__pick-place__n2__seed1.pt").exists()
    path = work / "checkpoints/pixel_off2on__pick-place__n2__seed1.pt"
    state = torch.load(path, weights_only=True)
    assert state["episode"] == 2 and state["metadata"]["obs_shape"] == [3, 48, 48]
    replay = state["replay"]
    assert replay["frames"].dtype == torch.uint8
    assert len(replay["frames"]) == len(replay["rewards"]) + 2  # T + 1 frames an episode

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (work / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"eval/success_rate", "charts/offline_fraction", "charts/episodic_return"}
    expected |= {"charts/SPS", "charts/w_online_mean", "charts/w_offline_mean"}
    expected |= {"losses/qf_loss", "losses/actor_loss", "losses/alpha", "losses/density_ratio_loss"}
    assert expected <= tags
    # before any online step, then after each episode
    assert len(events.Scalars("eval/success_rate")) == 3

    again = run(work, "--online-episodes", "2")
    assert again.returncode == 1 and "pass --resume" in again.stderr
    resumed = run(work, "--online-episodes", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout and "after episode 2" in resumed.stdout
    assert "episode 3/3" in resumed.stdout
    other = run(work, "--online-episodes", "3", "--resume", "--temperature", "2")
    assert other.returncode == 1 and "temperature" in other.stderr


def test_a_resumed_run_is_the_run_left_alone(work):
    """After the test above: 2 episodes, then resumed to 3, against 3 episodes in one go. Each
    episode starts from env.reset(seed + episode) and the state is saved between episodes, so
    nothing of a running episode needs saving."""
    alone = run(work.path, "--online-episodes", "3", "--exp-name", "alone")
    assert alone.returncode == 0, alone.stderr
    states = [
        torch.load(work.path / f"checkpoints/{name}__pick-place__n2__seed1.pt", weights_only=True)
        for name in ("pixel_off2on", "alone")
    ]
    assert states[0]["episode"] == states[1]["episode"] == 3
    for part in ("actor", "qf", "qf_target", "density_ratio"):
        for key, value in states[0][part].items():
            assert torch.equal(value, states[1][part][key]), (part, key)
    for key, value in states[0]["replay"].items():
        other = states[1]["replay"][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    assert torch.equal(states[0]["rng"]["torch"], states[1]["rng"]["torch"])
    done = run(work.path, "--online-episodes", "3", "--exp-name", "alone", "--resume")
    assert done.returncode == 0, done.stderr
    assert (
        "alone__pick-place__n2__seed1.pt is complete (3 episodes): nothing to resume" in done.stdout
    )


def test_online_only_cql_loss_from_the_saved_checkpoint(work):
    flags = "--online-episodes 1 --replay online-only --finetune-loss cql --exp-name cql-online"
    out = run(work.path, *flags.split())
    assert out.returncode == 0, out.stderr
    assert "Fine-tuning members [0, 1] of checkpoints/cql__pick-place__n2__seed1.pt" in out.stdout
    assert "offline fraction 0.00" in out.stdout


def test_checkpoint_with_other_networks_fails_naming_both(work):
    out = run(work.path, *"--online-episodes 1 --exp-name wide --hidden-sizes 64 64".split())
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "hidden_sizes=[32, 32], but this run has hidden_sizes=[64, 64]" in out.stderr


def test_capture_video_records_the_agents_view_and_a_larger_one(work):
    import imageio.v3 as iio

    out = run(work.path, *"--online-episodes 1 --exp-name video --capture-video".split())
    assert out.returncode == 0, out.stderr
    (folder,) = (work.path / "videos").iterdir()
    # the evaluation before any online step and after the one episode (40 steps)
    steps = sorted(int(name.split("_")[0][4:]) for name in os.listdir(folder))
    assert steps == [0, 0, 40, 40]
    for size in (48, 256):
        frames = iio.imread(folder / f"step0_{size}.mp4")
        assert frames.shape == (41, size, size, 3)  # the reset frame, then one per step
        assert len({f.tobytes() for f in frames}) > 20  # the gripper moves


def test_sumtree_sums_stay_exact_with_repeated_indices():
    """This file's sum tree (its own copy): after random batch updates with repeated indices, every
    internal node equals the sum of its two children and every leaf holds the last value written."""
    rng = np.random.default_rng(0)
    tree, leaves = px.SumTree(100), np.zeros(100)
    for _ in range(200):
        idx = rng.integers(0, 100, 32)
        idx[-4:] = idx[0]  # repeats within the batch
        values = rng.exponential(size=32) * (rng.random(32) < 0.8)
        tree.update(idx, values)
        for i, v in zip(idx, values):
            leaves[i] = v
    np.testing.assert_array_equal(tree.get(np.arange(100)), leaves)
    internal = np.arange(1, tree.capacity)
    children = tree.nodes[2 * internal] + tree.nodes[2 * internal + 1]
    np.testing.assert_array_equal(tree.nodes[internal], children)
