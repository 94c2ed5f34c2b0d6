"""Tests of awac_finetune.py (docs/awac_finetune.md): the policy's log-density, the advantage, its
weights and the actor loss, the critic's target, each against a hand computation in float64; and
end-to-end runs of the script on a tiny generated dataset (both phases, logs, the offline
checkpoint, resume, errors).
"""

import copy
import glob
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.distributions import Independent, Normal

from awac_finetune import (
    AWAC,
    GaussianPolicy,
    advantage,
    advantage_weights,
    gaussian_log_prob,
    weighted_log_likelihood_loss,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBS, A, B = 5, 3, 16


def make_agent(**kwargs):
    agent = AWAC(OBS, A, (16, 16), (16, 16), **kwargs)
    with torch.no_grad():  # away from the initialization: Q's and the std that differ
        for p in [*agent.qf.parameters(), *agent.policy.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    return agent


def make_batch():
    obs, next_obs = torch.randn(B, OBS), torch.randn(B, OBS)
    actions = torch.rand(B, A) * 2 - 1
    rewards = torch.randn(B)
    terminations = (torch.rand(B) < 0.4).double()
    terminations[0], terminations[1] = 1.0, 0.0
    return obs, actions, rewards, next_obs, terminations


def q(net, obs, actions):
    return net(torch.cat([obs, actions], -1)).squeeze(-1)


def hand_policy(policy, obs):
    """The authors' GaussianPolicy, written out: tanh mean, std from the sigmoid of l."""
    mean = torch.tanh(policy.net(obs))
    log_std = -6.0 + torch.sigmoid(policy.log_std_logits) * 6.0
    return mean, log_std.expand_as(mean)


# ---------------------------------------------------------------------------------------
# 1. the policy
# ---------------------------------------------------------------------------------------
def test_policy_and_log_prob_against_torch_distributions(f64):
    policy = GaussianPolicy(OBS, A, (16, 16))
    obs = torch.randn(B, OBS)
    mean, log_std = policy(obs)
    assert torch.allclose(log_std, torch.full((B, A), -3.0))  # sigmoid(0) = 1/2 of [-6, 0]
    with torch.no_grad():
        policy.log_std_logits.copy_(torch.tensor([-2.0, 0.5, 3.0]))
    mean, log_std = policy(obs)
    mean_ref, log_std_ref = hand_policy(policy, obs)
    assert torch.equal(mean, mean_ref) and torch.allclose(log_std, log_std_ref, atol=1e-14)
    assert (mean.abs() < 1).all() and (log_std > -6).all() and (log_std < 0).all()
    actions = mean + 3 * log_std.exp() * torch.randn(B, A)  # beyond [-1, 1] too: not squashed
    actions[0] = 1.5
    expected = Independent(Normal(mean, log_std.exp()), 1).log_prob(actions)
    assert torch.allclose(gaussian_log_prob(mean, log_std, actions), expected, atol=1e-12)


# ---------------------------------------------------------------------------------------
# 2. the advantage, its weights and the actor loss
# ---------------------------------------------------------------------------------------
def test_advantage_is_min_q_at_data_action_minus_min_q_at_a_policy_sample(f64):
    agent = make_agent()
    obs, actions = make_batch()[:2]
    policy_actions = torch.rand(B, A) * 2 - 1
    q1, q2 = agent.qf.q1, agent.qf.q2
    q_data = torch.minimum(q(q1, obs, actions), q(q2, obs, actions))
    v = torch.minimum(q(q1, obs, policy_actions), q(q2, obs, policy_actions))
    adv = advantage(agent.qf, obs, actions, policy_actions)
    assert torch.allclose(adv, q_data - v, atol=1e-12)
    # the two critics disagree here, so Q_1 alone (awr_min_q=False) would differ
    q1_only = q(q1, obs, actions) - q(q1, obs, policy_actions)
    assert not torch.allclose(adv, q1_only, atol=1e-3)


def test_advantage_weights_are_batch_size_times_softmax_and_unclipped(f64):
    adv = torch.tensor([3.0, -1.0, 0.5, 10.0])
    w = advantage_weights(adv, beta=0.5)
    expected = 4 * torch.exp(adv / 0.5) / torch.exp(adv / 0.5).sum()
    assert torch.allclose(w, expected, atol=1e-12)
    assert w.mean().item() == pytest.approx(1.0) and w.max() > 3.99  # one sample takes it all


@pytest.mark.parametrize("beta", [2.0, 0.3])
def test_actor_loss_equals_direct_computation(f64, beta):
    agent = make_agent(beta=beta)
    obs, actions = make_batch()[:2]
    noise = agent.draw_noise(B)
    loss, logs = agent.actor_loss(obs, actions, noise)
    # by hand: a_pi = mean + std eps, A from the min of both critics, w = B softmax(A / beta)
    mean, log_std = hand_policy(agent.policy, obs)
    a_pi = mean + log_std.exp() * noise["policy"]
    q1, q2 = agent.qf.q1, agent.qf.q2
    adv = torch.minimum(q(q1, obs, actions), q(q2, obs, actions)) - torch.minimum(
        q(q1, obs, a_pi), q(q2, obs, a_pi)
    )
    w = torch.exp(adv / beta) / torch.exp(adv / beta).sum() * B
    log_prob = Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    expected = -(log_prob * w).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert logs["advantage"].item() == pytest.approx(adv.mean().item(), rel=1e-10, abs=1e-12)
    assert logs["weight_max"].item() == pytest.approx(w.max().item(), rel=1e-10)
    # no entropy term, and the weights matter: unweighted likelihood gives another loss
    assert abs(loss.item() + log_prob.mean().item()) > 1e-6


def test_actor_loss_gradients_reach_only_the_actor(f64):
    agent = make_agent()
    obs, actions = make_batch()[:2]
    loss, _ = agent.actor_loss(obs, actions, agent.draw_noise(B))
    loss.backward()
    assert all(p.grad is None for p in agent.qf.parameters())
    assert all(p.grad is None for p in agent.qf_target.parameters())
    grads = [p.grad for p in agent.policy.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the std's logits too
    # the loss itself treats the weights as constants, whatever computed them
    weights, log_prob = torch.rand(B, requires_grad=True), torch.randn(B, requires_grad=True)
    weighted_log_likelihood_loss(log_prob, weights).backward()
    assert weights.grad is None and torch.allclose(log_prob.grad, -weights.detach() / B)


# ---------------------------------------------------------------------------------------
# 3. the critics
# ---------------------------------------------------------------------------------------
def test_critic_loss_matches_hand_td_target(f64):
    agent = make_agent(gamma=0.9, reward_scale=2.0)
    with torch.no_grad():  # targets different from the critics, so mixing them up shows
        for p in agent.qf_target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    batch = make_batch()
    obs, actions, rewards, next_obs, terminations = batch
    noise = agent.draw_noise(B)
    loss, logs = agent.critic_loss(*batch, noise)
    next_mean, next_log_std = hand_policy(agent.policy, next_obs)
    next_a = next_mean + next_log_std.exp() * noise["next"]  # a' ~ pi(.|s'), not squashed
    t1, t2 = agent.qf_target.q1, agent.qf_target.q2
    next_q = torch.minimum(q(t1, next_obs, next_a), q(t2, next_obs, next_a))
    y = 2.0 * rewards + 0.9 * (1 - terminations) * next_q  # no -alpha log pi term
    q1, q2 = q(agent.qf.q1, obs, actions), q(agent.qf.q2, obs, actions)
    expected = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert logs["q_data"].item() == pytest.approx((q1 + q2).mean().item() / 2, rel=1e-10)
    loss.backward()
    assert all(p.grad is None for p in agent.policy.parameters())


def test_update_steps_both_and_soft_updates_targets(f64):
    agent = make_agent(tau=0.1)
    old_target = [p.clone() for p in agent.qf_target.parameters()]
    old_policy = [p.clone() for p in agent.policy.parameters()]
    agent.update(make_batch())
    for t, p, old in zip(agent.qf_target.parameters(), agent.qf.parameters(), old_target):
        assert torch.allclose(t, 0.9 * old + 0.1 * p, atol=1e-12)
    assert all(not torch.equal(p, o) for p, o in zip(agent.policy.parameters(), old_policy))


def grads(module):
    return [p.grad.clone() for p in module.parameters()]


def test_both_losses_come_from_the_networks_before_either_step(f64):
    """The authors' trainer computes both losses, then steps: the advantages that weigh the actor
    loss come from the critics before their step (and the critics' targets from the policy before
    its step)."""
    agent = make_agent(q_lr=0.05)
    batch = make_batch()
    noise = agent.draw_noise(B)
    twin = copy.deepcopy(agent)
    agent.update(batch, noise)
    qf_loss, _ = twin.critic_loss(*batch, noise)
    actor_loss, _ = twin.actor_loss(batch[0], batch[1], noise)
    (qf_loss + actor_loss).backward()  # disjoint parameters
    for mine, theirs in zip(grads(agent.qf), grads(twin.qf)):
        torch.testing.assert_close(mine, theirs)
    before_critic_step = grads(twin.policy)
    for mine, theirs in zip(grads(agent.policy), before_critic_step):
        torch.testing.assert_close(mine, theirs)
    # the test can tell: after the critics' step, the actor's gradient is another
    twin.qf_optimizer.step()
    twin.policy.zero_grad()
    twin.actor_loss(batch[0], batch[1], noise)[0].backward()
    assert not all(torch.allclose(a, b) for a, b in zip(before_critic_step, grads(twin.policy)))


def test_loading_a_state_keeps_this_runs_optimizer_settings(f64):
    saved = make_agent(policy_lr=1e-3, q_lr=2e-3, policy_weight_decay=0.0)
    saved.update(make_batch())
    agent = make_agent()
    agent.load_state_dict(saved.state_dict())
    assert torch.equal(agent.policy.net[0].weight, saved.policy.net[0].weight)
    policy_group, qf_group = (
        agent.policy_optimizer.param_groups[0],
        agent.qf_optimizer.param_groups[0],
    )
    assert (policy_group["lr"], policy_group["weight_decay"], qf_group["lr"]) == (3e-4, 1e-4, 3e-4)
    assert agent.policy_optimizer.state_dict()["state"][0]["step"] == 1  # Adam's state loaded


# ---------------------------------------------------------------------------------------
# 4. end to end: python awac_finetune.py on a tiny generated dataset
# ---------------------------------------------------------------------------------------
ENV = "halfcheetah-random-v2"
TINY = (
    "--random-dataset-size 2000 --offline-steps 30 --log-every 10 --save-every-offline 20 "
    "--epoch-length 200 --min-steps-before-training 200 --batch-size 64 --offline-batch-size 32 "
    "--policy-hidden-sizes 32 32 --q-hidden-sizes 32 32 --eval-episodes 1 --save-every 1 --no-cuda"
).split()
HALFCHEETAH_REFS = (-280.178953, 12135.0)


def awac(flags="", env_id=ENV, total=1200):
    script = os.path.join(ROOT, "awac_finetune.py")
    total = ["--total-timesteps", str(total)]
    return [sys.executable, script, "--env-id", env_id, *TINY, *total, *flags.split()]


def state_path(exp_name):
    return f"checkpoints/{exp_name}__{ENV}__seed1.pt"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """All subprocess runs, a few at a time, in dependency phases, in one working directory."""
    work = tmp_path_factory.mktemp("awac")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "minari"), "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    empty_env = {**env, "MINARI_DATASETS_PATH": str(work / "empty_minari")}
    results = {"work": work}

    def run_phase(jobs):
        def one(item):
            name, cmd = item
            job_env = empty_env if name.startswith("missing") else env
            run = dict(cwd=work, env=job_env, capture_output=True, text=True, timeout=300)
            return name, subprocess.run(cmd, **run)

        with ThreadPoolExecutor(max_workers=4) as pool:
            results.update(pool.map(one, jobs.items()))

    (work / "notes.txt").write_text("not a D4RL file\n")
    script = os.path.join(ROOT, "cql_pretrain.py")
    dataset = [sys.executable, script, "--env-id", ENV, "--random-dataset-size", "2000"]
    run_phase(
        {
            "dataset": [*dataset, "--dataset-only"],
            "bad_env": awac("--exp-name bad", env_id="cheetah-fast-v9"),
            "missing_dataset": awac("--exp-name missing", env_id="hopper-medium-v2"),
            "bad_number": awac("--exp-name bad --batch-size 0"),
            "bad_total": awac("--exp-name bad", total=300),
            "not_hdf5": awac("--exp-name bad --dataset-path notes.txt"),
        }
    )
    run_phase(
        {
            "main": awac("--exp-name main"),
            "resume1": awac("--exp-name resume", total=200),
            "no_offline": awac("--exp-name none --offline-steps 0"),
        }
    )
    main_state = work / state_path("main")
    results["main_mtime"] = main_state.stat().st_mtime_ns if main_state.exists() else None
    offline = f"checkpoints/main__{ENV}__seed1__offline.pt"
    run_phase(
        {
            "skip": awac(
                f"--exp-name skip --offline-steps 0 --offline-checkpoint {offline}", total=200
            ),
            "resume2": awac("--exp-name resume --resume", total=400),
            "exists": awac("--exp-name main"),
            "resume_changed": awac("--exp-name main --resume --beta 1"),
        }
    )
    results["resume_events"] = sorted(glob.glob(str(work / "runs" / f"{ENV}__resume__1__*/*")))
    run_phase({"resume_done": awac("--exp-name resume --resume", total=400)})
    return results


def ok(out):
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


def scalars(work, exp_name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = glob.glob(str(work / "runs" / f"{ENV}__{exp_name}__1__*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


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


def test_offline_then_online_logs_and_checkpoints(e2e):
    out, work = ok(e2e["main"]), e2e["work"]
    assert "offline step 30/30" in out.stdout and "epoch 6/6" in out.stdout
    tags = scalars(work, "main")
    for tag in ("offline/losses/qf_loss", "offline/losses/actor_loss", "offline/losses/advantage"):
        assert steps(tags[tag]) == [10, 20, 30], tag
    # online x axis: env steps, 0 = the agent after the offline phase, then every epoch
    online = [0, 200, 400, 600, 800, 1000, 1200]
    assert steps(tags["eval/return"]) == online
    assert steps(tags["eval/normalized_score"]) == online
    lo, hi = HALFCHEETAH_REFS
    for (_, ret), (_, score) in zip(tags["eval/return"], tags["eval/normalized_score"]):
        assert score == pytest.approx(100 * (ret - lo) / (hi - lo), rel=1e-4, abs=1e-4)
    assert steps(tags["charts/SPS"]) == online[1:]
    # the first epoch only collects (--min-steps-before-training 200)
    for tag in ("losses/qf_loss", "losses/actor_loss", "losses/weight_max", "losses/policy_std"):
        assert steps(tags[tag]) == online[2:], tag
        assert all(math.isfinite(v) for _, v in tags[tag]), tag
    assert all(0 < v <= 1 for _, v in tags["losses/policy_std"])  # sigma <= e^0
    assert steps(tags["charts/episodic_return"]) == [1000]  # HalfCheetah's time limit
    assert not any(t.startswith("eval/minari") for t in tags)  # the random dataset has no refs
    state = torch.load(work / state_path("main"), weights_only=True)
    assert state["epoch"] == 6 and state["offline_step"] == 30
    assert len(state["replay"]["rewards"]) == 1200
    offline = torch.load(work / f"checkpoints/main__{ENV}__seed1__offline.pt", weights_only=True)
    assert offline["metadata"]["dataset_id"] == ENV and "replay" not in offline
    assert offline["policy"]["net.0.weight"].shape == (32, 17)


def test_offline_steps_0_starts_from_the_offline_checkpoint(e2e):
    out, work = ok(e2e["skip"]), e2e["work"]
    assert "offline step 10/" not in out.stdout and "offline phase skipped" in out.stdout
    first = scalars(work, "main")["eval/return"][0]
    tags = scalars(work, "skip")
    assert not any(t.startswith("offline/") for t in tags)
    assert tags["eval/return"][0] == first  # the same agent, the same evaluation episodes


def test_offline_steps_0_without_a_checkpoint_says_how_to_make_it(e2e):
    check_error(e2e["no_offline"], f"checkpoints/none__{ENV}__seed1__offline.pt", "--offline-steps")


def test_resume_continues_after_epoch_one(e2e):
    first, second, work = ok(e2e["resume1"]), ok(e2e["resume2"]), e2e["work"]
    assert "epoch 1/1" in first.stdout
    assert "Resuming" in second.stdout and "epoch 1" in second.stdout
    assert "epoch 2/2" in second.stdout and "epoch 1/2" not in second.stdout
    assert "offline step 30/30" not in second.stdout and "eval after 0 online" not in second.stdout
    tags = scalars(work, "resume")  # one run directory for both parts, each step logged once
    assert steps(tags["eval/return"]) == [0, 200, 400]
    assert steps(tags["offline/losses/qf_loss"]) == [10, 20, 30]
    assert steps(tags["losses/qf_loss"]) == [400]
    state = torch.load(work / state_path("resume"), weights_only=True)
    assert state["epoch"] == 2 and len(state["replay"]["rewards"]) == 400


def test_existing_state_needs_resume(e2e):
    check_error(e2e["exists"], "--resume", state_path("main"))
    assert os.stat(e2e["work"] / state_path("main")).st_mtime_ns == e2e["main_mtime"]


def test_resume_with_other_settings_fails_naming_them(e2e):
    check_error(e2e["resume_changed"], "beta", state_path("main"))


def test_bad_input_fails_in_one_line(e2e):
    check_error(e2e["bad_env"], "unknown --env-id 'cheetah-fast-v9'")
    check_error(e2e["missing_dataset"], "mujoco/hopper/medium-v0", "minari download")
    check_error(e2e["bad_number"], "--batch-size must be >= 1, got 0")
    check_error(e2e["bad_total"], "--total-timesteps 300", "--epoch-length 200")


def test_a_non_finite_loss_stops_the_run_keeping_the_last_good_state():
    from awac_finetune import stop_if_not_finite

    stop_if_not_finite(
        {"qf_loss": 1.0, "actor_loss": -2.0}, "in epoch 3", "s.pt"
    )  # finite: goes on
    with pytest.raises(SystemExit) as stop:
        stop_if_not_finite({"qf_loss": float("nan"), "actor_loss": 0.0}, "in epoch 3", "s.pt")
    assert str(stop.value).startswith("error: non-finite loss in epoch 3")
    assert "s.pt" in str(stop.value) and "--resume" in str(stop.value)


def test_a_finished_run_resumed_says_so_and_leaves_its_logs(e2e):
    out = ok(e2e["resume_done"])
    assert f"{state_path('resume')} is complete (2 epochs): nothing to resume" in out.stdout
    after = sorted(glob.glob(str(e2e["work"] / "runs" / f"{ENV}__resume__1__*/*")))
    assert after == e2e["resume_events"] and len(after) == 2  # no new event file


def test_a_dataset_path_that_is_not_hdf5_is_one_error_line(e2e):
    check_error(e2e["not_hdf5"], "--dataset-path notes.txt is not an HDF5 file", "observations")
