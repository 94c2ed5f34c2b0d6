"""Tests of the vectorized CQL ensemble in cql_pretrain.py (paper eqs. 2 and 3, docs/algorithm.md).

Every vectorized piece is compared with a plain per-member twin (nn.Linear stacks, explicit
loops), the CQL critic loss is recomputed from its definition, and the update of N agents is
checked to equal N independent single-agent updates on the same batches and noise.
"""

import copy
import io
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch
import torch.nn as nn
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from conftest import member_mlp
from cql_pretrain import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    Actor,
    CQLEnsemble,
    Critic,
    VectorizedLinear,
    ensemble_gaussian,
    tanh_gaussian_log_prob,
    tanh_gaussian_sample,
    vectorized_mlp,
)

LOG2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def exact_log1m_tanh2(u: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(u)^2) written independently of the code's formula:
    log 4 - 2|u| - 2 log(1 + e^{-2|u|})."""
    a = u.abs()
    return math.log(4.0) - 2 * a - 2 * torch.log1p(torch.exp(-2 * a))


def ref_log_pi(mu, log_std, u):
    """log density of tanh(u), u ~ N(mu, exp(log_std)^2), summed over the last dim."""
    std = log_std.exp()
    gauss = -0.5 * ((u - mu) / std) ** 2 - log_std - 0.5 * LOG2PI
    return (gauss - exact_log1m_tanh2(u)).sum(-1)


def make_batch(N, B, obs_dim, A, generator=None):
    g = generator
    obs = torch.randn(N, B, obs_dim, generator=g)
    actions = torch.rand(N, B, A, generator=g) * 1.9 - 0.95
    rewards = torch.randn(N, B, generator=g)
    next_obs = torch.randn(N, B, obs_dim, generator=g)
    terminations = (torch.rand(N, B, generator=g) < 0.3).to(obs.dtype)
    terminations[:, 0] = 1.0  # make sure both cases occur
    terminations[:, 1] = 0.0
    return [obs, actions, rewards, next_obs, terminations]


def slice_member(agents: CQLEnsemble, single: CQLEnsemble, i: int):
    """Member i of `agents` (actor i, critics 2i, 2i+1, log_alpha i) as a 1-agent ensemble."""
    with torch.no_grad():
        for ps, pe in zip(single.actor.parameters(), agents.actor.parameters()):
            ps.copy_(pe[i : i + 1])
        for ps, pe in zip(single.qf.parameters(), agents.qf.parameters()):
            ps.copy_(pe[2 * i : 2 * i + 2])
        for ps, pe in zip(single.qf_target.parameters(), agents.qf_target.parameters()):
            ps.copy_(pe[2 * i : 2 * i + 2])
        single.log_alpha.copy_(agents.log_alpha[i : i + 1])


def assert_close(a, b, atol, rtol=0.0, msg=""):
    assert a.shape == b.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{msg}: max abs diff {err:.3e}"


# ---------------------------------------------------------------------------------------
# 1. VectorizedLinear
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_out", [3, 1])  # 1: the dot-product path of a Q-value output
def test_vectorized_linear_equals_nn_linear_per_member(f64, n_out):
    N, B, n_in = 4, 7, 5
    layer = VectorizedLinear(n_in, n_out, N)
    assert layer.weight.shape == (N, n_in, n_out) and layer.bias.shape == (N, 1, n_out)
    x = torch.randn(N, B, n_in)
    y = layer(x)
    assert y.shape == (N, B, n_out)
    for i in range(N):
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(layer.weight[i].T)
            lin.bias.copy_(layer.bias[i, 0])
        assert_close(y[i], lin(x[i]), atol=1e-12, msg=f"member {i}")
        # and the plain formula x W + b
        assert_close(
            y[i], x[i] @ layer.weight[i] + layer.bias[i], atol=1e-12, msg=f"member {i} formula"
        )
    # a slice of members runs only those members, with the same values and gradients
    assert_close(layer(x[1:3], slice(1, 3)), y[1:3], atol=1e-12)
    g = torch.randn(N, B, n_out)
    grads = torch.autograd.grad((y * g).sum(), [layer.weight, layer.bias])
    expected = [torch.einsum("nbi,nbo->nio", x, g), g.sum(1, keepdim=True)]
    for a, b in zip(grads, expected):
        assert_close(a, b, atol=1e-10)


def test_vectorized_linear_members_see_only_their_own_input(f64):
    N, B, n_in, n_out = 3, 4, 6, 2
    layer = VectorizedLinear(n_in, n_out, N)
    x = torch.randn(N, B, n_in)
    y = layer(x)
    x2 = x.clone()
    x2[1] += 10.0
    y2 = layer(x2)
    assert torch.equal(y[0], y2[0]) and torch.equal(y[2], y2[2])
    assert not torch.allclose(y[1], y2[1])


def test_vectorized_linear_init():
    torch.manual_seed(0)
    N, n_in, n_out = 5, 64, 128
    layer = VectorizedLinear(n_in, n_out, N)
    bound = 1 / math.sqrt(n_in)
    w, b = layer.weight.detach(), layer.bias.detach()
    assert w.abs().max() <= bound and b.abs().max() <= bound
    for i in range(N):
        # uniform on [-bound, bound]: extremes near the bounds, std = bound / sqrt(3)
        assert w[i].max() > 0.95 * bound and w[i].min() < -0.95 * bound
        assert abs(w[i].std().item() - bound / math.sqrt(3)) < 0.05 * bound
        assert abs(w[i].mean().item()) < 0.05 * bound
        assert b[i].max() > 0.5 * bound and b[i].min() < -0.5 * bound
    for i in range(N):
        for j in range(i + 1, N):
            assert not torch.allclose(w[i], w[j]), f"members {i} and {j} have the same weights"
            assert not torch.allclose(b[i], b[j]), f"members {i} and {j} have the same biases"


# ---------------------------------------------------------------------------------------
# 2. vectorized_mlp, Critic, Actor against looped per-member twins
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [(8,), (6, 5), (7, 4, 3)])
def test_vectorized_mlp_equals_per_member_mlps(f64, hidden):
    N, B, n_in, n_out = 3, 5, 4, 2
    net = vectorized_mlp(n_in, hidden, n_out, N)
    kinds = [type(m) for m in net]
    expected_kinds = [VectorizedLinear, nn.ReLU] * len(hidden) + [VectorizedLinear]
    assert kinds == expected_kinds  # ReLU between layers, none after the output layer
    sizes = [n_in, *hidden, n_out]
    lins = [m for m in net if isinstance(m, VectorizedLinear)]
    assert [tuple(m.weight.shape) for m in lins] == [
        (N, a, b) for a, b in zip(sizes[:-1], sizes[1:])
    ]
    x = torch.randn(N, B, n_in)
    y = net(x)
    assert y.shape == (N, B, n_out)
    # the ReLUs matter on this input (a purely linear twin would give something else)
    linear_twin = nn.Sequential(*[m for m in member_mlp(net, 0) if isinstance(m, nn.Linear)])
    assert not torch.allclose(y[0], linear_twin(x[0]))
    for i in range(N):
        assert_close(y[i], member_mlp(net, i)(x[i]), atol=1e-12, msg=f"member {i}")


def test_critic_layout_equals_per_member_twins(f64):
    N, B, obs_dim, A = 3, 6, 4, 2
    critic = Critic(obs_dim, A, (8, 8), N)
    lins = [m for m in critic.net if isinstance(m, VectorizedLinear)]
    assert lins[0].weight.shape == (2 * N, obs_dim + A, 8) and lins[-1].weight.shape == (
        2 * N,
        8,
        1,
    )
    obs, act = torch.randn(N, B, obs_dim), torch.rand(N, B, A) * 2 - 1
    q = critic(obs, act)
    assert q.shape == (N, 2, B)
    for i in range(N):
        for k in range(2):
            twin = member_mlp(critic.net, 2 * i + k)
            expected = twin(torch.cat([obs[i], act[i]], -1)).squeeze(-1)
            assert_close(q[i, k], expected, atol=1e-12, msg=f"agent {i} critic {k}")
    # the two critics of an agent are different networks
    assert not torch.allclose(q[:, 0], q[:, 1])


@pytest.mark.parametrize("B", [7, 2100])
def test_critic_tall_inputs_equal_per_member_twins(f64, B):
    """Tall inputs (the CQL term's 1 + 3M actions per state) may take a per-agent path: same values,
    same gradients."""
    N, obs_dim, A = 3, 3, 2
    critic = Critic(obs_dim, A, (6, 5), N)
    obs, act = torch.randn(N, B, obs_dim), torch.rand(N, B, A) * 2 - 1
    q = critic(obs, act)
    assert q.shape == (N, 2, B)
    x = torch.cat([obs, act], -1)
    for i in range(N):
        for k in range(2):
            expected = member_mlp(critic.net, 2 * i + k)(x[i]).squeeze(-1)
            assert_close(q[i, k], expected, atol=1e-12, msg=f"agent {i} critic {k}")
    # gradients equal those of the plain batched network
    w = torch.randn(N, 2, B)
    grads = torch.autograd.grad((q * w).sum(), list(critic.parameters()))
    q_batched = critic.net(x.repeat_interleave(2, dim=0)).view(N, 2, B)
    grads_batched = torch.autograd.grad((q_batched * w).sum(), list(critic.parameters()))
    for g, gb in zip(grads, grads_batched):
        assert_close(g, gb, atol=1e-10, rtol=1e-10)


def test_actor_equals_per_member_twins(f64):
    N, B, obs_dim, A = 3, 6, 5, 3
    actor = Actor(obs_dim, A, (8, 7), N)
    obs = torch.randn(N, B, obs_dim)
    mean, log_std = actor(obs)
    assert mean.shape == (N, B, A) and log_std.shape == (N, B, A)
    for i in range(N):
        out = member_mlp(actor.net, i)(obs[i])
        assert out.shape == (B, 2 * A)
        assert_close(mean[i], out[:, :A], atol=1e-12, msg=f"mean of member {i}")
        assert_close(
            log_std[i], out[:, A:].clamp(-20.0, 2.0), atol=1e-12, msg=f"log_std of member {i}"
        )


def test_actor_log_std_clamp(f64):
    assert (LOG_STD_MIN, LOG_STD_MAX) == (-20.0, 2.0)
    N, B, obs_dim, A = 2, 50, 4, 3
    actor = Actor(obs_dim, A, (8,), N)
    last = actor.net[-1]
    with torch.no_grad():  # huge weights: raw outputs in the hundreds/thousands
        last.weight.mul_(1e4)
    obs = torch.randn(N, B, obs_dim)
    mean, log_std = actor(obs)
    raw = torch.stack([member_mlp(actor.net, i)(obs[i]) for i in range(N)])
    assert raw[..., A:].max() > 100 and raw[..., A:].min() < -100  # the clamp has work to do
    assert log_std.min() >= -20.0 and log_std.max() <= 2.0
    assert (log_std == 2.0).any() and (log_std == -20.0).any()
    assert_close(log_std, raw[..., A:].clamp(-20.0, 2.0), atol=1e-9)
    # the mean is not clamped
    assert mean.abs().max() > 100
    assert_close(mean, raw[..., :A], atol=1e-9)

    # exact placement: zero weights, biases choose the outputs; mean first, log_std second
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([50.0, -50.0, 0.5, 100.0, -100.0, 1.5]).expand(N, 1, 2 * A))
    mean, log_std = actor(obs)
    assert torch.equal(mean, torch.tensor([50.0, -50.0, 0.5]).expand(N, B, A))
    assert torch.equal(log_std, torch.tensor([2.0, -20.0, 1.5]).expand(N, B, A))


# ---------------------------------------------------------------------------------------
# 3. tanh-Gaussian log-probability
# ---------------------------------------------------------------------------------------
def test_tanh_gaussian_matches_torch_distributions(f64):
    B, A = 64, 4
    mean = torch.randn(B, A)
    log_std = torch.rand(B, A) * 3 - 2
    eps = torch.randn(B, A)
    a, log_pi = tanh_gaussian_sample(mean, log_std, eps)
    u = mean + log_std.exp() * eps
    assert_close(a, torch.tanh(u), atol=1e-15)
    assert log_pi.shape == (B,)

    # same sample through the cache (no atanh round-off)
    dist = TransformedDistribution(
        Normal(mean, log_std.exp()), [TanhTransform(cache_size=1)], validate_args=False
    )
    y = dist.transforms[0](u)
    expected = dist.log_prob(y).sum(-1)
    assert_close(log_pi, expected, atol=1e-10, msg="vs TransformedDistribution (cached)")
    # moderate |u|: the uncached inverse (atanh) is accurate too
    ok = u.abs().max(-1).values < 3
    assert ok.sum() > 10
    dist2 = TransformedDistribution(
        Normal(mean, log_std.exp()), [TanhTransform()], validate_args=False
    )
    assert_close(
        log_pi[ok], dist2.log_prob(torch.tanh(u))[ok].sum(-1), atol=1e-7, msg="vs uncached"
    )
    # and the independent reference
    assert_close(log_pi, ref_log_pi(mean, log_std, u), atol=1e-10, msg="vs reference formula")
    # log_prob with an explicit pre-tanh sample
    assert_close(tanh_gaussian_log_prob(mean, log_std, u), log_pi, atol=1e-15)


def test_tanh_gaussian_log_prob_broadcasts_over_sample_dim(f64):
    N, M, B, A = 2, 3, 4, 2
    mean, log_std = torch.randn(N, B, A), torch.randn(N, B, A) * 0.5
    eps = torch.randn(N, M, B, A)
    a, lp = tanh_gaussian_sample(mean[:, None], log_std[:, None], eps)
    assert a.shape == (N, M, B, A) and lp.shape == (N, M, B)
    for j in range(M):
        a_j, lp_j = tanh_gaussian_sample(mean, log_std, eps[:, j])
        assert_close(a[:, j], a_j, atol=1e-15)
        assert_close(lp[:, j], lp_j, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_gaussian_log_prob_stable_for_large_u(dtype):
    u64 = torch.tensor([8.0, -8.0, 10.0, -10.0, 15.0, -20.0, 20.0, 30.0], dtype=torch.float64)
    mean64 = u64 - 0.3  # the sample is 0.3 std above the mean
    log_std64 = torch.zeros_like(u64)
    exact = (-0.5 * 0.3**2 - 0.5 * LOG2PI) - exact_log1m_tanh2(u64)  # float64 exact value
    # sanity of the reference: at u=8, log(1 - tanh^2) = log 4 - 16 - 2 log(1 + e^-16)
    assert (
        abs(
            exact_log1m_tanh2(torch.tensor(8.0, dtype=torch.float64)).item()
            - (math.log(4) - 16 - 2 * math.log1p(math.exp(-16)))
        )
        < 1e-14
    )

    u, mean, log_std = (
        u64.to(dtype)[:, None],
        mean64.to(dtype)[:, None],
        log_std64.to(dtype)[:, None],
    )
    got = tanh_gaussian_log_prob(mean, log_std, u)
    assert got.dtype == dtype and got.shape == (len(u64),)
    assert torch.isfinite(got).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert_close(got.double(), exact, atol=tol, rtol=tol, msg="stable log-prob vs exact")

    # the naive correction breaks here: inaccurate at |u|=8 in float32, -inf at |u|>=10 (float32)
    # or 20 (float64)
    naive = torch.log(1 - torch.tanh(u.squeeze(-1)) ** 2)
    if dtype == torch.float32:
        assert abs(naive[0].item() - exact_log1m_tanh2(u64[0]).item()) > 1e-2
        assert torch.isinf(naive[2])
    else:
        assert torch.isinf(naive[-1])

    # gradients through the sample are finite as well
    m = mean.clone().requires_grad_(True)
    s = log_std.clone().requires_grad_(True)
    _, lp = tanh_gaussian_sample(m, s, torch.full_like(m, 0.3))
    lp.sum().backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------
# 4. CQL critic loss recomputed from its definition
# ---------------------------------------------------------------------------------------
def _setup_small(
    deterministic_backup, N=2, B=3, M=4, obs_dim=3, A=2, hidden=(6, 5), cql_alpha=2.5, gamma=0.9
):
    agents = CQLEnsemble(
        obs_dim,
        A,
        hidden,
        N,
        cql_alpha=cql_alpha,
        cql_n_actions=M,
        gamma=gamma,
        tau=0.1,
        deterministic_backup=deterministic_backup,
    )
    with torch.no_grad():  # targets differ from the online critics, alphas differ from 1
        for p in agents.qf_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
        agents.log_alpha.copy_(torch.linspace(-0.7, 0.4, N))
    return agents


@pytest.mark.parametrize("deterministic_backup", [True, False])
def test_critic_loss_by_hand(f64, deterministic_backup):
    N, B, M, obs_dim, A, cql_alpha, gamma = 2, 3, 4, 3, 2, 2.5, 0.9
    agents = _setup_small(
        deterministic_backup, N, B, M, obs_dim, A, cql_alpha=cql_alpha, gamma=gamma
    )
    obs, actions, rewards, next_obs, terms = make_batch(N, B, obs_dim, A)
    noise = agents.draw_noise(B)
    assert noise["uniform"].shape == (N, M, B, A) and noise["target"].shape == (N, B, A)
    assert noise["uniform"].min() >= -1 and noise["uniform"].max() <= 1
    with torch.no_grad():
        mean, log_std = agents.actor(obs)
    loss, logs = agents.critic_loss(obs, actions, rewards, next_obs, terms, mean, log_std, noise)

    bellman = torch.zeros(N, 2)
    cql = torch.zeros(N, 2)
    q_data_sum = 0.0
    with torch.no_grad():
        for i in range(N):
            actor_i = member_mlp(agents.actor.net, i)
            q_i = [member_mlp(agents.qf.net, 2 * i + k) for k in range(2)]
            qt_i = [member_mlp(agents.qf_target.net, 2 * i + k) for k in range(2)]
            alpha_i = math.exp(agents.log_alpha[i].item())

            def pi(s):
                out = actor_i(s)
                return out[:A], out[A:].clamp(-20, 2)

            def Q(k, s, a):
                return q_i[k](torch.cat([s, a])).squeeze()

            for b in range(B):
                s, s2, a_data = obs[i, b], next_obs[i, b], actions[i, b]
                mu, ls = pi(s)
                mu2, ls2 = pi(s2)
                # Bellman target
                u = mu2 + ls2.exp() * noise["target"][i, b]
                a2 = torch.tanh(u)
                next_q = min(qt_i[k](torch.cat([s2, a2])).item() for k in range(2))
                if not deterministic_backup:
                    next_q -= alpha_i * ref_log_pi(mu2, ls2, u).item()
                y = rewards[i, b].item() + gamma * (1 - terms[i, b].item()) * next_q
                for k in range(2):
                    q_data = Q(k, s, a_data).item()
                    q_data_sum += q_data
                    vals = []
                    for j in range(M):  # uniform proposals, density (1/2)^|A|
                        vals.append(Q(k, s, noise["uniform"][i, j, b]).item() + A * math.log(2))
                    for j in range(M):  # pi(.|s) proposals
                        u_c = mu + ls.exp() * noise["cur_cql"][i, j, b]
                        vals.append(
                            Q(k, s, torch.tanh(u_c)).item() - ref_log_pi(mu, ls, u_c).item()
                        )
                    for j in range(M):  # pi(.|s') proposals, evaluated at s
                        u_n = mu2 + ls2.exp() * noise["next_cql"][i, j, b]
                        vals.append(
                            Q(k, s, torch.tanh(u_n)).item() - ref_log_pi(mu2, ls2, u_n).item()
                        )
                    assert len(vals) == 3 * M
                    vmax = max(vals)
                    lse = vmax + math.log(sum(math.exp(v - vmax) for v in vals))
                    bellman[i, k] += (q_data - y) ** 2 / B
                    cql[i, k] += (lse - q_data) / B
    expected_total = (bellman + cql_alpha * cql).sum()
    assert_close(loss.detach(), expected_total, atol=1e-9, rtol=1e-9, msg="total critic loss")
    assert_close(logs["qf_loss"].detach(), bellman.mean(), atol=1e-9, rtol=1e-9, msg="qf_loss")
    assert_close(logs["cql_loss"].detach(), cql.mean(), atol=1e-9, rtol=1e-9, msg="cql_loss")
    assert abs(logs["q_data"].item() - q_data_sum / (N * 2 * B)) < 1e-9

    # the critic loss trains the critics only
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in agents.actor.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agents.qf.parameters())
    assert all(p.grad is None for p in agents.qf_target.parameters())
    assert agents.log_alpha.grad is None


def test_critic_loss_backup_modes_differ(f64):
    """The entropy term matters: with alpha > 0 the two backups give different losses."""
    a_det = _setup_small(True)
    a_soft = _setup_small(False)
    a_soft.actor.load_state_dict(a_det.actor.state_dict())
    a_soft.qf.load_state_dict(a_det.qf.state_dict())
    a_soft.qf_target.load_state_dict(a_det.qf_target.state_dict())
    with torch.no_grad():
        a_soft.log_alpha.copy_(a_det.log_alpha)
    batch = make_batch(2, 3, 3, 2)
    noise = a_det.draw_noise(3)
    with torch.no_grad():
        m, s = a_det.actor(batch[0])
        l1, _ = a_det.critic_loss(*batch, m, s, noise)
        l2, _ = a_soft.critic_loss(*batch, m, s, noise)
    assert abs(l1.item() - l2.item()) > 1e-6


@pytest.mark.parametrize("behaviour_cloning", [True, False])
def test_actor_loss_by_hand(f64, behaviour_cloning):
    N, B, obs_dim, A = 2, 4, 3, 2
    agents = _setup_small(True, N, B, 3, obs_dim, A)
    obs, actions, *_ = make_batch(N, B, obs_dim, A)
    noise = agents.draw_noise(B)
    mean, log_std = agents.actor(obs)
    actor_loss, alpha_loss, logs = agents.actor_loss(
        obs, actions, mean, log_std, noise, behaviour_cloning
    )
    exp_actor, exp_alpha, ent = 0.0, 0.0, 0.0
    with torch.no_grad():
        for i in range(N):
            actor_i = member_mlp(agents.actor.net, i)
            q_i = [member_mlp(agents.qf.net, 2 * i + k) for k in range(2)]
            la = agents.log_alpha[i].item()
            for b in range(B):
                out = actor_i(obs[i, b])
                mu, ls = out[:A], out[A:].clamp(-20, 2)
                u = mu + ls.exp() * noise["actor"][i, b]
                lp = ref_log_pi(mu, ls, u).item()
                if behaviour_cloning:
                    objective = ref_log_pi(mu, ls, torch.atanh(actions[i, b])).item()
                else:
                    a = torch.tanh(u)
                    objective = min(q(torch.cat([obs[i, b], a])).item() for q in q_i)
                exp_actor += (math.exp(la) * lp - objective) / B
                exp_alpha += -la * (lp - A) / B  # target entropy -|A|
                ent += -lp / (N * B)
    assert abs(actor_loss.item() - exp_actor) < 1e-9
    assert abs(alpha_loss.item() - exp_alpha) < 1e-9
    assert abs(logs["entropy"].item() - ent) < 1e-9
    assert abs(logs["actor_loss"].item() - exp_actor / N) < 1e-9


# ---------------------------------------------------------------------------------------
# 5. N vectorized agents == N single agents
# ---------------------------------------------------------------------------------------
OPT_NAMES = ("actor_optimizer", "qf_optimizer", "alpha_optimizer")


def _opt_slices(i):
    return {
        "actor_optimizer": slice(i, i + 1),
        "qf_optimizer": slice(2 * i, 2 * i + 2),
        "alpha_optimizer": slice(i, i + 1),
    }


@pytest.mark.parametrize("deterministic_backup,B,M", [(True, 5, 3), (False, 5, 3), (True, 70, 10)])
def test_vectorized_update_equals_single_agent_updates(f64, deterministic_backup, B, M):
    # B=70, M=10: 2170 rows a critic, tall enough for any per-agent path
    N, obs_dim, A, hidden = (3, 4, 2, (16, 16))
    kw = dict(
        cql_alpha=5.0,
        cql_n_actions=M,
        gamma=0.95,
        tau=0.05,
        policy_lr=3e-3,
        q_lr=3e-3,
        alpha_lr=1e-2,
        deterministic_backup=deterministic_backup,
    )
    agents = CQLEnsemble(obs_dim, A, hidden, N, **kw)
    with torch.no_grad():
        agents.log_alpha.copy_(torch.tensor([0.2, -0.3, 0.5]))
    init = copy.deepcopy(agents.state_dict())
    singles = []
    for i in range(N):
        single = CQLEnsemble(obs_dim, A, hidden, 1, **kw)
        slice_member(agents, single, i)
        singles.append(single)

    schedule = [True, True, True, False, False, False, False]
    for step, bc in enumerate(schedule):
        batch = make_batch(N, B, obs_dim, A)
        noise = agents.draw_noise(B)
        logs = agents.update(batch, behaviour_cloning=bc, noise=noise)
        single_logs = [
            singles[i].update(
                [x[i : i + 1] for x in batch],
                behaviour_cloning=bc,
                noise={k: v[i : i + 1] for k, v in noise.items()},
            )
            for i in range(N)
        ]
        for key in ("qf_loss", "cql_loss", "q_data", "actor_loss", "alpha", "entropy"):
            mean_single = sum(logs[key].item() for logs in single_logs) / N
            assert abs(logs[key].item() - mean_single) < 1e-9 * max(1.0, abs(mean_single)), (
                f"step {step} log {key}"
            )

    tol = dict(atol=1e-10, rtol=1e-8)
    for i, single in enumerate(singles):
        for ps, pe in zip(single.actor.parameters(), agents.actor.parameters()):
            assert_close(ps, pe[i : i + 1], **tol, msg=f"actor of agent {i}")
        for ps, pe in zip(single.qf.parameters(), agents.qf.parameters()):
            assert_close(ps, pe[2 * i : 2 * i + 2], **tol, msg=f"critics of agent {i}")
        for ps, pe in zip(single.qf_target.parameters(), agents.qf_target.parameters()):
            assert_close(ps, pe[2 * i : 2 * i + 2], **tol, msg=f"target critics of agent {i}")
        assert_close(
            single.log_alpha, agents.log_alpha[i : i + 1], **tol, msg=f"log_alpha of agent {i}"
        )
        for opt_name in OPT_NAMES:
            opt_s, opt_e = getattr(single, opt_name), getattr(agents, opt_name)
            sl = _opt_slices(i)[opt_name]
            params_s = [p for g in opt_s.param_groups for p in g["params"]]
            params_e = [p for g in opt_e.param_groups for p in g["params"]]
            assert len(params_s) == len(params_e) > 0
            for ps, pe in zip(params_s, params_e):
                st_s, st_e = opt_s.state[ps], opt_e.state[pe]
                assert float(st_s["step"]) == float(st_e["step"]) == len(schedule)
                for key in ("exp_avg", "exp_avg_sq"):
                    assert_close(
                        st_s[key],
                        st_e[key][sl],
                        atol=1e-12,
                        rtol=1e-8,
                        msg=f"{opt_name} {key} of agent {i}",
                    )

    # not vacuous: everything moved, and targets lag behind the critics
    for key in ("actor", "qf", "qf_target"):
        for name, v in getattr(agents, key).state_dict().items():
            assert not torch.allclose(v, init[key][name]), f"{key}.{name} did not change"
    assert not torch.allclose(agents.log_alpha, init["log_alpha"])
    for pt, p in zip(agents.qf_target.parameters(), agents.qf.parameters()):
        assert not torch.allclose(pt, p)


def test_members_are_independent_of_each_others_batches(f64):
    """Changing agent 1's batch and noise leaves agents 0 and 2 unchanged (to round-off)."""
    N, B, obs_dim, A = 3, 4, 3, 2
    a1 = CQLEnsemble(
        obs_dim, A, (8, 8), N, cql_n_actions=2, q_lr=1e-2, policy_lr=1e-2, alpha_lr=1e-2
    )
    a2 = CQLEnsemble(
        obs_dim, A, (8, 8), N, cql_n_actions=2, q_lr=1e-2, policy_lr=1e-2, alpha_lr=1e-2
    )
    a2.load_state_dict(copy.deepcopy(a1.state_dict()))
    for bc in (True, False):
        batch = make_batch(N, B, obs_dim, A)
        noise = a1.draw_noise(B)
        batch2 = [x.clone() for x in batch]
        noise2 = {k: v.clone() for k, v in noise.items()}
        batch2[0][1] += 1.0
        batch2[2][1] -= 5.0
        for v in noise2.values():
            v[1] = v[1].flip(0) * 0.5
        a1.update(batch, bc, noise)
        a2.update(batch2, bc, noise2)
    for p1, p2 in zip(a1.actor.parameters(), a2.actor.parameters()):
        assert_close(p1[[0, 2]], p2[[0, 2]], atol=1e-12)
        assert not torch.allclose(p1[1], p2[1])
    for p1, p2 in zip(a1.qf.parameters(), a2.qf.parameters()):
        assert_close(p1[[0, 1, 4, 5]], p2[[0, 1, 4, 5]], atol=1e-12)
        assert not torch.allclose(p1[2:4], p2[2:4])
    assert_close(a1.log_alpha[[0, 2]], a2.log_alpha[[0, 2]], atol=1e-12)


# ---------------------------------------------------------------------------------------
# the update is: one Adam step of the critic loss, then of the actor / alpha losses
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("behaviour_cloning", [True, False])
def test_first_update_is_one_adam_step_of_each_loss(f64, behaviour_cloning):
    N, B, obs_dim, A = 2, 5, 3, 2
    agents = _setup_small(True, N, B, 3, obs_dim, A)
    ref = copy.deepcopy(agents)  # fresh optimizers, same weights
    batch = make_batch(N, B, obs_dim, A)
    noise = agents.draw_noise(B)
    agents.update(batch, behaviour_cloning=behaviour_cloning, noise=noise)

    eps = 1e-8  # Adam's first step with bias correction: lr * g / (|g| + eps)
    mean, log_std = ref.actor(batch[0])
    q_loss, _ = ref.critic_loss(*batch, mean.detach(), log_std.detach(), noise)
    g_q = torch.autograd.grad(q_loss, list(ref.qf.parameters()))
    new_q = [p - 3e-4 * g / (g.abs() + eps) for p, g in zip(ref.qf.parameters(), g_q)]
    for p_new, p_got in zip(new_q, agents.qf.parameters()):
        assert_close(p_got, p_new, atol=1e-12, msg="critic step")
    # the actor's loss is taken with the critics after their step
    with torch.no_grad():
        for p, v in zip(ref.qf.parameters(), new_q):
            p.copy_(v)
    actor_loss, alpha_loss, _ = ref.actor_loss(
        batch[0], batch[1], mean, log_std, noise, behaviour_cloning
    )
    g_a = torch.autograd.grad(actor_loss, list(ref.actor.parameters()))
    for p, g, p_got in zip(ref.actor.parameters(), g_a, agents.actor.parameters()):
        assert_close(p_got, p - 1e-4 * g / (g.abs() + eps), atol=1e-12, msg="actor step")
    (g_alpha,) = torch.autograd.grad(alpha_loss, [ref.log_alpha])
    assert_close(
        agents.log_alpha,
        ref.log_alpha - 1e-4 * g_alpha / (g_alpha.abs() + eps),
        atol=1e-12,
        msg="alpha step",
    )


# ---------------------------------------------------------------------------------------
# 6. state_dict round trip
# ---------------------------------------------------------------------------------------
def test_state_dict_round_trip_gives_identical_updates(f64):
    N, B, obs_dim, A = 2, 4, 3, 2
    kw = dict(cql_n_actions=3, q_lr=1e-2, policy_lr=1e-2, alpha_lr=1e-2)
    a = CQLEnsemble(obs_dim, A, (8, 8), N, **kw)
    for bc in (True, False):
        a.update(make_batch(N, B, obs_dim, A), behaviour_cloning=bc)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # through a file, read as the checkpoints are
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    torch.manual_seed(123)
    b = CQLEnsemble(obs_dim, A, (8, 8), N, **kw)
    assert not torch.allclose(next(b.actor.parameters()), next(a.actor.parameters()))
    b.load_state_dict(state)

    for _ in range(2):
        batch = make_batch(N, B, obs_dim, A)
        noise = a.draw_noise(B)
        la = a.update(batch, behaviour_cloning=False, noise=noise)
        lb = b.update(batch, behaviour_cloning=False, noise=noise)
        for k in la:
            assert torch.equal(la[k], lb[k]), k
    sa, sb = a.state_dict(), b.state_dict()
    for key in ("actor", "qf", "qf_target"):
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), f"{key}.{name}"
    assert torch.equal(sa["log_alpha"], sb["log_alpha"])
    for opt in OPT_NAMES:
        st_a, st_b = sa[opt]["state"], sb[opt]["state"]
        assert st_a.keys() == st_b.keys() and len(st_a) > 0
        for idx in st_a:
            for k in st_a[idx]:
                assert torch.equal(torch.as_tensor(st_a[idx][k]), torch.as_tensor(st_b[idx][k])), (
                    f"{opt} {idx} {k}"
                )
        assert sa[opt]["param_groups"] == sb[opt]["param_groups"]


