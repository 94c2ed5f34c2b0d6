"""Tests of off2on_finetune.py (paper section 4, docs/algorithm.md): the merged ensemble policy, the
pessimistic Q-ensemble losses against a per-member loop, member selection from a pretrained
checkpoint, the Q-discrimination analysis, and end-to-end runs of the script on a tiny
generated dataset (logs, checkpoints, resume, errors).
"""

import glob
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.distributions import Normal

from conftest import member_mlp
from cql_pretrain import CQLEnsemble
from off2on_finetune import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    Args,
    BalancedReplay,
    Off2OnEnsemble,
    OfflineData,
    VectorizedLinear,
    ensemble_gaussian,
    parse_members,
    q_discrimination,
    validate_args,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def assert_close(a, b, atol, rtol=0.0, msg=""):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{msg}: max abs diff {err:.3e}"


def moments_reference(mean, log_std):
    """Mixture moments, from the definition: mean_i mu_i, mean_i (sigma_i^2 + mu_i^2) - mu^2."""
    mean, log_std = mean.double(), log_std.double()
    mu = mean.mean(0)
    var = ((2 * log_std).exp() + mean**2).mean(0) - mu**2
    return mu, var


def tanh_gaussian_log_prob_ref(mu, log_std, u):
    """log density of tanh(u), u ~ N(mu, sigma): Normal log-prob - log(1 - tanh(u)^2), summed."""
    return (Normal(mu, log_std.exp()).log_prob(u) - torch.log1p(-(torch.tanh(u) ** 2))).sum(-1)


