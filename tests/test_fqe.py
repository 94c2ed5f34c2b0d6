"""fqe_baseline.py (paper section 3.3, Figure 1c): FQE recovers a known soft Q-function, the
Monte-Carlo check computes the soft return, and the script writes a checkpoint that
off2on_finetune.py fine-tunes from."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fqe_baseline as fqe_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# 1. FQE on a small MDP whose soft Q-function is computable
# ---------------------------------------------------------------------------------------------
def chain_mdp(K=4, c=0.5):
    """One-hot states s_0..s_{K-1}, s_k -> s_{k+1 mod K} whatever the action; reward r_k + c a_0;
    s_{K-1} is terminal (d = 1)."""
    rewards = torch.linspace(-1, 1, K)
    terminal = torch.zeros(K)
    terminal[-1] = 1
    return rewards, terminal, c


def true_soft_q(actor, alpha, rewards, terminal, c, gamma, n_samples=200_000):
    """Q_i(s_k, a) = r_k + c a_0 + gamma (1 - d_k) W_i(s_{k+1}), where
    W_i(s) = E_{a~pi_i}[Q_i(s, a) - alpha_i log pi_i(a|s)] solves
    W_i(s_k) = r_k + m_ik + gamma (1 - d_k) W_i(s_{k+1}), m_ik = E[c a_0 - alpha_i log pi_i(a|s_k)]
    (by sampling). Returns a function (member i, state k, actions [B, A]) -> Q [B]."""
    K, N = len(rewards), len(alpha)
    states = torch.eye(K)
    with torch.no_grad():
        mean, log_std = actor(states.expand(N, -1, -1))  # [N, K, A]
        generator = torch.Generator().manual_seed(1)
        shape = (N, K, n_samples, mean.shape[-1])
        eps = torch.randn(shape, generator=generator, dtype=mean.dtype)
        a, log_pi = fqe_mod.tanh_gaussian_sample(mean[:, :, None], log_std[:, :, None], eps)
        m = (c * a[..., 0] - alpha[:, None, None] * log_pi).mean(-1)  # [N, K]
    W = []
    for i in range(N):  # (I - gamma (1 - d) P) W = r + m
        A = torch.eye(K, dtype=torch.float64)
        for k in range(K):
            A[k, (k + 1) % K] -= gamma * (1 - terminal[k])
        W.append(torch.linalg.solve(A, (rewards + m[i]).double()))
    W = torch.stack(W).float()

    def q(i, k, actions):
        return rewards[k] + c * actions[:, 0] + gamma * (1 - terminal[k]) * W[i, (k + 1) % K]

    return q


def test_fqe_converges_to_the_soft_q_of_fixed_actors():
    torch.manual_seed(0)
    K, A, N, gamma = 4, 2, 2, 0.8
    rewards, terminal, c = chain_mdp(K)
    actor = fqe_mod.Actor(K, A, (32, 32), N)
    alpha = torch.tensor([0.05, 0.2])
    fqe = fqe_mod.FQE(actor, alpha.log(), K, A, (64, 64), N, gamma=gamma, tau=0.05, lr=1e-3)
    q_true = true_soft_q(actor, alpha, rewards, terminal, c, gamma)
    B, one_hot = 256, torch.eye(K)
    for _ in range(2500):  # fresh data each step: every state, uniform actions
        k = torch.randint(K, (N, B))
        actions = torch.rand(N, B, A) * 2 - 1
        reward = rewards[k] + c * actions[..., 0]
        fqe.update([one_hot[k], actions, reward, one_hot[(k + 1) % K], terminal[k]])
    test_actions = torch.rand(64, A) * 2 - 1
    with torch.no_grad():
        for i in range(N):
            for k in range(K):
                obs = one_hot[k].expand(N, 64, -1)
                q = fqe.qf(obs, test_actions.expand(N, -1, -1))[i]  # [2, 64]: both critics
                expected = q_true(i, k, test_actions)
                err = (q - expected).abs().max().item()
                assert err < 0.15, (
                    f"member {i}, state {k}: max |Q - Q_true| = {err:.3f} "
                    f"(Q_true in [{expected.min():.2f}, {expected.max():.2f}])"
                )
    # the two members have different alphas and actors, hence different soft values: each was
    # fitted to its own
    assert not torch.allclose(q_true(0, 0, test_actions), q_true(1, 0, test_actions), atol=0.3)


def test_fqe_loss_is_each_members_own_bellman_error():
    """Member i's gradient does not depend on member j's data: perturbing member 1's batch leaves
    member 0's critic gradient unchanged, and the loss equals the per-member sum."""
    torch.manual_seed(0)
    N, obs_dim, A, B = 3, 5, 2, 8
    fqe = fqe_mod.FQE(fqe_mod.Actor(obs_dim, A, (16,), N), torch.zeros(N), obs_dim, A, (16,), N)
    batch = [
        torch.randn(N, B, obs_dim),
        torch.rand(N, B, A) * 2 - 1,
        torch.randn(N, B),
        torch.randn(N, B, obs_dim),
        torch.zeros(N, B),
    ]
    noise = torch.randn(N, B, A)

    def member0_grad(batch):
        fqe.qf.zero_grad()
        fqe.critic_loss(*batch, noise)[0].backward()
        return fqe.qf.net[0].weight.grad[:2].clone()  # rows 0, 1: agent 0's two critics

    g = member0_grad(batch)
    batch2 = [x.clone() for x in batch]
    batch2[2][1] += 10.0  # member 1's rewards
    assert torch.equal(g, member0_grad(batch2))
    agent1_grad = fqe.qf.net[0].weight.grad[2:4]
    assert not torch.equal(agent1_grad, torch.zeros_like(agent1_grad))

    with torch.no_grad():
        loss, _ = fqe.critic_loss(*batch, noise)
        obs, actions, rewards, next_obs, terminations = batch
        a, log_pi = fqe_mod.tanh_gaussian_sample(*fqe.actor(next_obs), noise)
        expected = 0.0
        for i in range(N):
            next_q = fqe.qf_target(next_obs, a)[i].min(0).values - 1.0 * log_pi[i]
            y = rewards[i] + 0.99 * (1 - terminations[i]) * next_q
            expected += ((fqe.qf(obs, actions)[i] - y) ** 2).mean(-1).sum()
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------
# 2. The Monte-Carlo check on an environment with a known return
# ---------------------------------------------------------------------------------------------
class ConstantRewardEnv:
    """obs [0], reward 1 every step, terminated after `length` steps; actions in [-2, 2]."""

    def __init__(self, length=3):
        import gymnasium as gym

        self.length, self.t = length, 0
        self.action_space = gym.spaces.Box(-2.0, 2.0, (2,))

    def reset(self, seed=None):
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        assert np.all(np.abs(action) <= 2.0)
        self.t += 1
        return np.zeros(1, np.float32), 1.0, self.t == self.length, False, {}


