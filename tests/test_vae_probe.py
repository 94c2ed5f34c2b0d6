"""vae_shift_probe.py (paper section 3.1, Figure 1a): the importance-weighted bound against a
closed-form log-likelihood (a linear-Gaussian VAE), a briefly trained VAE that tells shifted
samples from held-out ones, the split, the merged-policy rollout, and end-to-end runs of the
script on a tiny generated dataset with a checkpoint from cql_pretrain.py (outputs, errors)."""

import dataclasses
import glob
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from vae_shift_probe import (
    VAE,
    Actor,
    Args,
    DatasetError,
    auroc,
    collect_online_pairs,
    split_held_out,
    train_vae,
    validate_args,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_thread():
    """Small matmuls on cores shared with other processes: a second thread made them up to 100x
    slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# 1. the importance-weighted bound where log p(x) is known: a linear-Gaussian VAE
# ---------------------------------------------------------------------------------------------
def linear_gaussian_vae(D=4, L=3, sigma=0.5, mean_offset=0.0, log_std_offset=0.0):
    """p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I) with orthogonal columns of W, so that the
    true posterior is a diagonal Gaussian linear in x, which the encoder is set to (plus the
    offsets, which make it wrong). Raw data are x_raw = m + s * x. Returns the VAE and the true
    distribution of x_raw: N(m + s b, S (W W^T + sigma^2 I) S)."""
    q, _ = torch.linalg.qr(torch.randn(D, L))
    W = q * torch.tensor([2.0, 1.0, 0.5])[:L]  # orthogonal columns, norms 2, 1, 0.5
    b, m, s = torch.randn(D), torch.randn(D) * 3, torch.rand(D) * 4 + 0.5
    vae = VAE(D, L, hidden_sizes=(), mean=m, std=s)
    post_var = 1 / (1 + (W**2).sum(0) / sigma**2)  # [L]: diag of (I + W^T W / sigma^2)^-1
    A = post_var[:, None] * W.T / sigma**2  # posterior mean = A (x - b)
    with torch.no_grad():
        enc = vae.encoder[0]  # Linear(D, 2L): rows [0, L) the mean, [L, 2L) the log-std
        enc.weight.zero_()
        enc.weight[:L] = A
        enc.bias[:L] = -A @ b + mean_offset
        enc.bias[L:] = 0.5 * post_var.log() + log_std_offset
        vae.decoder[0].weight.copy_(W)
        vae.decoder[0].bias.copy_(b)
        vae.decoder_log_std.fill_(math.log(sigma))
    cov = W @ W.T + sigma**2 * torch.eye(D)
    return vae, MultivariateNormal(m + s * b, s[:, None] * cov * s[None, :])


def test_exact_posterior_gives_the_exact_log_likelihood(f64):
    """With q(z|x) = p(z|x) every importance weight equals p(x): the bound is log p(x) for any k,
    including the standardization's Jacobian (the data are far from standardized)."""
    vae, true = linear_gaussian_vae()
    x = true.sample((50,))
    for k, chunk in ((1, 256), (7, 256), (30, 7)):
        log_likelihood = vae.log_likelihood(x, k, chunk_size=chunk)
        torch.testing.assert_close(log_likelihood, true.log_prob(x), rtol=0, atol=1e-9)
    # the ELBO's reconstruction term is a one-sample estimate (its KL is exact): equal on average
    elbo = vae.elbo(x[:5].repeat(4000, 1)).view(4000, 5).mean(0)
    torch.testing.assert_close(elbo, true.log_prob(x[:5]), rtol=0, atol=0.1)


def test_bound_is_below_the_log_likelihood_and_tightens_with_k(f64, one_thread):
    # a wrong encoder: a loose bound
    vae, true = linear_gaussian_vae(mean_offset=0.7, log_std_offset=0.4)
    x = true.sample((2000,))
    log_p = true.log_prob(x).mean().item()
    bounds = {k: vae.log_likelihood(x, k).mean().item() for k in (1, 10, 100, 1000)}
    gaps = {k: log_p - v for k, v in bounds.items()}
    assert gaps[1] > 0.3, gaps  # the wrong encoder is far off at k = 1 ...
    # ... every bound is below, each tighter
    assert gaps[1] > gaps[10] > gaps[100] > gaps[1000] > 0, gaps
    assert gaps[1000] < 0.1 * gaps[1], gaps
    # k = 1 is the ELBO: the same in expectation as `elbo`, whose KL is in closed form
    many = x.repeat(20, 1)
    iw_bound = vae.log_likelihood(many, 1).mean().item()
    assert vae.elbo(many).mean().item() == pytest.approx(iw_bound, abs=0.05)