# ---------------------------------------------------------------------------------------
# 7. the merged policy's mean action (what evaluate() plays)
# ---------------------------------------------------------------------------------------
def test_merged_policy_mean_action(f64):
    N, B, A = 4, 5, 3
    mean, log_std = torch.randn(N, B, A) * 2, torch.randn(N, B, A)
    got = torch.tanh(ensemble_gaussian(mean, log_std)[0])
    assert got.shape == (B, A)
    expected = torch.tanh(sum(mean[i] for i in range(N)) / N)
    assert_close(got, expected, atol=1e-14)
    # not the mean of the members' tanh actions
    assert not torch.allclose(got, torch.tanh(mean).mean(0))
    assert_close(
        torch.tanh(ensemble_gaussian(mean[:1], log_std[:1])[0]), torch.tanh(mean[0]), atol=1e-15
    )


# ---------------------------------------------------------------------------------------
# 8. soft target update
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.005, 0.2])
def test_soft_target_update(f64, tau):
    N, B, obs_dim, A = 2, 4, 3, 2
    agents = CQLEnsemble(obs_dim, A, (8, 8), N, cql_n_actions=2, tau=tau, q_lr=1e-2)
    # initially the targets are a copy of the critics, and not the same tensors
    for pt, p in zip(agents.qf_target.parameters(), agents.qf.parameters()):
        assert torch.equal(pt, p) and pt.data_ptr() != p.data_ptr()
        assert not pt.requires_grad
    for _ in range(2):  # so that the targets differ from the critics
        agents.update(make_batch(N, B, obs_dim, A))
    old_target = [p.detach().clone() for p in agents.qf_target.parameters()]
    old_qf = [p.detach().clone() for p in agents.qf.parameters()]
    assert not all(torch.allclose(a, b) for a, b in zip(old_target, old_qf))
    agents.update(make_batch(N, B, obs_dim, A))
    for pt, p, ot, oq in zip(
        agents.qf_target.parameters(), agents.qf.parameters(), old_target, old_qf
    ):
        assert not torch.allclose(p, oq)  # the critics moved
        assert_close(
            pt,
            (1 - tau) * ot + tau * p,
            atol=1e-14,
            msg="target = (1 - tau) old target + tau new critic",
        )