class ConstantCritic(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, obs, actions):
        return torch.full((obs.shape[0], 2, obs.shape[1]), self.value)


def test_monte_carlo_check_returns_the_discounted_soft_return():
    torch.manual_seed(0)
    N, E, T, gamma = 2, 2000, 3, 0.9
    actor = fqe_mod.Actor(1, 2, (8,), N)
    alpha = torch.tensor([0.0, 0.5])
    envs = [ConstantRewardEnv(T) for _ in range(N * E)]
    out = fqe_mod.monte_carlo_check(
        actor, {"fqe": ConstantCritic(7.0)}, alpha, envs, gamma, 0, "cpu"
    )
    np.testing.assert_allclose(out["fqe"], [7.0, 7.0])
    discounted = sum(gamma**t for t in range(T))
    assert out["mc_return"][0] == pytest.approx(discounted, abs=1e-9)  # alpha 0: no entropy bonus
    # alpha 0.5: + alpha * sum_{t=1}^{T-1} gamma^t * entropy of pi_1 at obs 0 (its log-density, by
    # sampling)
    with torch.no_grad():
        mean, log_std = actor(torch.zeros(N, 1, 1))
        _, log_pi = fqe_mod.tanh_gaussian_sample(mean[1], log_std[1], torch.randn(200_000, 2))
    bonus_weight = 0.5 * sum(gamma**t for t in range(1, T))
    expected = discounted + bonus_weight * (-log_pi.mean().item())
    tolerance = 4 * bonus_weight * log_pi.std().item() / np.sqrt(E)
    assert out["mc_return"][1] == pytest.approx(expected, abs=tolerance)


# ---------------------------------------------------------------------------------------------
# 3. End to end: cql_pretrain.py -> fqe_baseline.py -> off2on_finetune.py, on a tiny dataset
# ---------------------------------------------------------------------------------------------
PRETRAIN = (
    "--env-id halfcheetah-random-v2 --random-dataset-size 3000 --ensemble-size 2 --hidden-sizes "
    "32 32 --batch-size 16 --cql-n-actions 2 --bc-steps 5 --log-every 10 --eval-every 20 "
    "--eval-episodes 1 --save-every 20 --total-steps 20 --no-cuda"
).split()
CQL = "checkpoints/cql__halfcheetah-random-v2__n2__seed1.pt"
FQE = (
    f"--checkpoint {CQL} --batch-size 16 --log-every 5 --eval-every 10 --mc-episodes 1 --no-cuda"
).split()
FINETUNE = (
    "--env-id halfcheetah-random-v2 --random-dataset-size 3000 --ensemble-size 2 "
    "--total-timesteps 200 --epoch-length 200 --first-epoch-multiplier 1 --batch-size 16 "
    "--eval-episodes 1 --no-cuda"
).split()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("fqe")
    out = run(work, "cql_pretrain.py", *PRETRAIN)
    assert out.returncode == 0, out.stderr
    return work