# ---------------------------------------------------------------------------------------------
# 2. a VAE trained briefly on Gaussian data: near the true density, low on shifted samples
# ---------------------------------------------------------------------------------------------
def test_trained_vae_gives_shifted_samples_a_clearly_lower_likelihood(one_thread):
    torch.manual_seed(0)
    D = 4
    scale = torch.tensor([10.0, 0.1, 1.0, 3.0])
    corr = torch.tensor(
        [[1.0, 0.8, 0.0, 0.0], [0.8, 1.0, 0.3, 0.0], [0.0, 0.3, 1.0, -0.5], [0.0, 0.0, -0.5, 1.0]]
    )
    cov = scale[:, None] * corr * scale[None, :]
    true = MultivariateNormal(torch.tensor([5.0, -3.0, 0.0, 10.0]), cov)
    train, held_out = true.sample((5000,)), true.sample((1000,))
    shifted = held_out + 2 * scale  # two standard deviations off in every dimension
    vae = VAE(D, D, (64, 64), train.mean(0), train.std(0))
    train_vae(vae, train, held_out, steps=1500, batch_size=256, lr=1e-3, log_every=10_000)
    ll_held_out, ll_shifted = vae.log_likelihood(held_out, 100), vae.log_likelihood(shifted, 100)
    true_mean = true.log_prob(held_out).mean().item()
    # a bound, near the true density
    assert true_mean - 0.5 < ll_held_out.mean().item() < true_mean + 0.1
    assert ll_held_out.mean().item() - ll_shifted.mean().item() > 5
    assert auroc(ll_held_out.numpy(), ll_shifted.numpy()) > 0.95


def test_train_vae_stops_on_a_non_finite_elbo():
    vae = VAE(3, 2, (8,))
    x = torch.randn(100, 3)
    with pytest.raises(SystemExit, match="non-finite ELBO at VAE step 1 .* try a lower --vae-lr"):
        train_vae(vae, x, x, steps=5, batch_size=16, lr=1e30, log_every=1)