class Twins:
    """Plain per-member networks built from an Off2OnEnsemble's vectorized weights."""

    def __init__(self, agents: Off2OnEnsemble):
        N = agents.ensemble_size
        self.actors = [member_mlp(agents.actor.net, i) for i in range(N)]
        self.critics = [[member_mlp(agents.qf.net, 2 * i + k) for k in (0, 1)] for i in range(N)]
        self.targets = [
            [member_mlp(agents.qf_target.net, 2 * i + k) for k in (0, 1)] for i in range(N)
        ]

    def member_gaussian(self, i, obs):
        mean, log_std = self.actors[i](obs).chunk(2, -1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def merged(self, obs):
        means, log_stds = zip(*(self.member_gaussian(i, obs) for i in range(len(self.actors))))
        mu, var = moments_reference(torch.stack(means), torch.stack(log_stds))
        return mu, (0.5 * var.log()).clamp(LOG_STD_MIN, LOG_STD_MAX)

    @staticmethod
    def q(critic, obs, actions):
        return critic(torch.cat([obs, actions], -1)).squeeze(-1)


def make_agents(N=3, obs_dim=5, A=2, hidden=(16, 16), **kwargs):
    agents = Off2OnEnsemble(obs_dim, A, hidden, N, **kwargs)
    with torch.no_grad():  # targets different from the critics, so mixing them up shows
        for p in agents.qf_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
        agents.log_alpha.fill_(math.log(0.3))  # alpha != 1, so its place in each loss shows
    return agents


def make_batch(B=12, obs_dim=5, A=2):
    obs, next_obs = torch.randn(B, obs_dim), torch.randn(B, obs_dim)
    actions = torch.rand(B, A) * 1.9 - 0.95
    rewards = torch.randn(B)
    terminations = (torch.rand(B) < 0.4).double()
    terminations[0], terminations[1] = 1.0, 0.0
    return obs, actions, rewards, next_obs, terminations


# ---------------------------------------------------------------------------------------
# 1. ensemble_gaussian: moment matching of the equal-weight mixture
# ---------------------------------------------------------------------------------------
def test_ensemble_gaussian_matches_mixture_moments(f64):
    N, B, A = 4, 6, 3
    mean, log_std = 2 * torch.randn(N, B, A), torch.rand(N, B, A) * 2.5 - 2
    mu, log_sigma = ensemble_gaussian(mean, log_std)
    assert mu.shape == (B, A) and log_sigma.shape == (B, A)
    mu_ref, var_ref = moments_reference(mean, log_std)
    assert_close(mu, mu_ref, atol=1e-12, msg="mean")
    assert_close((2 * log_sigma).exp(), var_ref, atol=1e-10, rtol=1e-10, msg="variance")
    # the variance is not just the mean of the variances: the spread of the means counts
    assert ((2 * log_sigma).exp() > (2 * log_std).exp().mean(0) + 1e-3).all()


def test_ensemble_gaussian_matches_monte_carlo_mixture(f64):
    N, B, A, S = 3, 2, 2, 400_000
    g = torch.Generator().manual_seed(1)
    mean, log_std = torch.randn(N, B, A, generator=g), torch.rand(N, B, A, generator=g) - 1
    mu, log_sigma = ensemble_gaussian(mean, log_std)
    # equal-weight mixture: a member per sample ...
    which = torch.randint(N, (S, B, A), generator=g)
    mean_s = torch.take_along_dim(mean[None].expand(S, -1, -1, -1), which[:, None], dim=1)[:, 0]
    std_s = torch.take_along_dim(log_std.exp()[None].expand(S, -1, -1, -1), which[:, None], dim=1)[
        :, 0
    ]
    x = mean_s + std_s * torch.randn(S, B, A, generator=g)  # ... then a draw from its Gaussian
    se_mean = x.std(0) / math.sqrt(S)
    assert ((x.mean(0) - mu).abs() < 5 * se_mean).all(), (x.mean(0), mu)
    assert_close(x.var(0), (2 * log_sigma).exp(), atol=0, rtol=0.02, msg="Monte Carlo variance")


def test_ensemble_gaussian_of_one_member_is_that_member(f64):
    mean, log_std = torch.randn(1, 7, 3), torch.rand(1, 7, 3) * 4 - 3
    mu, log_sigma = ensemble_gaussian(mean, log_std)
    assert torch.equal(mu, mean[0])
    assert_close(log_sigma, log_std[0], atol=1e-12, msg="log_std")


def test_ensemble_gaussian_is_stable_for_large_close_means():
    # float32, means far from 0 and close to each other: the naive E[x^2] - mu^2 cancels to garbage
    mean = torch.tensor([1000.0, 1000.01, 999.99])[:, None, None]
    log_std = torch.full((3, 1, 1), math.log(0.01))
    mu, log_sigma = ensemble_gaussian(mean, log_std)
    _, var_ref = moments_reference(mean, log_std)
    assert abs((2 * log_sigma.double()).exp().item() - var_ref.item()) < 1e-3 * var_ref.item()


def test_ensemble_gaussian_log_std_clamp(f64):
    # merged sigma above e^2: spread-out means with log_std at the member clamp already
    mean = torch.tensor([-30.0, 30.0])[:, None, None].expand(2, 1, 2)
    _, log_sigma = ensemble_gaussian(mean, torch.full((2, 1, 2), 2.0))
    assert torch.equal(log_sigma, torch.full((1, 2), LOG_STD_MAX)) and LOG_STD_MAX == 2.0
    # merged sigma below e^-20: identical means, tiny member sigmas (representable in float64)
    _, log_sigma = ensemble_gaussian(torch.zeros(3, 1, 2), torch.full((3, 1, 2), -25.0))
    assert torch.equal(log_sigma, torch.full((1, 2), LOG_STD_MIN)) and LOG_STD_MIN == -20.0
    # in range: untouched
    _, log_sigma = ensemble_gaussian(torch.zeros(3, 1, 2), torch.full((3, 1, 2), -19.0))
    assert_close(log_sigma, torch.full((1, 2), -19.0), atol=1e-12)


def test_policy_is_merged_gaussian_of_the_member_actors(f64):
    agents = make_agents()
    twins = Twins(agents)
    obs = torch.randn(9, 5)
    mu, log_sigma = agents.policy(obs)
    mu_ref, log_sigma_ref = twins.merged(obs)
    assert_close(mu, mu_ref, atol=1e-12, msg="mean")
    assert_close(log_sigma, log_sigma_ref, atol=1e-10, msg="log_std")


def test_q_values_are_each_members_min(f64):
    agents = make_agents()
    twins = Twins(agents)
    obs, actions = torch.randn(9, 5), torch.rand(9, 2) * 2 - 1
    q = agents.q_values(obs, actions)
    assert q.shape == (3, 9)
    for i in range(3):
        expected = torch.minimum(
            twins.q(twins.critics[i][0], obs, actions), twins.q(twins.critics[i][1], obs, actions)
        )
        assert_close(q[i], expected, atol=1e-12, msg=f"member {i}")


# ---------------------------------------------------------------------------------------
# 2. the pessimistic Q-ensemble losses against a per-member loop
# ---------------------------------------------------------------------------------------
def reference_critic_loss(agents, twins, batch, noise, gamma):
    obs, actions, rewards, next_obs, terminations = batch
    N, alpha = agents.ensemble_size, agents.log_alpha.exp().item()
    mu, log_sigma = twins.merged(next_obs)
    u = mu + log_sigma.exp() * noise["target"]  # ONE a' ~ pi_E(.|s') for every member
    next_actions, next_log_pi = torch.tanh(u), tanh_gaussian_log_prob_ref(mu, log_sigma, u)
    total, gaps = 0.0, []
    for i in range(N):
        q_next = torch.minimum(*(twins.q(t, next_obs, next_actions) for t in twins.targets[i]))
        y = rewards + gamma * (1 - terminations) * (q_next - alpha * next_log_pi)
        for k in (0, 1):
            total = total + ((twins.q(twins.critics[i][k], obs, actions) - y) ** 2).mean()
        if agents.finetune_loss == "cql":
            M, A = agents.cql_n_actions, agents.action_dim
            proposals, log_density = (
                [noise["uniform"][i]],
                [torch.full(noise["uniform"][i].shape[:2], -A * math.log(2))],
            )
            for s, key in (
                (obs, "cur_cql"),
                (next_obs, "next_cql"),
            ):  # member i's own policy at s and at s'
                m, ls = twins.member_gaussian(i, s)
                u = m + ls.exp() * noise[key][i]  # [M, B, A]
                proposals.append(torch.tanh(u))
                log_density.append(tanh_gaussian_log_prob_ref(m, ls, u))
            # [3M, B, A], [3M, B]
            proposals, log_density = (torch.cat(proposals), torch.cat(log_density))
            assert proposals.shape[0] == 3 * M
            for k in (0, 1):
                # evaluated at s
                q_prop = torch.stack([twins.q(twins.critics[i][k], obs, a) for a in proposals])
                gap = (
                    torch.logsumexp(q_prop - log_density, 0)
                    - twins.q(twins.critics[i][k], obs, actions)
                ).mean()
                gaps.append(gap)
                total = total + agents.cql_alpha * gap
    return total, gaps


@pytest.mark.parametrize("finetune_loss", ["sac", "cql"])
def test_critic_loss_equals_per_member_loop(f64, finetune_loss):
    gamma = 0.97
    agents = make_agents(gamma=gamma, finetune_loss=finetune_loss, cql_alpha=2.5, cql_n_actions=3)
    twins, batch = Twins(agents), make_batch()
    noise = agents.draw_noise(12)
    # shared by all members
    assert noise["target"].shape == (12, 2) and noise["actor"].shape == (12, 2)
    if finetune_loss == "cql":
        assert (
            noise["uniform"].shape
            == noise["cur_cql"].shape
            == noise["next_cql"].shape
            == (3, 3, 12, 2)
        )
    loss, logs = agents.critic_loss(*batch, noise)
    expected, gaps = reference_critic_loss(agents, twins, batch, noise, gamma)
    assert loss.shape == ()
    assert_close(loss, expected, atol=1e-10, rtol=1e-10, msg="critic loss")
    if finetune_loss == "cql":
        assert_close(logs["cql_loss"], torch.stack(gaps).mean(), atol=1e-10, msg="logged cql gap")
        # the regularizer is added on top of the SAC loss of the same networks
        sac = make_agents(gamma=gamma, finetune_loss="sac")
        sac.load_state_dict(agents.state_dict())
        sac_loss, _ = sac.critic_loss(*batch, noise)
        assert_close(
            loss - sac_loss, 2.5 * torch.stack(gaps).sum(), atol=1e-9, msg="cql_alpha * gap"
        )
        assert torch.stack(gaps).abs().min() > 1e-3
    else:
        assert logs.get("cql_loss", torch.zeros(())).item() == 0.0


def test_actor_and_alpha_loss_equal_per_member_loop(f64):
    agents = make_agents()
    twins, (obs, *_) = Twins(agents), make_batch()
    noise = agents.draw_noise(12)
    actor_loss, alpha_loss, logs = agents.actor_loss(obs, noise)

    mu, log_sigma = twins.merged(obs)
    u = mu + log_sigma.exp() * noise["actor"]  # a ~ pi_E(.|s)
    actions, log_pi = torch.tanh(u), tanh_gaussian_log_prob_ref(mu, log_sigma, u)
    for critics in twins.critics:
        for c in critics:
            c.requires_grad_(False)
    q_members = [
        torch.minimum(*(twins.q(c, obs, actions) for c in twins.critics[i])) for i in range(3)
    ]
    q_ensemble = torch.stack(q_members).mean(0)  # mean over members of each member's min
    alpha = agents.log_alpha.exp().item()
    expected_actor = (alpha * log_pi - q_ensemble).mean()
    expected_alpha = -(
        agents.log_alpha.item() * (log_pi.detach() - 2.0)
    ).mean()  # target entropy -|A| = -2
    assert_close(actor_loss, expected_actor, atol=1e-10, rtol=1e-10, msg="actor loss")
    assert_close(alpha_loss, expected_alpha, atol=1e-10, rtol=1e-10, msg="alpha loss")
    assert_close(logs["alpha"], torch.tensor(0.3), atol=1e-12)
    assert_close(logs["entropy"], -log_pi.mean(), atol=1e-10)

    # gradients: each member's actor gets exactly the looped gradient; critics and log_alpha none
    actor_loss.backward()
    expected_actor.backward()
    vec_linears = [m for m in agents.actor.net if isinstance(m, VectorizedLinear)]
    for i, twin in enumerate(twins.actors):
        twin_linears = [m for m in twin if isinstance(m, nn.Linear)]
        for layer, (lin, vec) in enumerate(zip(twin_linears, vec_linears)):
            assert vec.weight.grad[i].abs().sum() > 0, f"member {i} layer {layer} gets no gradient"
            assert_close(
                vec.weight.grad[i],
                lin.weight.grad.T,
                atol=1e-10,
                rtol=1e-8,
                msg=f"member {i} layer {layer} weight grad",
            )
            assert_close(
                vec.bias.grad[i, 0],
                lin.bias.grad,
                atol=1e-10,
                rtol=1e-8,
                msg=f"member {i} layer {layer} bias grad",
            )
    assert all(p.grad is None for p in agents.qf.parameters()), "the actor loss reached the critics"
    assert all(p.requires_grad for p in agents.qf.parameters()), (
        "critics left frozen after the actor loss"
    )
    assert agents.log_alpha.grad is None, "the actor loss reached log_alpha"
    alpha_loss.backward()
    assert_close(
        agents.log_alpha.grad, -(log_pi.detach() - 2.0).mean(), atol=1e-10, msg="alpha gradient"
    )


def test_update_steps_every_part_and_soft_updates_targets(f64):
    tau = 0.05
    agents = make_agents(tau=tau)
    before = {
        name: [p.detach().clone() for p in net.parameters()]
        for name, net in (
            ("actor", agents.actor),
            ("qf", agents.qf),
            ("qf_target", agents.qf_target),
        )
    }
    log_alpha = agents.log_alpha.item()
    logs = agents.update(make_batch())
    assert {"qf_loss", "actor_loss", "alpha", "entropy"} <= logs.keys()
    assert all(not v.requires_grad for v in logs.values())
    for old, new in zip(before["actor"], agents.actor.parameters()):
        assert not torch.equal(old, new)
    for old, new in zip(before["qf"], agents.qf.parameters()):
        assert not torch.equal(old, new)
    for old_t, new_q, new_t in zip(
        before["qf_target"], agents.qf.parameters(), agents.qf_target.parameters()
    ):
        assert_close(new_t, (1 - tau) * old_t + tau * new_q, atol=1e-12, msg="soft target update")
    # one first Adam step of lr 3e-4
    assert abs(agents.log_alpha.item() - log_alpha) == pytest.approx(3e-4, rel=1e-4)


# ---------------------------------------------------------------------------------------
# 3. load_pretrained: member selection from a CQL checkpoint
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("members", [[2, 0], [1], [0, 1, 2]])
def test_load_pretrained_takes_the_chosen_members(f64, members):
    obs_dim, A = 5, 2
    cql = CQLEnsemble(obs_dim, A, (16, 16), 3, cql_n_actions=2)
    b = make_batch(8)
    # non-empty optimizer states, log_alpha moved away from 0
    cql.update([x.expand(3, *x.shape) for x in b])
    with torch.no_grad():
        for p in cql.qf_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    checkpoint = cql.state_dict()
    assert (checkpoint["log_alpha"] != 0).all() and checkpoint["qf_optimizer"]["state"]

    N = len(members)
    agents = Off2OnEnsemble(obs_dim, A, (16, 16), N)
    agents.load_pretrained(checkpoint, members)
    rows = [2 * i + k for i in members for k in (0, 1)]
    if members == [2, 0]:
        assert rows == [4, 5, 0, 1]
    for k, v in agents.actor.state_dict().items():
        assert torch.equal(v, checkpoint["actor"][k][members]), k
    for k, v in agents.qf.state_dict().items():
        assert torch.equal(v, checkpoint["qf"][k][rows]), k
    for k, v in agents.qf_target.state_dict().items():
        assert torch.equal(v, checkpoint["qf_target"][k][rows]), k
    # functionally: member j of the fine-tuned ensemble is agent members[j] of the CQL ensemble
    obs, actions = torch.randn(4, obs_dim), torch.rand(4, A) * 2 - 1
    cql_mean, cql_log_std = cql.actor(obs.expand(3, -1, -1))
    mean, log_std = agents.actor(obs.expand(N, -1, -1))
    assert_close(mean, cql_mean[members], atol=1e-12, msg="actor means")
    assert_close(log_std, cql_log_std[members], atol=1e-12, msg="actor log_stds")
    cql_q = cql.qf(obs.expand(3, -1, -1), actions.expand(3, -1, -1))
    assert_close(
        agents.qf(obs.expand(N, -1, -1), actions.expand(N, -1, -1)), cql_q[members], atol=1e-12
    )
    # alpha restarts at 1, optimizers are fresh and still drive the loaded parameters
    assert agents.log_alpha.shape == () and agents.log_alpha.item() == 0.0
    optimizers = {
        name: getattr(agents, name)
        for name in ("actor_optimizer", "qf_optimizer", "alpha_optimizer")
    }
    for name, opt in optimizers.items():
        assert not opt.state, f"{name} is not fresh"
    assert all(
        p is q
        for p, q in zip(agents.actor_optimizer.param_groups[0]["params"], agents.actor.parameters())
    )
    assert all(
        p is q
        for p, q in zip(agents.qf_optimizer.param_groups[0]["params"], agents.qf.parameters())
    )
    assert agents.alpha_optimizer.param_groups[0]["params"][0] is agents.log_alpha
    assert all(g["lr"] == 3e-4 for opt in optimizers.values() for g in opt.param_groups)


# ---------------------------------------------------------------------------------------
# 4. parse_members
# ---------------------------------------------------------------------------------------
def test_parse_members_valid():
    assert parse_members(None, 3) == [0, 1, 2]
    assert parse_members(None, 1) == [0]
    assert parse_members("0,2", 2) == [0, 2]
    # order kept; the checkpoint's size is checked later
    assert parse_members("4,1,3", 3) == [4, 1, 3]
    assert parse_members("2", 1) == [2]


@pytest.mark.parametrize(
    "members, n, says",
    [
        ("0,1,2", 2, "2 distinct members"),
        ("0", 2, "2 distinct members"),
        ("1,1", 2, "distinct"),
        ("0,-1", 2, "--members"),
        ("a,b", 2, "comma-separated"),
        ("0;1", 2, "comma-separated"),
        ("", 1, "comma-separated"),
        ("0,1,", 2, "comma-separated"),
        ("1.5", 1, "comma-separated"),
    ],
)
def test_parse_members_rejects_bad_lists(members, n, says):
    with pytest.raises(ValueError) as info:
        parse_members(members, n)
    message = str(info.value)
    # says what was given, and what is wanted
    assert says in message and "--members" in message and members in message


# ---------------------------------------------------------------------------------------
# 5. q_discrimination (Figure 4b)
# ---------------------------------------------------------------------------------------
def pairwise_auroc(pos, neg):
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@pytest.fixture
def small_replay():
    rng = np.random.default_rng(0)
    M, obs_dim, A = 40, 3, 2
    data = OfflineData(
        observations=rng.normal(size=(M, obs_dim)).astype(np.float32),
        actions=np.full((M, A), -0.9, np.float32),
        rewards=np.zeros(M, np.float32),
        next_observations=rng.normal(size=(M, obs_dim)).astype(np.float32),
        terminations=np.zeros(M, np.float32),
        env_spec=None,
        dataset_id="toy",
        ref_returns=None,
        ref_source="",
    )
    replay = BalancedReplay(data, online_capacity=60, mode="uniform")
    online_actions = np.clip(0.5 + 0.05 * rng.normal(size=(50, A)), -1, 1).astype(np.float32)
    for j in range(50):
        replay.add(
            rng.normal(size=obs_dim), online_actions[j], 0.0, rng.normal(size=obs_dim), False
        )
    return replay, online_actions


def test_q_discrimination_auroc_near_one_when_q_prefers_data_actions(small_replay, monkeypatch):
    replay, _ = small_replay
    agents = Off2OnEnsemble(3, 2, (8,), 3)
    monkeypatch.setattr(
        agents, "q_values", lambda obs, actions: -(actions - 0.5).abs().sum(-1).expand(3, -1)
    )
    ens, m0 = q_discrimination(agents, replay, 30, np.random.default_rng(0))
    assert ens > 0.99 and m0 > 0.99


def test_q_discrimination_scores_and_samples(small_replay, monkeypatch):
    replay, online_actions = small_replay
    agents = Off2OnEnsemble(3, 2, (8,), 3)
    calls = []

    def q_values(obs, actions):
        d = (actions - 0.5).abs().sum(-1)
        # member 0 prefers the data, members 1-2 avoid it
        q = torch.stack([-d, 2 * d + 0.1 * obs[:, 0], 2 * d])
        calls.append((obs, actions, q))
        return q

    monkeypatch.setattr(agents, "q_values", q_values)
    ens, m0 = q_discrimination(agents, replay, 30, np.random.default_rng(0), n_random=10)
    ((obs, actions, q),) = calls
    n = 30
    assert obs.shape == (n * 11, 3) and actions.shape == (n * 11, 2)
    # positives: 30 distinct online transitions (state with its own action), never offline ones
    online_obs = replay.storage["observations"][replay.n_offline : replay.n_offline + 50]
    rows = [int(torch.nonzero((online_obs == o).all(-1))[0]) for o in obs[:n]]
    assert len(set(rows)) == n
    assert_close(actions[:n], torch.as_tensor(online_actions[rows]), atol=0)
    # negatives: each state repeated with 10 uniform random actions in [-1, 1]
    assert torch.equal(obs[n:], obs[:n].repeat_interleave(10, 0))
    neg = actions[n:]
    assert neg.min() >= -1 and neg.max() <= 1 and neg.min() < -0.8 and neg.max() > 0.8
    # the ensemble score is the mean over members, the single one member 0
    qe = q.mean(0).numpy()
    assert ens == pytest.approx(pairwise_auroc(qe[:n], qe[n:]), abs=1e-12)
    assert m0 == pytest.approx(pairwise_auroc(q[0, :n].numpy(), q[0, n:].numpy()), abs=1e-12)
    assert m0 > 0.99 and ens < 0.01  # the mean is dominated by the members that avoid the data


def test_q_discrimination_uses_at_most_the_online_transitions(small_replay, monkeypatch):
    replay, _ = small_replay
    agents = Off2OnEnsemble(3, 2, (8,), 3)
    sizes = []
    monkeypatch.setattr(
        agents, "q_values", lambda obs, actions: sizes.append(len(obs)) or torch.zeros(3, len(obs))
    )
    ens, m0 = q_discrimination(agents, replay, 1000, np.random.default_rng(0), n_random=10)
    assert sizes == [50 * 11] and ens == m0 == 0.5  # all ties


# ---------------------------------------------------------------------------------------
# 6. end to end: python off2on_finetune.py on a tiny generated dataset
# ---------------------------------------------------------------------------------------
ENV = "halfcheetah-random-v2"
TINY = (
    "--random-dataset-size 3000 --ensemble-size 2 --hidden-sizes 32 32 --offline-steps 20 "
    "--bc-steps 10 --cql-n-actions 2 --epoch-length 200 --first-epoch-multiplier 2 "
    "--batch-size 32 --auroc-every 1 --eval-episodes 1 --no-cuda"
).split()
PRETRAIN_TINY = (
    "--random-dataset-size 3000 --ensemble-size 2 --hidden-sizes 32 32 --batch-size 16 "
    "--cql-n-actions 2 --bc-steps 5 --log-every 5 --eval-every 10 --eval-episodes 1 "
    "--save-every 5 --total-steps 10 --no-cuda"
).split()
# what the inline pretraining of TINY runs, as a cql_pretrain.py command of its own
AS_INLINE = (
    "--random-dataset-size 3000 --ensemble-size 2 --hidden-sizes 32 32 --batch-size 32 "
    "--cql-n-actions 2 --bc-steps 10 --eval-episodes 1 --total-steps 20 --no-cuda"
).split()
D4RL_REFS = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3)}
INLINE_CKPT = f"checkpoints/cql__{ENV}__n2__seed1.pt"


