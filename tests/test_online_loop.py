"""The online loop's bodies, called as the scripts' loops call them: the collection of online
transitions (off2on_finetune.py, awac_finetune.py, bcq_finetune.py) and one training step of
off2on_finetune.py (the RL batch, the density ratio and the batch's new priorities, the ensemble's
update), with the settings the loop builds them from. Each test guards against a bug that the
end-to-end runs pass with: their runs are too short and too noisy to show it."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

import awac_finetune
import bcq_finetune

import off2on_finetune as o2o


def toy_data(module, M=60, obs_dim=3, action_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    return module.OfflineData(
        observations=rng.normal(size=(M, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (M, action_dim)).astype(np.float32),
        rewards=rng.normal(size=M).astype(np.float32),
        next_observations=rng.normal(size=(M, obs_dim)).astype(np.float32),
        terminations=np.zeros(M, np.float32),
        env_spec=None,
        dataset_id="toy",
        ref_returns=None,
        ref_source="",
    )


def add_online(replay, n, obs_dim=3, action_dim=2, shift=2.0, seed=1):
    """n online transitions from a distribution of their own (states shifted by `shift`)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        obs, next_obs = rng.normal(shift, 1, obs_dim), rng.normal(shift, 1, obs_dim)
        replay.add(obs, rng.uniform(-1, 1, action_dim), rng.normal(), next_obs, False)


TINY = dict(hidden_sizes=(8, 8), ensemble_size=2, total_timesteps=400, epoch_length=100)


# ---------------------------------------------------------------------------------------
# 1. make_learners: the settings reach the replay
# ---------------------------------------------------------------------------------------
def test_the_density_ratios_online_samples_come_from_the_last_online_buffer_size():
    args = o2o.Args(batch_size=4, online_buffer_size=100, **TINY)
    _, replay, _, _ = o2o.make_learners(args, toy_data(o2o), args.hidden_sizes, "cpu")
    assert replay.mode == "balanced" and replay.n_offline == 60
    add_online(replay, 300)
    online = np.concatenate([replay.density_ratio_indices(args.batch_size)[0] for _ in range(300)])
    age = replay.n_offline + replay.n_online - 1 - online  # 0: the newest transition
    # the last 100 transitions, all of them drawn (1,200 draws), not just the last batch_size
    assert age.min() == 0 and age.max() == 99


# ---------------------------------------------------------------------------------------
# 2. train_step: the RL batch's priorities, from w before the density ratio's step
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio_target", ["offline", "replay"])
def test_the_rl_batch_gets_priorities_of_its_own_w_from_before_the_ratio_step(ratio_target):
    torch.manual_seed(0)
    # a large density-ratio step, so that w after it is far from w before it
    args = o2o.Args(batch_size=32, density_ratio_lr=0.05, ratio_target=ratio_target, **TINY)
    learners = o2o.make_learners(args, toy_data(o2o), args.hidden_sizes, "cpu")
    agents, replay, density_ratio, ratio_optimizer = learners
    add_online(replay, 100)
    for _ in range(3):  # priorities that differ from transition to transition
        o2o.train_step(*learners, args)
    drawn = {}
    sample_indices, density_ratio_indices = replay.sample_indices, replay.density_ratio_indices
    replay.sample_indices = lambda n: drawn.setdefault("rl", sample_indices(n))
    replay.density_ratio_indices = lambda n, t: drawn.setdefault(
        "ratio", density_ratio_indices(n, t)
    )
    before = copy.deepcopy(density_ratio)
    logs, n_offline = o2o.train_step(*learners, args)

    idx, (_, off_idx) = drawn["rl"], drawn["ratio"]
    with torch.no_grad():
        w_batch, w_offline = (before(*replay.get(i, o2o.FIELDS[:2])) for i in (idx, off_idx))
        expected = o2o.priority(w_batch, w_offline, args.temperature).numpy()
    np.testing.assert_allclose(replay.tree.get(idx), expected, rtol=1e-5)
    # the test can tell the two apart: the step changed w by more than the tolerance
    with torch.no_grad():
        after = o2o.priority(
            *(density_ratio(*replay.get(i, o2o.FIELDS[:2])) for i in (idx, off_idx)),
            args.temperature,
        )
    assert np.abs(after.numpy() / expected - 1).max() > 1e-3
    assert expected.std() > 1e-3  # and the batch's priorities differ from one another
    assert n_offline == int((idx < replay.n_offline).sum())
    assert {"density_ratio_loss", "w_online_mean", "w_offline_mean", "qf_loss"} <= logs.keys()
    assert all(not v.requires_grad for v in logs.values())