# ---------------------------------------------------------------------------------------------
# 3. the split, the classifier score, the arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, fraction, n_held_out", [(10_000, 0.1, 1_000), (100_000, 0.1, 10_000), (20_000, 0.25, 5_000)]
)
def test_split_holds_out_whole_blocks(n, fraction, n_held_out):
    train, held_out = split_held_out(n, fraction, np.random.default_rng(0))
    assert len(held_out) == n_held_out and len(train) == n - n_held_out
    assert np.array_equal(np.sort(np.concatenate([train, held_out])), np.arange(n))
    blocks = np.unique(held_out // 1000)
    assert len(blocks) == n_held_out // 1000
    assert np.array_equal(held_out, (blocks[:, None] * 1000 + np.arange(1000)).ravel())
    draws = {
        tuple(split_held_out(n, fraction, np.random.default_rng(seed))[1][::1000])
        for seed in range(5)
    }
    assert len(draws) > 1  # the blocks are drawn at random


def test_split_of_a_partial_last_block_covers_every_transition():
    for seed in range(5):
        # blocks of 1000, 1000, 500: one held out
        train, held_out = split_held_out(2_500, 0.4, np.random.default_rng(seed))
        assert np.array_equal(np.sort(np.concatenate([train, held_out])), np.arange(2_500))
        assert len(held_out) in (500, 1000)


def test_split_refuses_a_dataset_too_small_to_hold_out():
    with pytest.raises(DatasetError, match="too few"):
        split_held_out(999, 0.1, np.random.default_rng(0))  # one block


def test_auroc_is_the_pairwise_win_rate():
    rng = np.random.default_rng(0)
    # many ties
    pos, neg = rng.integers(0, 20, 300).astype(float), rng.integers(5, 25, 200).astype(float)
    pairwise = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    assert auroc(pos, neg) == pytest.approx(pairwise, abs=1e-12)
    assert auroc(np.array([3.0, 4]), np.array([1.0, 2])) == 1
    assert auroc(np.array([1.0, 2]), np.array([3.0, 4])) == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(held_out_fraction=1.0), "--held-out-fraction"),
        (dict(iw_samples=0), "--iw-samples"),
        (dict(latent_dim=0), "--latent-dim"),
        (dict(vae_hidden_sizes=(64, 0)), "--vae-hidden-sizes"),
    ],
)
def test_bad_arguments_are_refused_early(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_args(dataclasses.replace(Args(), **flags))
    validate_args(Args())


# ---------------------------------------------------------------------------------------------
# 4. the online pairs: actions sampled from the merged Gaussian of the members
# ---------------------------------------------------------------------------------------------
def test_online_pairs_are_sampled_from_the_merged_policy():
    """Members with means +1 and -1 and std 0.01: the merged Gaussian is N(0, ~1), unimodal. A
    member mixture would put almost no pre-tanh action near 0, the deterministic policy all of
    them."""
    torch.manual_seed(0)
    env = gym.make("HalfCheetah-v5", max_episode_steps=100)
    actor = Actor(17, 6, (8,), 2)
    with torch.no_grad():
        last = actor.net[-1]
        last.weight.zero_()
        last.bias[0, 0, :6], last.bias[1, 0, :6] = 1.0, -1.0
        last.bias[:, 0, 6:] = math.log(0.01)
    obs, actions, returns = collect_online_pairs(actor, 2, env, 300, 3, "cpu", log_every=1000)
    assert obs.shape == (300, 17) and actions.shape == (300, 6)
    assert len(returns) == 3  # episodes of 100 steps
    first_obs = gym.make("HalfCheetah-v5").reset(seed=3)[0].astype(np.float32)
    np.testing.assert_array_equal(obs[0], first_obs)
    u = np.arctanh(np.clip(actions, -1 + 1e-6, 1 - 1e-6))
    assert abs(u.mean()) < 0.1 and 0.9 < u.std() < 1.1
    assert 0.3 < (np.abs(u) < 0.5).mean() < 0.46  # N(0, 1): 0.38


# ---------------------------------------------------------------------------------------------
# 5. end to end: python vae_shift_probe.py on a tiny generated dataset
# ---------------------------------------------------------------------------------------------
ENV = "halfcheetah-random-v2"
PROBE_TINY = (
    f"--env-id {ENV} --vae-steps 200 --online-steps 500 --iw-samples 10 --log-every 100 "
    "--batch-size 64 --vae-hidden-sizes 32 32 --no-cuda"
).split()
PRETRAIN_TINY = (
    f"--env-id {ENV} --random-dataset-size 10000 --ensemble-size 2 --hidden-sizes 32 32 "
    "--batch-size 16 --cql-n-actions 2 --bc-steps 5 --total-steps 10 --log-every 5 "
    "--eval-every 10 --eval-episodes 1 --save-every 10 --no-cuda --checkpoint-path pre.pt"
).split()
FINETUNE_TINY = (
    f"--env-id {ENV} --random-dataset-size 10000 --ensemble-size 2 --epoch-length 200 "
    "--first-epoch-multiplier 1 --batch-size 32 --eval-episodes 1 --total-timesteps 200 --no-cuda"
).split()
FINETUNE_STATE = f"checkpoints/off2on_finetune__{ENV}__n2__seed1.pt"


def script(name, *args):
    return [sys.executable, os.path.join(ROOT, name), *args]


def probe(*extra, random_dataset_size="10000"):
    size = ["--random-dataset-size", random_dataset_size]
    return script("vae_shift_probe.py", *PROBE_TINY, *size, *extra)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """cql_pretrain.py makes a checkpoint (and the dataset), two copies of it are made wrong,
    off2on_finetune.py fine-tunes it; the probe runs on each, a few at a time, in one working
    directory."""
    work = tmp_path_factory.mktemp("probe")
    env = {
        **os.environ,
        "MINARI_DATASETS_PATH": str(work / "minari"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    results = {"work": work}

    def run_phase(jobs):
        def one(item):
            name, cmd = item
            out = subprocess.run(
                cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300
            )
            return name, out

        with ThreadPoolExecutor(max_workers=3) as pool:
            results.update(pool.map(one, jobs.items()))

    run_phase(
        {
            "pretrain": script("cql_pretrain.py", *PRETRAIN_TINY),
            "missing": probe("--checkpoint", "nope.pt"),
        }
    )
    if results["pretrain"].returncode == 0:
        checkpoint = torch.load(work / "pre.pt", weights_only=True)
        meta = checkpoint["metadata"]
        hopper = {**meta, "env_id": "Hopper-v5", "obs_dim": 11, "action_dim": 3}
        torch.save({**checkpoint, "metadata": hopper}, work / "hopper.pt")
        torch.save({**checkpoint, "metadata": {**meta, "obs_dim": 11}}, work / "dims.pt")
    run_phase(
        {
            "probe": probe("--checkpoint", "pre.pt"),
            "other_env": probe("--checkpoint", "hopper.pt"),
            "other_dims": probe("--checkpoint", "dims.pt"),
            # only cql_pretrain.py makes a random dataset: a size never made is missing
            "no_dataset": probe("--checkpoint", "pre.pt", random_dataset_size="20000"),
            "finetune": script("off2on_finetune.py", *FINETUNE_TINY, "--checkpoint", "pre.pt"),
        }
    )
    finetuned = probe("--checkpoint", FINETUNE_STATE, "--exp-name", "finetuned")
    run_phase({"probe_finetuned": finetuned})
    return results


def ok(out):
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


def check_error(out, *needles):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), out.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_run_writes_figure_values_and_tensorboard(e2e):
    ok(e2e["pretrain"])
    out, work = ok(e2e["probe"]), e2e["work"]
    assert "9,000 train and 1,000 held-out (s, a) pairs" in out.stdout
    assert "VAE step 100/200" in out.stdout and "VAE step 200/200" in out.stdout
    assert "merged policy of the 2 agents of pre.pt" in out.stdout
    assert "online step 500/500" in out.stdout
    assert "settotalmass" not in out.stdout + out.stderr  # make_env: no MuJoCo 4 warning
    (run_dir,) = glob.glob(str(work / "runs" / f"{ENV}__vae_shift_probe__1__*"))

    with open(os.path.join(run_dir, "log_likelihood.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    values = np.load(os.path.join(run_dir, "log_likelihood.npz"))
    offline, online = values["offline_held_out"], values["online"]
    assert offline.shape == (1000,) and online.shape == (500,) and int(values["iw_samples"]) == 10
    assert np.isfinite(offline).all() and np.isfinite(online).all()
    assert values["online_observations"].shape == (500, 17)
    assert values["online_actions"].shape == (500, 6)
    assert np.abs(values["online_actions"]).max() <= 1
    printed = re.search(r"held-out offline mean (-?[\d.]+) .* online mean (-?[\d.]+) ", out.stdout)
    assert float(printed[1]) == pytest.approx(offline.mean(), abs=1e-3)
    assert float(printed[2]) == pytest.approx(online.mean(), abs=1e-3)
    printed = re.search(
        r"AUROC of the log-likelihood, held-out offline vs online: ([\d.]+)", out.stdout
    )
    score = float(printed[1])
    assert score == pytest.approx(auroc(offline, online), abs=1e-4)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    tags = events.Tags()
    assert {"log_likelihood/offline_held_out", "log_likelihood/online"} <= set(tags["histograms"])
    assert events.Histograms("log_likelihood/online")[0].histogram_value.num == 500
    assert "log_likelihood/histograms" in tags["images"]
    assert [e.step for e in events.Scalars("losses/elbo")] == [100, 200]
    assert "losses/held_out_elbo" in tags["scalars"]
    assert events.Scalars("charts/auroc")[0].value == pytest.approx(score, abs=1e-4)
    online_mean = events.Scalars("charts/log_likelihood_online_mean")[0].value
    assert online_mean == pytest.approx(online.mean(), abs=1e-3)


def test_missing_checkpoint_fails_in_one_line(e2e):
    check_error(e2e["missing"], "nope.pt", "does not exist", "cql_pretrain.py")


def test_checkpoint_of_another_env_fails(e2e):
    ok(e2e["pretrain"])
    check_error(e2e["other_env"], "hopper.pt", "env_id='Hopper-v5'", "env_id='HalfCheetah-v5'")


def test_checkpoint_with_other_dims_fails(e2e):
    ok(e2e["pretrain"])
    check_error(e2e["other_dims"], "dims.pt", "obs_dim=11", "obs_dim=17")


def test_probe_takes_a_fine_tuned_agent(e2e):
    ok(e2e["finetune"])
    out = ok(e2e["probe_finetuned"])
    assert f"merged policy of the 2 agents of {FINETUNE_STATE}" in out.stdout
    assert "AUROC of the log-likelihood" in out.stdout


def test_missing_random_dataset_fails_naming_the_command_that_makes_it(e2e):
    ok(e2e["pretrain"])
    command = f"python cql_pretrain.py --env-id {ENV} --random-dataset-size 20000 --dataset-only"
    check_error(e2e["no_dataset"], "off2on/halfcheetah/random-n20000-v0", command)


def test_a_bad_env_id_is_named_not_passed_on_in_the_suggested_command(tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "m"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        script("vae_shift_probe.py", "--env-id", "nosuchenv-random-v2"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    check_error(run, "unknown --env-id 'nosuchenv-random-v2'")
    assert "cql_pretrain.py --env-id nosuchenv" not in run.stderr