def finetune(flags="", env_id=ENV, total=400):
    script = os.path.join(ROOT, "off2on_finetune.py")
    total = ["--total-timesteps", str(total)]
    return [sys.executable, script, "--env-id", env_id, *TINY, *total, *flags.split()]


def pretrain(flags="", env_id=ENV, tiny=PRETRAIN_TINY):
    script = os.path.join(ROOT, "cql_pretrain.py")
    return [sys.executable, script, "--env-id", env_id, *tiny, *flags.split()]


def state_path(exp_name, env_id=ENV, n=2):
    return f"checkpoints/{exp_name}__{env_id}__n{n}__seed1.pt"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """All subprocess runs, a few at a time, in dependency phases; one working directory
    (checkpoints/ and runs/ in it) and one Minari folder, so each dataset is generated once."""
    work = tmp_path_factory.mktemp("finetune")
    minari_dir = str(work / "minari")
    env = {**os.environ, "MINARI_DATASETS_PATH": minari_dir, "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    empty_env = {**env, "MINARI_DATASETS_PATH": str(work / "empty_minari")}
    results = {"work": work}

    def run_phase(jobs):
        def one(item):
            name, cmd = item
            job_env = empty_env if name.startswith("missing") else env
            run = dict(cwd=work, env=job_env, capture_output=True, text=True, timeout=400)
            return name, subprocess.run(cmd, **run)

        with ThreadPoolExecutor(max_workers=4) as pool:
            results.update(pool.map(one, jobs.items()))

    (work / "notes.txt").write_text("not a D4RL file\n")
    (work / "corrupt.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a zip cut short
    # phase 0: cql_pretrain.py checkpoints (each makes its env's dataset, once), and the errors
    # that need no data
    run_phase(
        {
            "pretrain": pretrain("--checkpoint-path pre.pt"),
            "hopper_pretrain": pretrain("--checkpoint-path hopper.pt", "hopper-random-v2"),
            "bad_replay": finetune("--exp-name bad --replay prioritized"),
            "missing_dataset": finetune("--exp-name missing", "hopper-medium-v2"),
            "missing_random": finetune("--exp-name missing --from-scratch", "walker2d-random-v2"),
            "bad_total": finetune("--exp-name bad_total", total=300),
            "bad_env": finetune("--exp-name bad_env", "nosuchenv-random-v2"),
            "no_such_path": finetune("--exp-name no_path --dataset-path nothere.hdf5"),
            "not_hdf5": finetune("--exp-name not_hdf5 --dataset-path notes.txt"),
            "corrupt_ckpt": finetune("--exp-name corrupt --checkpoint corrupt.pt"),
        }
    )
    # phase 1: fine-tuning runs (inline pretraining when no checkpoint is given or found)
    run_phase(
        {
            "inline": finetune("--exp-name inline"),
            "uniform": finetune("--exp-name uniform --replay uniform --checkpoint pre.pt"),
            "variants": finetune(
                "--exp-name variants --ratio-target replay --finetune-loss cql --members 1,0 "
                "--checkpoint pre.pt"
            ),
            "scratch": finetune(
                "--exp-name scratch --from-scratch --replay online-only", "hopper-random-v2"
            ),
            "resume1": finetune("--exp-name resume --checkpoint pre.pt", total=200),
            "other_env_ckpt": finetune("--exp-name other_env --checkpoint hopper.pt"),
            "too_few_members": finetune(
                "--exp-name few --checkpoint pre.pt --ensemble-size 3 --members 0,1,2"
            ),
            "as_inline": pretrain("--checkpoint-path as_inline.pt", tiny=AS_INLINE),
        }
    )
    inline_state = work / state_path("inline")
    mtime = inline_state.stat().st_mtime_ns if inline_state.exists() else None
    results["inline_state_mtime"] = mtime
    # phase 2: what needs phase 1's fine-tuning states
    run_phase(
        {
            "resume2": finetune("--exp-name resume --checkpoint pre.pt --resume"),
            "exists": finetune("--exp-name inline"),
            "resume_changed": finetune("--exp-name inline --resume --temperature 2"),
            "from_as_inline": finetune("--exp-name from_as_inline --checkpoint as_inline.pt"),
        }
    )
    results["resume_events"] = sorted(glob.glob(str(work / "runs" / f"{ENV}__resume__1__*/*")))
    run_phase({"resume_done": finetune("--exp-name resume --checkpoint pre.pt --resume")})
    return results


def ok(out):
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


def scalars(work, exp_name, env_id=ENV):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = glob.glob(str(work / "runs" / f"{env_id}__{exp_name}__1__*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def steps(series):
    return [s for s, _ in series]


def check_common_logs(tags, env_name="halfcheetah"):
    """Tags every run logs, at the steps of the paper's schedule (2 epochs of 200 steps here)."""
    # step 0: the offline ensemble, before any online step
    assert steps(tags["eval/return"]) == [0, 200, 400]
    assert steps(tags["eval/normalized_score"]) == [0, 200, 400]
    lo, hi = D4RL_REFS[env_name]
    for (_, ret), (_, score) in zip(tags["eval/return"], tags["eval/normalized_score"]):
        assert score == pytest.approx(100 * (ret - lo) / (hi - lo), rel=1e-4, abs=1e-4)
    for tag in (
        "losses/qf_loss",
        "losses/actor_loss",
        "losses/alpha",
        "charts/offline_fraction",
        "charts/SPS",
        "charts/q_auroc_ensemble",
        "charts/q_auroc_member0",
    ):
        assert steps(tags[tag]) == [200, 400], tag
        assert all(math.isfinite(v) for _, v in tags[tag]), tag
    assert all(
        0 <= v <= 1
        for tag in ("charts/q_auroc_ensemble", "charts/q_auroc_member0")
        for _, v in tags[tag]
    )
    assert all(v > 0 for _, v in tags["charts/SPS"])
    # alpha restarted at 1, then a few hundred Adam steps of lr 3e-4 (each about lr in size)
    assert all(0.6 < v < 1.6 and v != 1 for _, v in tags["losses/alpha"])
    assert all(v >= 0 for _, v in tags["losses/qf_loss"])


def check_balanced_logs(tags):
    for tag in ("charts/w_online_mean", "charts/w_offline_mean", "losses/density_ratio_loss"):
        assert steps(tags[tag]) == [200, 400], tag
    assert all(
        v >= 0 for tag in ("charts/w_online_mean", "charts/w_offline_mean") for _, v in tags[tag]
    )
    assert all(0 < v < 1 for _, v in tags["charts/offline_fraction"])


def check_error(out, *needles):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), out.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_inline_pretraining_then_balanced_finetuning(e2e):
    out, work = ok(e2e["inline"]), e2e["work"]
    # no checkpoint: cql_pretrain.py was run with this run's settings, then fine-tuned from
    assert f"No pretrained ensemble at {INLINE_CKPT}: making it with" in out.stdout
    assert "cql_pretrain.py --total-steps 20 --env-id halfcheetah-random-v2" in out.stdout
    assert "step 20/20" in out.stdout and f"Wrote {INLINE_CKPT}.partial" in out.stdout
    assert f"Fine-tuning members [0, 1] of {INLINE_CKPT}" in out.stdout
    assert "eval after 0 online steps" in out.stdout and "epoch 2/2" in out.stdout
    pretrained = torch.load(work / INLINE_CKPT, weights_only=True)
    assert pretrained["global_step"] == 20 and pretrained["format_version"] == 1
    meta = pretrained["metadata"]
    assert meta["ensemble_size"] == 2 and meta["dataset_id"] == ENV
    assert meta["hidden_sizes"] == [32, 32] and meta["args"]["batch_size"] == 32
    assert pretrained["actor"]["net.0.weight"].shape == (2, 17, 32)
    assert pretrained["qf"]["net.0.weight"].shape == (4, 23, 32)
    assert not os.path.exists(work / f"{INLINE_CKPT}.partial")

    state = torch.load(work / state_path("inline"), weights_only=True)
    assert state["epoch"] == 2 and state["metadata"]["critic_source"] == "off2on"
    assert len(state["replay"]["rewards"]) == 400
    assert state["replay"]["observations"].shape == (400, 17)
    assert len(state["replay"]["priorities"]) == 3400
    # one temperature, restarted at 0
    assert state["log_alpha"].shape == () and 0 < abs(state["log_alpha"].item()) < 0.5

    tags = scalars(work, "inline")
    check_common_logs(tags)
    check_balanced_logs(tags)
    assert all(v == 0 for _, v in tags.get("losses/cql_loss", []))  # plain SAC online: no CQL term


def tensors(tree, prefix=""):
    """Every tensor of a checkpoint by its path, but the run's name and the settings it records."""
    if isinstance(tree, dict):
        skip = ("run_name", "metadata")
        items = [(k, v) for k, v in tree.items() if k not in skip]
        return {p: t for k, v in items for p, t in tensors(v, f"{prefix}{k}.").items()}
    return {prefix: tree} if isinstance(tree, torch.Tensor) else {}


def test_inline_pretraining_equals_running_cql_pretrain_first(e2e):
    """One command with no checkpoint = cql_pretrain.py, then off2on_finetune.py from its output:
    the same pretrained weights and the same fine-tuned state, bit for bit."""
    work = e2e["work"]
    ok(e2e["as_inline"]), ok(e2e["from_as_inline"]), ok(e2e["inline"])
    for a, b in (
        (INLINE_CKPT, "as_inline.pt"),
        (state_path("inline"), state_path("from_as_inline")),
    ):
        first = tensors(torch.load(work / a, weights_only=True))
        second = tensors(torch.load(work / b, weights_only=True))
        assert first.keys() == second.keys() and len(first) > 20
        for k in first:
            assert torch.equal(first[k], second[k]), (a, b, k)


def test_pretrain_runs_cql_pretrain_with_this_runs_settings(tmp_path, monkeypatch):
    """The child's command line, read back by cql_pretrain.py's own parser: every setting the
    pretraining shares with this run is passed on; it resumes from `path`.partial, renamed on
    success; a failure exits with the child's code and renames nothing."""
    import tyro

    import cql_pretrain
    import off2on_finetune

    args = Args(
        env_id="hopper-medium-v2", ensemble_size=3, seed=7, batch_size=64, hidden_sizes=(64, 32),
        offline_steps=1234, bc_steps=55, cql_alpha=2.5, cql_n_actions=4, gamma=0.9, tau=0.01,
        eval_episodes=2, random_dataset_size=777, cuda=False, dataset_path="d.hdf5",
    )  # fmt: skip
    calls = []

    def fake_run(command, returncode=0):
        calls.append(command)
        (tmp_path / "ckpt.pt.partial").write_text("made")
        return subprocess.CompletedProcess(command, returncode)

    monkeypatch.setattr(off2on_finetune.subprocess, "run", fake_run)
    off2on_finetune.pretrain(args, str(tmp_path / "ckpt.pt"))
    assert (tmp_path / "ckpt.pt").read_text() == "made" and not (
        tmp_path / "ckpt.pt.partial"
    ).exists()
    (command,) = calls
    assert command[:2] == [sys.executable, os.path.join(ROOT, "cql_pretrain.py")]
    child = tyro.cli(cql_pretrain.Args, args=command[2:])
    for name in ("env_id", "dataset_path", "random_dataset_size", "ensemble_size", "seed"):
        assert getattr(child, name) == getattr(args, name), name
    for name in ("batch_size", "hidden_sizes", "bc_steps", "cql_alpha", "cql_n_actions"):
        assert getattr(child, name) == getattr(args, name), name
    for name in ("gamma", "tau", "eval_episodes", "cuda", "torch_deterministic"):
        assert getattr(child, name) == getattr(args, name), name
    assert child.total_steps == 1234 and child.resume
    assert child.checkpoint_path == str(tmp_path / "ckpt.pt.partial")
    # CQL's own learning rates and backup, not the fine-tuning's
    assert (child.policy_lr, child.q_lr, child.alpha_lr) == (1e-4, 3e-4, 1e-4)
    assert child.deterministic_backup

    monkeypatch.setattr(off2on_finetune.subprocess, "run", lambda c: fake_run(c, returncode=3))
    with pytest.raises(SystemExit) as exit_info:
        off2on_finetune.pretrain(args, str(tmp_path / "other.pt"))
    assert exit_info.value.code == 3 and not (tmp_path / "other.pt").exists()


def test_missing_random_dataset_names_the_command_that_makes_it(e2e):
    command = "python cql_pretrain.py --env-id walker2d-random-v2 --random-dataset-size 3000"
    check_error(e2e["missing_random"], f"{command} --dataset-only")


def test_checkpoint_from_cql_pretrain_and_uniform_replay(e2e):
    ok(e2e["pretrain"])
    out, work = ok(e2e["uniform"]), e2e["work"]
    assert (
        "Fine-tuning members [0, 1] of pre.pt" in out.stdout
        and "No pretrained ensemble" not in out.stdout
    )
    # only the inline run pretrained
    assert glob.glob(str(work / "checkpoints" / "cql__*")) == [str(work / INLINE_CKPT)]
    tags = scalars(work, "uniform")
    check_common_logs(tags)
    # no density ratio
    assert not any(t.startswith(("charts/w_", "losses/density_ratio")) for t in tags)
    fraction = dict(tags["charts/offline_fraction"])
    # uniform over 3000 offline + 200 (then 400) online transitions
    assert fraction[200] == pytest.approx(3000 / 3200, abs=0.02) and fraction[400] == pytest.approx(
        3000 / 3400, abs=0.02
    )
    state = torch.load(work / state_path("uniform"), weights_only=True)
    assert (
        state["epoch"] == 2
        and "priorities" not in state["replay"]
        and len(state["replay"]["rewards"]) == 400
    )


def test_ratio_target_replay_cql_loss_and_member_choice(e2e):
    out, work = ok(e2e["variants"]), e2e["work"]
    assert "Fine-tuning members [1, 0] of pre.pt" in out.stdout and "cql loss" in out.stdout
    tags = scalars(work, "variants")
    check_common_logs(tags)
    check_balanced_logs(tags)
    assert steps(tags["losses/cql_loss"]) == [200, 400] and all(
        v > 0 for _, v in tags["losses/cql_loss"]
    )  # kept online
    state = torch.load(work / state_path("variants"), weights_only=True)
    assert (
        state["metadata"]["args"]["members"] == "1,0"
        and state["metadata"]["args"]["ratio_target"] == "replay"
    )
    # the merged policy is symmetric in its members: same pretrained agents, same step-0 evaluation
    assert tags["eval/return"][0] == scalars(work, "uniform")["eval/return"][0]


def test_from_scratch_online_only_logs_episodes(e2e):
    out, work = ok(e2e["scratch"]), e2e["work"]
    assert "Fine-tuning members" not in out.stdout and "No pretrained ensemble" not in out.stdout
    assert not glob.glob(str(work / "checkpoints" / "cql__hopper*"))  # nothing pretrained
    tags = scalars(work, "scratch", env_id="hopper-random-v2")
    check_common_logs(tags, "hopper")
    assert not any(t.startswith(("charts/w_", "losses/density_ratio")) for t in tags)
    assert all(v == 0 for _, v in tags["charts/offline_fraction"])  # online-only
    # hopper episodes end quickly under an untrained policy
    episodes = tags["charts/episodic_return"]
    assert (
        len(episodes) >= 2
        and all(0 < s <= 400 for s in steps(episodes))
        and steps(episodes) == sorted(steps(episodes))
    )
    assert all(math.isfinite(v) for _, v in episodes)
    state = torch.load(work / state_path("scratch", "hopper-random-v2"), weights_only=True)
    assert (
        state["metadata"]["hidden_sizes"] == [32, 32]
        and state["epoch"] == 2
        and len(state["replay"]["rewards"]) == 400
    )


def test_resume_continues_at_epoch_two(e2e):
    first, second, work = ok(e2e["resume1"]), ok(e2e["resume2"]), e2e["work"]
    assert "epoch 1/1" in first.stdout
    assert "Resuming" in second.stdout and "after epoch 1" in second.stdout
    assert "epoch 2/2" in second.stdout and "epoch 1/2" not in second.stdout
    assert (
        "eval after 0 online steps" not in second.stdout
        and "eval after 400 online steps" in second.stdout
    )
    state = torch.load(work / state_path("resume"), weights_only=True)
    assert state["epoch"] == 2
    assert len(state["replay"]["rewards"]) == 400 and len(state["replay"]["priorities"]) == 3400
    # one run directory for both parts, the logs continuing
    tags = scalars(work, "resume")
    assert steps(tags["eval/return"]) == [0, 200, 400] and steps(tags["losses/qf_loss"]) == [
        200,
        400,
    ]


def test_existing_state_needs_resume(e2e):
    check_error(e2e["exists"], "--resume", state_path("inline"))
    assert os.stat(e2e["work"] / state_path("inline")).st_mtime_ns == e2e["inline_state_mtime"]


def test_resume_with_other_settings_fails_naming_them(e2e):
    check_error(e2e["resume_changed"], "temperature", state_path("inline"))
    assert os.stat(e2e["work"] / state_path("inline")).st_mtime_ns == e2e["inline_state_mtime"]


def test_checkpoint_of_another_env_fails(e2e):
    ok(e2e["hopper_pretrain"])
    check_error(e2e["other_env_ckpt"], "hopper.pt", "hopper-random-v2", ENV)


def test_checkpoint_with_too_few_members_fails(e2e):
    check_error(e2e["too_few_members"], "pre.pt", "2 members", "[0, 1, 2]")


def test_unknown_replay_mode_is_a_cli_error(e2e):
    out = e2e["bad_replay"]
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "prioritized" in out.stderr and "--replay" in out.stderr


def test_missing_dataset_fails_in_one_line(e2e):
    check_error(e2e["missing_dataset"], "mujoco/hopper/medium-v0", "minari download")


def test_total_timesteps_must_be_a_multiple_of_epoch_length(e2e):
    check_error(e2e["bad_total"], "--total-timesteps 300", "--epoch-length 200")


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            dict(replay="uniform", ratio_target="replay"),
            "--ratio-target replay needs --replay balanced",
        ),
        (dict(from_scratch=True, checkpoint="x.pt"), "--from-scratch starts from random networks"),
        (dict(from_scratch=True, members="0"), "--from-scratch starts from random networks"),
        (dict(total_timesteps=1500), "multiple of --epoch-length"),
        (dict(init_online_fraction=1.0), "--init-online-fraction"),
    ],
)
def test_contradictory_flags_are_refused_early(flags, message):
    import dataclasses

    args = dataclasses.replace(Args(), **flags)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_args(args)
    validate_args(Args())  # the defaults are valid


def test_a_finished_run_resumed_says_so_and_leaves_its_logs(e2e):
    out = ok(e2e["resume_done"])
    assert f"{state_path('resume')} is complete (2 epochs): nothing to resume" in out.stdout
    after = sorted(glob.glob(str(e2e["work"] / "runs" / f"{ENV}__resume__1__*/*")))
    assert after == e2e["resume_events"] and len(after) == 2  # no new event file


@pytest.mark.parametrize(
    "run, needles",
    [
        ("bad_env", ("unknown --env-id 'nosuchenv-random-v2'",)),
        ("no_such_path", ("--dataset-path nothere.hdf5 does not exist",)),
        ("not_hdf5", ("--dataset-path notes.txt is not an HDF5 file", "observations")),
    ],
)
def test_bad_data_fails_before_any_pretraining(e2e, run, needles):
    check_error(e2e[run], *needles)
    assert "No pretrained ensemble" not in e2e[run].stdout  # no cql_pretrain.py child started


def test_a_corrupt_checkpoint_is_named_without_torchs_advice(e2e):
    check_error(e2e["corrupt_ckpt"], "corrupt.pt (1,028 bytes) is not a readable checkpoint")
    assert "weights_only" not in e2e["corrupt_ckpt"].stderr