def test_without_balanced_replay_no_priorities_and_no_density_ratio_step():
    args = o2o.Args(replay="uniform", batch_size=16, **TINY)
    learners = o2o.make_learners(args, toy_data(o2o), args.hidden_sizes, "cpu")
    density_ratio = learners[2]
    add_online(learners[1], 20)
    before = copy.deepcopy(density_ratio.state_dict())
    logs, _ = o2o.train_step(*learners, args)
    assert "density_ratio_loss" not in logs and not hasattr(learners[1], "tree")
    assert all(torch.equal(v, density_ratio.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------
# 3. Off2OnEnsemble.update: the actors and alpha step against the critics after their step
# ---------------------------------------------------------------------------------------
def grads(module):
    return [p.grad.clone() for p in module.parameters()]


def test_the_actor_step_follows_the_critic_step():
    torch.manual_seed(0)
    agents = o2o.Off2OnEnsemble(3, 2, (8, 8), ensemble_size=2, q_lr=0.05)
    B = 16
    batch = [torch.randn(B, 3), torch.rand(B, 2) * 2 - 1, torch.randn(B), torch.randn(B, 3)]
    batch.append((torch.rand(B) < 0.3).float())
    noise = agents.draw_noise(B)
    twin, unstepped = copy.deepcopy(agents), copy.deepcopy(agents)
    agents.update(batch, noise)

    qf_loss, _ = twin.critic_loss(*batch, noise)
    twin.qf_optimizer.zero_grad()
    qf_loss.backward()
    for mine, theirs in zip(grads(agents.qf), grads(twin.qf)):
        torch.testing.assert_close(mine, theirs)  # the critics' loss, from the actors before
    twin.qf_optimizer.step()
    for copy_ in (twin, unstepped):
        actor_loss, alpha_loss, _ = copy_.actor_loss(batch[0], noise)
        (actor_loss + alpha_loss).backward()
    for mine, theirs, old in zip(grads(agents.actor), grads(twin.actor), grads(unstepped.actor)):
        torch.testing.assert_close(mine, theirs)  # the actors' loss, from the critics after
        assert not torch.allclose(theirs, old, rtol=1e-3, atol=1e-6)  # which differ
    torch.testing.assert_close(agents.log_alpha.grad, twin.log_alpha.grad)


# ---------------------------------------------------------------------------------------
# 4. collect: a time limit ends the episode but is stored as no termination
# ---------------------------------------------------------------------------------------
class Recorder(gym.Wrapper):
    """Remembers every step's action, terminated and truncated flags."""

    def __init__(self, env):
        super().__init__(env)
        self.steps = []

    def step(self, action):
        result = self.env.step(action)
        self.steps.append((np.array(action), result[2], result[3]))
        return result


REPLAYS = {
    "off2on_finetune": lambda data: o2o.BalancedReplay(data, 200, "uniform"),
    "awac_finetune": lambda data: awac_finetune.Replay(data, 200, 0, "cpu"),
    "bcq_finetune": lambda data: bcq_finetune.UniformReplay(data, 200, 0, "cpu"),
}


@pytest.mark.parametrize("module", [o2o, awac_finetune, bcq_finetune], ids=lambda m: m.__name__)
def test_collect_stores_terminations_not_time_limits_and_starts_new_episodes(module):
    # Hopper with a 30-step limit: episodes that fall (terminated) and that run out (truncated)
    env = Recorder(gym.make("Hopper-v5", max_episode_steps=30))
    replay = REPLAYS[module.__name__](toy_data(module, M=5, obs_dim=11, action_dim=3))
    rng = np.random.default_rng(0)
    act = lambda obs: rng.uniform(-1.5, 1.5, 3).astype(np.float32)  # noqa: E731
    obs, episode_return = env.reset(seed=0)[0], 0.0
    obs, episode_return, finished = module.collect(env, act, replay, obs, episode_return, 70)

    actions, terminated, truncated = (np.array(x) for x in zip(*env.steps))
    ends = np.flatnonzero(terminated | truncated)
    assert terminated.any() and (truncated & ~terminated).any(), "the test needs both kinds"
    stored = {k: v[5:75].numpy() for k, v in replay.storage.items()}
    assert replay.n_online == 70
    np.testing.assert_array_equal(stored["terminations"], terminated.astype(np.float32))
    # actions are stored as drawn, and clipped to the action space for the env
    assert np.abs(stored["actions"]).max() > 1 and np.abs(actions).max() <= 1
    np.testing.assert_allclose(actions, np.clip(stored["actions"], -1, 1), atol=1e-6)
    # after an episode's end, a new episode: s of the next transition is a reset state
    for t in range(69):
        continues = np.allclose(stored["observations"][t + 1], stored["next_observations"][t])
        assert continues == (t not in ends), t
    # each finished episode: its length so far, and the sum of its rewards
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert [t for t, _ in finished] == (ends + 1).tolist()
    for (_, ret), a, b in zip(finished, starts, ends):
        assert ret == pytest.approx(stored["rewards"][a : b + 1].sum(), rel=1e-5)
    assert episode_return == pytest.approx(stored["rewards"][ends[-1] + 1 :].sum(), rel=1e-5)
    np.testing.assert_allclose(obs, env.unwrapped._get_obs(), rtol=1e-6)
