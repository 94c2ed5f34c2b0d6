"""Tests of bcq_finetune.py (BCQ, Fujimoto et al. 2019; BCQ-ft of Lee et al., appendix D): the VAE's
loss, the perturbation's bounds, the action selection, the critic target against a hand loop, where
each loss's gradients go, and end-to-end runs of the script on a tiny Minari dataset (both phases,
skipping the offline phase, resume, errors)."""

import copy
import glob
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from bcq_finetune import (
    BCQ,
    Args,
    ConditionalVAE,
    gradient_step,
    perturb,
    sample_latent,
    soft_clipped_target,
    vae_loss,
    validate_args,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_agent(obs_dim=4, action_dim=2, **kwargs):
    kwargs = dict(hidden_sizes=(8, 8), vae_hidden_sizes=(8, 8), target_candidates=3) | kwargs
    return BCQ(obs_dim, action_dim, **kwargs)


def make_batch(B=5, obs_dim=4, action_dim=2):
    obs, next_obs = torch.randn(B, obs_dim), torch.randn(B, obs_dim)
    actions = torch.rand(B, action_dim) * 2 - 1
    terminations = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])[:B]
    return [obs, actions, torch.randn(B), next_obs, terminations]


def randomize(module):
    """New random weights, so that a network and its target copy differ."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


# ---------------------------------------------------------------------------------------
# 1. the VAE
# ---------------------------------------------------------------------------------------
def test_vae_loss_is_mse_plus_half_kl_by_hand(f64):
    recon = torch.tensor([[0.1, -0.4], [0.9, 0.0], [-1.0, 0.3]])
    actions = torch.tensor([[0.0, -0.5], [1.0, 0.2], [-0.7, 0.3]])
    mean = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.1, -0.3], [0.0, 0.0, 1.5]])
    log_std = torch.tensor([[0.0, -1.0, 0.5], [-4.0, 2.0, 0.1], [1.0, -0.2, 0.0]])
    loss, recon_loss, kl = vae_loss(recon, actions, mean, log_std)

    squares = [
        (r - a) ** 2 for rr, aa in zip(recon.tolist(), actions.tolist()) for r, a in zip(rr, aa)
    ]
    mse = sum(squares) / 6
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2) / 2 - 1/2 per latent dim, averaged
    kls = [
        -ls + (math.exp(2 * ls) + m**2) / 2 - 0.5
        for mm, ll in zip(mean.tolist(), log_std.tolist())
        for m, ls in zip(mm, ll)
    ]
    hand_kl = sum(kls) / 9
    assert recon_loss.item() == pytest.approx(mse, rel=1e-12)
    assert kl.item() == pytest.approx(hand_kl, rel=1e-12)
    assert loss.item() == pytest.approx(mse + 0.5 * hand_kl, rel=1e-12)
    reference = kl_divergence(Normal(mean, log_std.exp()), Normal(0.0, 1.0)).mean()
    assert kl.item() == pytest.approx(reference.item(), rel=1e-12)


def test_vae_reconstructs_through_the_reparameterized_latent_and_clamps_log_std(f64):
    vae = ConditionalVAE(obs_dim=4, action_dim=2, latent_dim=3, hidden_sizes=(8,))
    obs, actions, eps = torch.randn(6, 4), torch.rand(6, 2) * 2 - 1, torch.randn(6, 3)
    recon, mean, log_std = vae(obs, actions, eps)
    torch.testing.assert_close(recon, vae.decode(obs, mean + log_std.exp() * eps))
    assert recon.abs().max() <= 1
    head = vae.encoder[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0, -100.0, 3.0]))
    mean, log_std = vae.encode(obs, actions)
    assert (mean == 0).all()
    assert (log_std == torch.tensor([15.0, -4.0, 3.0])).all()


def test_sampled_latents_are_normal_clipped_to_half():
    generator = torch.Generator().manual_seed(0)
    z = sample_latent(20_000, 3, "cpu", generator)
    expected = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, expected.clamp(-0.5, 0.5))
    assert z.abs().max() == 0.5
    # P(|N(0, 1)| > 0.5) = 0.617: that share sits on the clip
    assert (z.abs() == 0.5).float().mean().item() == pytest.approx(0.617, abs=0.01)


# ---------------------------------------------------------------------------------------
# 2. the perturbation
# ---------------------------------------------------------------------------------------
def test_perturbed_actions_stay_within_phi_of_the_vae_action_and_in_bounds(f64):
    phi = 0.05
    actions = torch.tensor([[-1.0, 1.0], [0.0, 0.99], [-0.97, 0.5], [1.0, -1.0], [0.3, -0.3]])
    for raw in (
        torch.full_like(actions, 1e6),
        torch.full_like(actions, -1e6),
        torch.tensor([[math.inf, -math.inf]]).expand_as(actions),
        torch.randn_like(actions) * 1e3,
    ):
        out = perturb(actions, raw, phi)
        assert ((out - actions).abs() <= phi + 1e-12).all()
        assert (out.abs() <= 1).all()
    # the whole Phi is available where the bounds allow it
    assert perturb(torch.zeros(1, 2), torch.tensor([[math.inf, -math.inf]]), phi).tolist() == [
        [phi, -phi]
    ]
    assert perturb(torch.tensor([[0.99, -1.0]]), torch.full((1, 2), 1e6), phi).tolist() == [
        [1.0, -1.0 + phi]
    ]

    # through the network, with an adversarial last layer
    agent = make_agent(phi=phi)
    with torch.no_grad():
        agent.actor.net[-1].weight.normal_(0, 1e4)
    obs = torch.randn(actions.shape[0], 4)
    out = agent.actor(obs, actions)
    assert ((out - actions).abs() <= phi + 1e-12).all() and (out.abs() <= 1).all()
    assert ((out - actions).abs() > 0.9 * phi).any()  # saturated, not silenced


# ---------------------------------------------------------------------------------------
# 3. acting
# ---------------------------------------------------------------------------------------
def test_act_takes_the_candidate_of_highest_q1(f64, monkeypatch):
    """Candidates tanh(z) (no perturbation); Q1 prefers the one closest to the state's first two
    coordinates, Q2 the farthest: the chosen action is the hand-found argmax of Q1."""
    agent, B, n = make_agent(), 4, 7
    with torch.no_grad():
        agent.actor.net[-1].weight.zero_()
        agent.actor.net[-1].bias.zero_()
    monkeypatch.setattr(agent.vae, "decode", lambda obs, z: torch.tanh(z[:, :2]))

    def q1(obs, actions):
        return -((actions - obs[:, :2]) ** 2).sum(-1)

    monkeypatch.setattr(agent.qf, "q1", q1)
    monkeypatch.setattr(
        agent.qf, "forward", lambda obs, actions: (q1(obs, actions), -q1(obs, actions))
    )
    obs = torch.rand(B, 4) * 2 - 1
    chosen = agent.act(obs, n, torch.Generator().manual_seed(3))

    z = sample_latent(B * n, agent.latent_dim, "cpu", torch.Generator().manual_seed(3))
    candidates = torch.tanh(z[:, :2]).view(B, n, 2)
    for b in range(B):
        distances = [((candidates[b, j] - obs[b, :2]) ** 2).sum().item() for j in range(n)]
        best = min(range(n), key=distances.__getitem__)
        assert torch.equal(chosen[b], candidates[b, best]), b
    assert len({tuple(c.tolist()) for c in chosen}) > 1  # each state its own choice


def test_act_draws_from_the_generator_it_is_given(f64):
    agent, obs = make_agent(), torch.randn(3, 4)
    first = agent.act(obs, 5, torch.Generator().manual_seed(1))
    assert torch.equal(first, agent.act(obs, 5, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, agent.act(obs, 5, torch.Generator().manual_seed(2)))


# ---------------------------------------------------------------------------------------
# 4. the critic target and the losses' gradients
# ---------------------------------------------------------------------------------------
def test_soft_clipped_target_by_hand(f64):
    q1 = torch.tensor([[1.0, 5.0, -2.0], [0.0, 0.5, 3.0]])
    q2 = torch.tensor([[2.0, 1.0, 4.0], [1.0, -1.0, 2.0]])
    rewards, terminations, gamma, lmbda = (
        torch.tensor([0.5, -1.0]),
        torch.tensor([0.0, 1.0]),
        0.9,
        0.7,
    )
    y = soft_clipped_target(q1, q2, rewards, terminations, gamma, lmbda)
    # state 0: 0.7 * min + 0.3 * max = 1.3, 2.2, -0.2 -> 2.2; state 1 terminal
    assert y.tolist() == pytest.approx([0.5 + 0.9 * 2.2, -1.0], rel=1e-12)


def test_critic_loss_target_equals_a_hand_loop(f64):
    """y_b = r_b + gamma (1 - d_b) max_j [lambda min + (1 - lambda) max] of the target critics at
    (s'_b, xi_target(s'_b, G(s'_b; z_bj))), z_bj the j-th of state b's n latents."""
    gamma, lmbda, n = 0.95, 0.75, 3
    agent = make_agent(gamma=gamma, lmbda=lmbda, target_candidates=n)
    randomize(agent.actor_target)  # each target differs from its network, so a mix-up shows
    randomize(agent.qf_target)
    batch = make_batch()
    obs, actions, rewards, next_obs, terminations = batch
    noise = agent.draw_noise(len(rewards))
    assert noise["target"].shape == (len(rewards) * n, agent.latent_dim)
    loss, logs = agent.critic_loss(*batch, noise)

    targets = []
    for b in range(len(rewards)):
        values = []
        for j in range(n):
            s = next_obs[b : b + 1]
            a = agent.actor_target(
                s, agent.vae.decode(s, noise["target"][b * n + j : b * n + j + 1])
            )
            q1, q2 = (q.item() for q in agent.qf_target(s, a))
            values.append(lmbda * min(q1, q2) + (1 - lmbda) * max(q1, q2))
        targets.append(rewards[b].item() + gamma * (1 - terminations[b].item()) * max(values))
    q1_data, q2_data = agent.qf(obs, actions)
    y = torch.tensor(targets)
    expected = ((q1_data - y) ** 2).mean() + ((q2_data - y) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert logs["q_data"].item() == pytest.approx(q1_data.mean().item(), rel=1e-12)


def grads(module):
    return [p.grad for p in module.parameters()]


def test_each_loss_reaches_only_its_network(f64):
    agent = make_agent()
    batch = make_batch()
    noise = agent.draw_noise(5)
    networks = {
        name: getattr(agent, name) for name in ("vae", "actor", "actor_target", "qf", "qf_target")
    }

    def reached():
        found = {
            n
            for n, m in networks.items()
            if any(g is not None and g.abs().sum() > 0 for g in grads(m))
        }
        for m in networks.values():
            m.zero_grad(set_to_none=True)
        return found

    agent.actor_loss(batch[0], noise).backward()
    assert reached() == {"actor"}
    recon, mean, log_std = agent.vae(*batch[:2], noise["vae"])
    vae_loss(recon, batch[1], mean, log_std)[0].backward()
    assert reached() == {"vae"}
    agent.critic_loss(*batch, noise)[0].backward()
    assert reached() == {"qf"}
    assert all(p.requires_grad for p in agent.qf.parameters())  # the actor loss restored them


def test_update_steps_every_network_then_soft_updates_the_targets(f64):
    tau = 0.1
    agent = make_agent(tau=tau)
    randomize(agent.actor_target)
    randomize(agent.qf_target)
    before = {
        n: [p.clone() for p in getattr(agent, n).parameters()] for n in ("vae", "actor", "qf")
    }
    targets = {
        n: [p.clone() for p in getattr(agent, f"{n}_target").parameters()] for n in ("actor", "qf")
    }
    logs = agent.update(make_batch())
    assert set(logs) == {"vae_loss", "recon_loss", "kl_loss", "qf_loss", "q_data", "actor_loss"}
    assert logs["vae_loss"].item() == pytest.approx(
        (logs["recon_loss"] + 0.5 * logs["kl_loss"]).item(), rel=1e-12
    )
    for name, old in before.items():
        assert all(not torch.equal(a, b) for a, b in zip(old, getattr(agent, name).parameters())), (
            name
        )
    for name, old in targets.items():
        for old_target, new, target in zip(
            old, getattr(agent, name).parameters(), getattr(agent, f"{name}_target").parameters()
        ):
            torch.testing.assert_close(target, (1 - tau) * old_target + tau * new)


def test_the_update_steps_the_vae_then_the_critics_then_the_actor_each_after_the_last(f64):
    """Algorithm 1's order: the critics' targets use the VAE after its step, the actor's loss the
    critics (and the VAE) after theirs."""
    agent = make_agent(vae_lr=0.05, q_lr=0.05)
    randomize(agent.qf_target)
    batch = make_batch()
    noise = agent.draw_noise(5)
    twin, old = copy.deepcopy(agent), copy.deepcopy(agent)
    agent.update(batch, noise)
    obs, actions = batch[:2]
    recon, mean, log_std = twin.vae(obs, actions, noise["vae"])
    gradient_step(twin.vae_optimizer, vae_loss(recon, actions, mean, log_std)[0])
    for mine, theirs in zip(grads(agent.vae), grads(twin.vae)):
        torch.testing.assert_close(mine, theirs)
    for copy_ in (twin, old):  # old: the critics' loss with the VAE before its step
        copy_.critic_loss(*batch, noise)[0].backward()
    for mine, theirs, before in zip(grads(agent.qf), grads(twin.qf), grads(old.qf)):
        torch.testing.assert_close(mine, theirs)
        assert not torch.allclose(theirs, before)
    twin.qf_optimizer.step()
    for copy_ in (twin, old):  # old: the actor's loss with the critics before their step
        copy_.actor_loss(obs, noise).backward()
    for mine, theirs, before in zip(grads(agent.actor), grads(twin.actor), grads(old.actor)):
        torch.testing.assert_close(mine, theirs)
        assert not torch.allclose(theirs, before)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(batch_size=0), "--batch-size must be >= 1"),
        (dict(total_timesteps=-1000), "--total-timesteps must be >= 1"),
        (dict(offline_steps=-1), "--offline-steps must be >= 0"),
        (dict(target_candidates=0), "--target-candidates must be >= 1"),
        (dict(latent_dim=0), "--latent-dim must be >= 1"),
        (dict(hidden_sizes=(64, 0)), "--hidden-sizes must be >= 1"),
        (dict(q_lr=0.0), "--q-lr must be > 0"),
        (dict(total_timesteps=1500), "multiple of --epoch-length"),
        (dict(lmbda=1.5), "--lmbda"),
    ],
)
def test_bad_numbers_are_refused_early(flags, message):
    import dataclasses

    with pytest.raises(ValueError, match=message):
        validate_args(dataclasses.replace(Args(), **flags))
    validate_args(Args())  # the defaults are valid
    validate_args(dataclasses.replace(Args(), offline_steps=0))


def test_defaults_are_the_authors():
    args = Args()
    assert (args.hidden_sizes, args.vae_hidden_sizes, args.latent_dim) == (
        (400, 300),
        (750, 750),
        None,
    )
    assert (args.phi, args.lmbda, args.target_candidates, args.select_candidates) == (
        0.05,
        0.75,
        10,
        100,
    )
    assert (args.policy_lr, args.q_lr, args.vae_lr, args.batch_size) == (1e-3, 1e-3, 1e-3, 100)
    assert (args.gamma, args.tau, args.offline_steps, args.exp_name) == (
        0.99,
        0.005,
        1_000_000,
        "bcq-ft",
    )
    assert make_agent(action_dim=3).latent_dim == 6


# ---------------------------------------------------------------------------------------
# 5. end to end: python bcq_finetune.py on a tiny Minari dataset
# ---------------------------------------------------------------------------------------
ENV = "hopper-medium-v2"  # a tiny local stand-in for mujoco/hopper/medium-v0, with its own refs
MINARI_REFS, D4RL_HOPPER = (-5.0, 123.0), (-20.272305, 3234.3)
TINY = (
    "--hidden-sizes 16 16 --vae-hidden-sizes 16 16 --batch-size 16 --epoch-length 100 "
    "--eval-episodes 2 --log-every 10 --offline-eval-every 10 --save-every-offline 10 "
    "--select-candidates 10 --no-cuda"
).split()
STATE = f"checkpoints/bcq-ft__{ENV}__seed1.pt"
OFFLINE = f"checkpoints/bcq-ft__{ENV}__seed1__offline.pt"


def write_dataset():
    """Random-action Hopper episodes of at most 50 steps (so evaluations are short and episodes
    end within an epoch), stored as a Minari dataset with reference scores."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env, rng, buffers = gym.make("Hopper-v5", max_episode_steps=50), np.random.default_rng(0), []
    while sum(len(b.rewards) for b in buffers) < 800:
        obs, _ = env.reset(seed=len(buffers))
        ep = {
            "observations": [obs],
            "actions": [],
            "rewards": [],
            "terminations": [],
            "truncations": [],
        }
        done = False
        while not done:
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            for k, v in zip(ep, (obs, action, reward, terminated, truncated)):
                ep[k].append(v)
        buffers.append(EpisodeBuffer(id=len(buffers), **{k: np.array(v) for k, v in ep.items()}))
    minari.create_dataset_from_buffers(
        "mujoco/hopper/medium-v0", buffers, env=env.spec, eval_env=env.spec,
        algorithm_name="random", author="test", author_email="test@example.com",
        code_permalink="tests/test_bcq.py", description="random Hopper episodes",
        ref_min_score=MINARI_REFS[0], ref_max_score=MINARI_REFS[1],
    )  # fmt: skip


def bcq(flags="", total=200, env_id=ENV):
    script = os.path.join(ROOT, "bcq_finetune.py")
    steps = ["--total-timesteps", str(total), "--offline-steps", "20"]
    return [sys.executable, script, "--env-id", env_id, *TINY, *steps, *flags.split()]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """All subprocess runs, a few at a time, in dependency phases, in one working directory."""
    work = tmp_path_factory.mktemp("bcq")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "minari"), "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", env["MINARI_DATASETS_PATH"])
        write_dataset()
    empty = {**env, "MINARI_DATASETS_PATH": str(work / "empty_minari")}
    results = {"work": work}

    def run_phase(jobs):
        def one(item):
            name, cmd = item
            run = dict(cwd=work, env=empty if name == "missing_dataset" else env, timeout=300)
            return name, subprocess.run(cmd, capture_output=True, text=True, **run)

        with ThreadPoolExecutor(max_workers=3) as pool:
            results.update(pool.map(one, jobs.items()))

    run_phase(
        {
            "full": bcq(),
            "resume1": bcq("--exp-name resume", total=100),
            "unknown_env": bcq("--exp-name x", env_id="hopper-v9"),
            "missing_dataset": bcq("--exp-name x"),
            "bad_number": bcq("--exp-name x --target-candidates 0"),
            "missing_offline": bcq("--exp-name x --offline-steps 0"),
        }
    )
    results["state_mtime"] = (work / STATE).stat().st_mtime_ns if (work / STATE).exists() else 0
    run_phase(
        {
            "skip": bcq(f"--exp-name skip --offline-steps 0 --offline-checkpoint {OFFLINE}"),
            "resume2": bcq("--exp-name resume --resume"),
            "exists": bcq(),
            "resume_changed": bcq("--resume --phi 0.1"),
        }
    )
    results["resume_events"] = sorted(glob.glob(str(work / "runs" / f"{ENV}__resume__1__*/*")))
    run_phase({"resume_done": bcq("--exp-name resume --resume")})
    return results