def run(work, script, *args):
    env = {
        **os.environ,
        "MINARI_DATASETS_PATH": str(work / "minari"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, os.path.join(ROOT, script), *args]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)


def check_error(out, *needles):
    """A failure in one `error:` line (the last), without a traceback."""
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def test_writes_a_checkpoint_that_off2on_finetunes(work):
    out = run(work, "fqe_baseline.py", *FQE, "--total-steps", "20")
    assert out.returncode == 0, out.stderr
    assert "Monte-Carlo check at step 20" in out.stdout
    assert "settotalmass" not in out.stdout + out.stderr  # make_env: no MuJoCo 4 warning
    path = work / "checkpoints/cql__halfcheetah-random-v2__n2__seed1__fqe.pt"
    cql, fqe = (torch.load(p, weights_only=True) for p in (work / CQL, path))
    assert fqe["format_version"] == 1 and fqe["metadata"]["critic_source"] == "fqe"
    for key in ("obs_dim", "action_dim", "hidden_sizes", "ensemble_size", "dataset_id", "env_id"):
        assert fqe["metadata"][key] == cql["metadata"][key]
    # actors and alpha unchanged, critics new
    assert all(torch.equal(fqe["actor"][k], v) for k, v in cql["actor"].items())
    assert torch.equal(fqe["log_alpha"], cql["log_alpha"])
    assert fqe["qf"].keys() == cql["qf"].keys()
    assert not torch.equal(fqe["qf"]["net.2.weight"], cql["qf"]["net.2.weight"])
    assert not os.path.exists(f"{path}.partial")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (work / "runs").glob("*__fqe__*")
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {
        "losses/fqe_loss",
        "charts/fqe_q_data",
        "charts/fqe_q_random",
        "charts/cql_q_data",
        "charts/cql_q_random",
        "eval/fqe_q_vs_mc",
        "eval/cql_q_vs_mc",
        "eval/mc_return",
        "charts/SPS",
    } <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("losses/fqe_loss")] == [5, 10, 15, 20]

    out = run(work, "off2on_finetune.py", *FINETUNE, "--checkpoint", str(path))
    assert out.returncode == 0, out.stderr
    assert "critics from fqe" in out.stdout and "eval after 200 online steps" in out.stdout

    out = run(work, "fqe_baseline.py", *FQE, "--total-steps", "20")
    assert out.returncode != 0 and "exists" in out.stderr and "--output-path" in out.stderr


def test_continuing_a_partial_run_matches_an_uninterrupted_one(work):
    def fqe(steps, output_path):
        return run(
            work, "fqe_baseline.py", *FQE, "--total-steps", steps, "--output-path", output_path
        )

    straight, first = fqe("20", "straight.pt"), fqe("10", "first.pt")
    assert straight.returncode == 0 and first.returncode == 0, straight.stderr + first.stderr
    # the state a run interrupted after step 10 leaves
    shutil.move(work / "first.pt", work / "resumed.pt.partial")
    resumed = fqe("20", "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert "Continuing resumed.pt.partial at step 10" in resumed.stdout
    a, b = (torch.load(work / p, weights_only=True) for p in ("straight.pt", "resumed.pt"))
    for part in ("qf", "qf_target"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_checkpoint_of_another_env_fails_naming_both(work):
    checkpoint = torch.load(work / CQL, weights_only=True)
    checkpoint["metadata"] |= {"env_id": "Hopper-v5", "obs_dim": 11, "action_dim": 3}
    torch.save(checkpoint, work / "hopper.pt")
    dataset = ["--env-id", "halfcheetah-random-v2", "--random-dataset-size", "3000"]
    out = run(work, "fqe_baseline.py", *FQE, "--checkpoint", "hopper.pt", *dataset)
    assert check_error(out) == (
        "error: checkpoint hopper.pt has env_id='Hopper-v5', but this run has "
        "env_id='HalfCheetah-v5'"
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["--checkpoint", "missing.pt"], "no checkpoint at missing.pt"),
        (["--checkpoint", ""], "--checkpoint is required"),
        (["--total-steps", "0"], "--total-steps must be >= 1"),
        # a random dataset is made only by cql_pretrain.py: the error gives the command
        (
            ["--random-dataset-size", "4000", "--output-path", "no_dataset.pt"],
            "python cql_pretrain.py --env-id halfcheetah-random-v2 --random-dataset-size 4000 "
            "--dataset-only",
        ),
    ],
)
def test_bad_input_fails_in_one_line(work, args, says):
    check_error(run(work, "fqe_baseline.py", *FQE, *args), says)