def ok(out):
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


def scalars(work, exp_name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = glob.glob(str(work / "runs" / f"{ENV}__{exp_name}__1__*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def steps(series):
    return [s for s, _ in series]


def check_error(out, *needles):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), out.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


LOSSES = ("vae_loss", "recon_loss", "kl_loss", "qf_loss", "q_data", "actor_loss")


def test_offline_phase_then_online_phase(e2e):
    out, work = ok(e2e["full"]), e2e["work"]
    assert "offline step 20/20" in out.stdout and f"Wrote {OFFLINE}" in out.stdout
    assert "eval after 0 online steps" in out.stdout and "epoch 2/2" in out.stdout
    tags = scalars(work, "bcq-ft")
    # offline phase: x = gradient steps, under offline/
    for loss in LOSSES:
        assert steps(tags[f"offline/losses/{loss}"]) == [10, 20], loss
    assert steps(tags["offline/eval/return"]) == [10, 20]
    assert steps(tags["offline/charts/SPS"]) == [10, 20]
    # online phase: x = online env steps, 0 = the agent after the offline phase
    for tag in ("eval/return", "eval/normalized_score", "eval/minari_normalized_score"):
        assert steps(tags[tag]) == [0, 100, 200], tag
    for loss in LOSSES:
        assert steps(tags[f"losses/{loss}"]) == [100, 200], loss
        assert all(math.isfinite(v) for _, v in tags[f"losses/{loss}"])
    assert steps(tags["charts/SPS"]) == [100, 200]
    returns = np.array([v for _, v in tags["eval/return"]])
    np.testing.assert_allclose(
        [v for _, v in tags["eval/normalized_score"]],
        100 * (returns - D4RL_HOPPER[0]) / (D4RL_HOPPER[1] - D4RL_HOPPER[0]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        [v for _, v in tags["eval/minari_normalized_score"]],
        100 * (returns - MINARI_REFS[0]) / (MINARI_REFS[1] - MINARI_REFS[0]),
        rtol=1e-5,
    )
    # an evaluation depends on the weights alone: step 0 repeats the last offline evaluation
    assert tags["eval/return"][0][1] == tags["offline/eval/return"][-1][1]
    episodes = steps(tags["charts/episodic_return"])  # episodes end within 50 steps
    assert len(episodes) >= 4 and episodes == sorted(episodes) and 0 < episodes[0] <= 50

    state = torch.load(work / STATE, weights_only=True)
    assert (state["epoch"], state["offline_step"]) == (2, 20)
    assert len(state["replay"]["rewards"]) == 200 and state["replay"]["actions"].abs().max() <= 1
    meta = state["metadata"]
    assert (
        meta["latent_dim"] == 6 and meta["dataset_id"] == ENV and meta["hidden_sizes"] == [16, 16]
    )
    assert state["vae"]["encoder.0.weight"].shape == (16, 11 + 3)
    assert state["vae"]["decoder.0.weight"].shape == (16, 11 + 6)
    offline = torch.load(work / OFFLINE, weights_only=True)
    assert offline["format_version"] == 1 and offline["metadata"]["args"]["offline_steps"] == 20
    assert not torch.equal(offline["actor"]["net.0.weight"], state["actor"]["net.0.weight"])


def tensors(tree, prefix=""):
    """Every tensor of a checkpoint by its path, but the settings it records."""
    if isinstance(tree, dict):
        items = [(k, v) for k, v in tree.items() if k != "metadata"]
        return {p: t for k, v in items for p, t in tensors(v, f"{prefix}{k}.").items()}
    return {prefix: tree} if isinstance(tree, torch.Tensor) else {}


def test_offline_steps_0_starts_from_the_offline_checkpoint(e2e):
    """--offline-steps 0 skips the offline phase: the same step-0 evaluation as the run that made
    the checkpoint, and the same online phase, bit for bit."""
    out, work = ok(e2e["skip"]), e2e["work"]
    ok(e2e["full"])
    assert f"Starting from {OFFLINE} (20 offline steps); no offline phase" in out.stdout
    assert not any(line.startswith("offline step") for line in out.stdout.splitlines())
    assert "epoch 2/2" in out.stdout
    tags, full = scalars(work, "skip"), scalars(work, "bcq-ft")
    assert not any(tag.startswith("offline/") for tag in tags)
    assert tags["eval/return"][0] == full["eval/return"][0]
    assert tags["eval/return"] == full["eval/return"]
    first = tensors(torch.load(work / STATE, weights_only=True))
    second = tensors(torch.load(work / f"checkpoints/skip__{ENV}__seed1.pt", weights_only=True))
    assert first.keys() == second.keys() and len(first) > 40
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_resume_continues_and_logs_every_epoch_once(e2e):
    first, second, work = ok(e2e["resume1"]), ok(e2e["resume2"]), e2e["work"]
    assert "offline step 20/20" in first.stdout and "epoch 1/1" in first.stdout
    assert "Resuming" in second.stdout and "after offline step 20, epoch 1" in second.stdout
    assert "epoch 2/2" in second.stdout and "epoch 1/2" not in second.stdout
    assert not any(line.startswith("offline step") for line in second.stdout.splitlines())
    assert "eval after 0 online steps" not in second.stdout
    state = torch.load(work / f"checkpoints/resume__{ENV}__seed1.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["replay"]["rewards"]) == 200
    tags = scalars(work, "resume")  # one run directory, continued
    assert steps(tags["eval/return"]) == [0, 100, 200]
    assert steps(tags["losses/qf_loss"]) == [100, 200]
    assert steps(tags["offline/losses/qf_loss"]) == [10, 20]


def test_existing_state_needs_resume(e2e):
    check_error(e2e["exists"], "--resume", STATE)
    assert (e2e["work"] / STATE).stat().st_mtime_ns == e2e["state_mtime"]


def test_resume_with_other_settings_fails_naming_them(e2e):
    check_error(e2e["resume_changed"], "phi", STATE)
    assert (e2e["work"] / STATE).stat().st_mtime_ns == e2e["state_mtime"]


def test_bad_input_fails_in_one_line(e2e):
    check_error(e2e["unknown_env"], "unknown --env-id 'hopper-v9'")
    check_error(e2e["missing_dataset"], "mujoco/hopper/medium-v0", "minari download")
    check_error(e2e["bad_number"], "--target-candidates must be >= 1")
    check_error(
        e2e["missing_offline"], f"checkpoints/x__{ENV}__seed1__offline.pt", "--offline-steps N > 0"
    )
    assert not (e2e["work"] / f"checkpoints/x__{ENV}__seed1.pt").exists()


def test_a_finished_run_resumed_says_so_and_leaves_its_logs(e2e):
    out = ok(e2e["resume_done"])
    state = f"checkpoints/resume__{ENV}__seed1.pt"
    assert f"{state} is complete (2 epochs): nothing to resume" in out.stdout
    after = sorted(glob.glob(str(e2e["work"] / "runs" / f"{ENV}__resume__1__*/*")))
    assert after == e2e["resume_events"] and len(after) == 2  # no new event file
