"""Off2On, concept experiment: the online samples of a pretrained agent are out of distribution
for its offline data, as a VAE's log-likelihood of both shows.

Lee, Seo, Lee, Abbeel, Shin, "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021, https://arxiv.org/abs/2107.00591 (section 3.1, Figure 1a,
appendix C).

    python cql_pretrain.py --env-id halfcheetah-random-v2  # the checkpoint (and the dataset)
    python vae_shift_probe.py --env-id halfcheetah-random-v2

1. Train a VAE on the offline (s, a) pairs, holding out whole blocks of 1,000 transitions.
2. Collect online (s, a) pairs with the checkpoint's ensemble (cql_pretrain.py's, or an
   off2on_finetune.py state), its actions sampled from the merged policy as fine-tuning explores.
3. Estimate log p(s, a) of the held-out and of the online pairs with the importance-weighted
   bound (Burda et al. 2016), in nats of the raw pair.
Two histograms, their means and the AUROC of log p as a classifier of held-out against online
pairs (0.5: no shift) show the shift. The paper's learning rate was lost from its text: Adam
1e-3, as BCQ's VAE. Docs: docs/concept_experiments.md.

Shared word for word with other scripts (tests/test_shared_blocks.py checks every copy):
    data [cql_pretrain off2on_finetune fqe_baseline awac_finetune bcq_finetune]: D4RL_NAME GYM_IDS
        D4RL_REF_RETURNS RANDOM_DATASET_ID FIELDS DatasetError OfflineData make_env
        episodes_to_transitions load_d4rl_hdf5 load_minari_dataset load_offline_data scale_to_unit
        scale_to_env normalized_score
    layers [cql_pretrain off2on_finetune fqe_baseline pixel_off2on]: VectorizedLinear vectorized_mlp
        LOG_STD_MIN
    actor [cql_pretrain off2on_finetune fqe_baseline]: Actor
    policy [cql_pretrain off2on_finetune fqe_baseline pixel_off2on]: tanh_gaussian_log_prob
        tanh_gaussian_sample
    merged policy [cql_pretrain off2on_finetune pixel_off2on]: ensemble_gaussian
    AUROC [off2on_finetune]: auroc
    checkpoints [cql_pretrain off2on_finetune fqe_baseline pixel_off2on awac_finetune bcq_finetune]:
        CHECKPOINT_FORMAT CheckpointError load_checkpoint check_checkpoint_matches
    checkpoint path [cql_pretrain off2on_finetune]: default_checkpoint_path
    mlp [bcq_finetune]: mlp
    progress [cql_pretrain off2on_finetune awac_finetune bcq_finetune pixel_off2on fqe_baseline]:
        rate_text Progress
    tracking [cql_pretrain off2on_finetune awac_finetune bcq_finetune fqe_baseline pixel_off2on]:
        start_tracking
"""

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    env_id: str = "halfcheetah-random-v2"
    """dataset: `{halfcheetah,hopper,walker2d}-{random,medium,expert,medium-expert}-v2`, a Minari
    dataset id (`mujoco/hopper/expert-v0`), or, with `--dataset-path`, the environment"""
    dataset_path: str | None = None
    """a D4RL-format .hdf5 file to use instead of a Minari dataset"""
    random_dataset_size: int = 1_000_000
    """transitions in the locally generated uniform-random dataset (`*-random-v2`)"""
    checkpoint: str | None = None
    """the ensemble whose merged policy collects the online pairs: a cql_pretrain.py checkpoint,
    or an off2on_finetune.py state [default: checkpoints/cql__{env_id}__n5__seed{seed}.pt]"""
    online_steps: int = 10_000
    """online environment steps (= online (s, a) pairs) collected with the checkpoint's policy"""
    held_out_fraction: float = 0.1
    """share of the offline transitions held out from VAE training (in blocks of 1,000)"""
    latent_dim: int | None = None
    """VAE latent size [default: obs_dim + action_dim, enough for any full-covariance Gaussian]"""
    vae_hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the VAE's encoder and of its decoder (BCQ's VAE: 750 750)"""
    vae_steps: int = 100_000
    """VAE gradient steps"""
    batch_size: int = 256
    """VAE minibatch size"""
    vae_lr: float = 1e-3
    """VAE learning rate (Adam)"""
    iw_samples: int = 100
    """k: latent samples per pair in the importance-weighted log-likelihood bound"""
    log_every: int = 1_000
    """VAE steps (and online steps) between progress lines"""
    seed: int = 1
    """seed of the run"""
    cuda: bool = torch.cuda.is_available()
    """use CUDA"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    exp_name: str = "vae_shift_probe"
    """name of the experiment, part of the run name"""
    track: bool = False
    """also log to Weights & Biases: every TensorBoard scalar, the settings and this file"""
    wandb_project_name: str = "off2on"
    """W&B project, with --track"""
    wandb_entity: str | None = None
    """W&B team or user, with --track (yours if not given)"""


# ---------------------------------------------------------------------------------------------
# Data: the offline transitions the algorithm reads (filled by load_offline_data, near
# the end of the file)
# ---------------------------------------------------------------------------------------------
FIELDS = ("observations", "actions", "rewards", "next_observations", "terminations")


@dataclass
class OfflineData:
    observations: np.ndarray  # [M, obs_dim] float32
    actions: np.ndarray  # [M, act_dim] float32, scaled to [-1, 1]
    rewards: np.ndarray  # [M] float32
    next_observations: np.ndarray  # [M, obs_dim] float32
    terminations: np.ndarray  # [M] float32: 1 only on a true termination, never on a time limit
    env_spec: gym.envs.registration.EnvSpec  # the environment to evaluate in
    dataset_id: str
    ref_returns: tuple[float, float] | None  # (random, expert) returns of the normalized score
    ref_source: str  # where ref_returns came from
    minari_ref_returns: tuple[float, float] | None = None  # the Minari dataset's own, if stored

    def __len__(self):
        return len(self.rewards)


# ---------------------------------------------------------------------------------------------
# The pretrained policy: N vectorized actors merged into one Gaussian (eq. 5), which collects
# the online pairs
# ---------------------------------------------------------------------------------------------
class VectorizedLinear(nn.Module):
    """N independent linear layers in one: x [N, B, in] -> x @ W + b with W [N, in, out] and
    b [N, 1, out]. `members` (a slice) runs only those members, on x [len(members), B, in]."""

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features))
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialization, for each member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x, members: slice | None = None):
        weight, bias = self.weight, self.bias
        if members is not None:  # not for all: a slice's backward zero-fills the whole gradient
            weight, bias = weight[members], bias[members]
        if weight.shape[-1] == 1:  # a Q-value: a dot product (docs/speed.md, "One-output layers")
            return (x * weight.transpose(1, 2)).sum(-1, keepdim=True) + bias
        return torch.baddbmm(bias, x, weight)


def vectorized_mlp(in_dim: int, hidden_sizes, out_dim: int, ensemble_size: int) -> nn.Sequential:
    sizes = [in_dim, *hidden_sizes]
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [VectorizedLinear(n_in, n_out, ensemble_size), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, VectorizedLinear(sizes[-1], out_dim, ensemble_size))


LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class Actor(nn.Module):
    """N tanh-Gaussian policies: obs [N, B, obs_dim] -> mean, log_std [N, B, act_dim] of the
    pre-tanh Gaussian. The last layer is the mean head and the log-std head side by side."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes, ensemble_size: int):
        super().__init__()
        self.net = vectorized_mlp(obs_dim, hidden_sizes, 2 * action_dim, ensemble_size)

    def forward(self, obs):
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def tanh_gaussian_log_prob(mean, log_std, u):
    """log pi(tanh(u) | s) for a pre-tanh sample u: Gaussian log-density minus log|d tanh(u)/du|,
    the latter as 2 (log 2 - u - softplus(-2u)) for stability; summed over action dims."""
    gaussian = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det_tanh = 2 * (math.log(2) - u - F.softplus(-2 * u))
    return (gaussian - log_det_tanh).sum(-1)


def tanh_gaussian_sample(mean, log_std, eps):
    """Reparameterized a = tanh(mean + std * eps) and its log-probability."""
    u = mean + log_std.exp() * eps
    return torch.tanh(u), tanh_gaussian_log_prob(mean, log_std, u)


def ensemble_gaussian(mean, log_std):
    """The merged policy pi_E of eq. 5: N members' Gaussians [N, B, A] -> the one Gaussian that
    matches their mixture's first two moments, mu = mean_i mu_i and
    sigma^2 = mean_i (sigma_i^2 + mu_i^2) - mu^2, written as mean_i sigma_i^2 + mean_i (mu_i - mu)^2
    to avoid cancellation. Returns mean, log_std [B, A]; its deterministic action is tanh(mean)."""
    mu = mean.mean(0)
    var = (2 * log_std).exp().mean(0) + ((mean - mu) ** 2).mean(0)
    return mu, (0.5 * var.log()).clamp(LOG_STD_MIN, LOG_STD_MAX)


@torch.no_grad()
def collect_online_pairs(
    actor: Actor, ensemble_size: int, env: gym.Env, steps: int, seed: int, device, log_every=1_000
):
    """Roll out the merged ensemble policy for `steps` env steps, actions sampled from it as
    fine-tuning explores: a = tanh(u), u ~ N(mu, sigma) of `ensemble_gaussian`. Episodes restart
    when they end. Returns observations [steps, obs_dim], actions [steps, act_dim] in [-1, 1],
    and the returns of the episodes that finished."""
    observations = np.zeros((steps, env.observation_space.shape[0]), np.float32)
    actions = np.zeros((steps, env.action_space.shape[0]), np.float32)
    episode_returns, episode_return = [], 0.0
    obs, _ = env.reset(seed=seed)
    start = time.time()
    for t in range(steps):
        x = torch.as_tensor(obs, dtype=torch.float32, device=device).expand(ensemble_size, 1, -1)
        mean, log_std = ensemble_gaussian(*actor(x))  # [1, A]
        action = tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))[0][0].cpu().numpy()
        observations[t], actions[t] = obs, action
        obs, reward, terminated, truncated, _ = env.step(scale_to_env(action, env.action_space))
        episode_return += reward
        if terminated or truncated:
            episode_returns.append(episode_return)
            obs, episode_return = env.reset()[0], 0.0
        if (t + 1) % log_every == 0 or t + 1 == steps:
            last = "no episode finished yet"
            if episode_returns:
                last = f"last episode return {episode_returns[-1]:.1f}"
            rate = (t + 1) / (time.time() - start)
            print(
                f"online step {t + 1:,}/{steps:,} | {len(episode_returns)} episodes, {last} | "
                f"{rate:.0f} steps/s",
                flush=True,
            )
    return observations, actions, np.array(episode_returns)


# ---------------------------------------------------------------------------------------------
# The VAE on standardized (s, a), trained on a split that holds whole blocks out, and its
# importance-weighted log-likelihood bound
# ---------------------------------------------------------------------------------------------
def split_held_out(n: int, held_out_fraction: float, rng: np.random.Generator, block: int = 1_000):
    """Random train / held-out split of n transitions by contiguous blocks of `block` (a
    locomotion episode's length): round(fraction * blocks) blocks, at least one, are held out.
    Returns the train and the held-out indices, each sorted."""
    n_blocks = -(-n // block)
    n_held_out = max(1, round(held_out_fraction * n_blocks))
    if n_held_out >= n_blocks:
        raise DatasetError(
            f"{n:,} transitions are too few to hold out {held_out_fraction} of them in blocks of "
            f"{block:,}: use a larger dataset (--random-dataset-size) or a smaller "
            "--held-out-fraction"
        )
    held = np.zeros(n_blocks, bool)
    held[rng.permutation(n_blocks)[:n_held_out]] = True
    held = np.repeat(held, block)[:n]
    return np.flatnonzero(~held), np.flatnonzero(held)


def mlp(in_dim: int, hidden_sizes, out_dim: int) -> nn.Sequential:
    sizes = [in_dim, *hidden_sizes]
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], out_dim))


def gaussian_log_prob(x, mean, log_std):
    """log N(x; mean, diag(exp(log_std)^2)), summed over the last dimension."""
    z = (x - mean) / log_std.exp()
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class VAE(nn.Module):
    """p(z) = N(0, I), p(x|z) = N(decoder(z), diag(sigma^2)) with one learned log sigma per
    dimension, q(z|x) = N(mu(x), diag(sigma_q(x)^2)), on x = (cat[s, a] - mean) / std. `elbo`
    and `log_likelihood` take raw pairs cat[s, a] [M, D] and return nats of the raw pair: the
    standardization's Jacobian, - sum log std, is included."""

    def __init__(
        self, data_dim: int, latent_dim: int, hidden_sizes=(256, 256), mean=None, std=None
    ):
        super().__init__()
        self.encoder = mlp(data_dim, hidden_sizes, 2 * latent_dim)
        self.decoder = mlp(latent_dim, hidden_sizes, data_dim)
        self.decoder_log_std = nn.Parameter(torch.zeros(data_dim))
        dtype = torch.get_default_dtype()
        mean = torch.zeros(data_dim) if mean is None else torch.as_tensor(mean, dtype=dtype)
        std = torch.ones(data_dim) if std is None else torch.as_tensor(std, dtype=dtype)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def standardize(self, x):
        return (x - self.mean) / self.std

    def encode(self, x):
        """q(z|x) of standardized x [..., D] -> mean, log_std [..., L]."""
        mu, log_std = self.encoder(x).chunk(2, dim=-1)
        return mu, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def decode(self, z):
        """p(x|z), z [..., L] -> mean [..., D] and log_std [D] (standardized units)."""
        return self.decoder(z), self.decoder_log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def elbo(self, x):
        """E_q[log p(x|z)] - KL(q(z|x) || p(z)) per pair, with one reparameterized z and the KL
        in closed form: [M, D] -> [M]."""
        x = self.standardize(x)
        mu, log_std = self.encode(x)
        z = mu + log_std.exp() * torch.randn_like(mu)
        kl = 0.5 * (mu**2 + (2 * log_std).exp() - 1 - 2 * log_std).sum(-1)
        return gaussian_log_prob(x, *self.decode(z)) - kl - self.std.log().sum()

    @torch.no_grad()
    def log_likelihood(self, x, iw_samples: int = 100, chunk_size: int = 256):
        """Importance-weighted bound on log p(x) per pair,
        log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x) with z_1..k ~ q(.|x), by logsumexp. Below
        log p(x) in expectation, tighter as k grows (k = 1: the ELBO). [M, D] -> [M], computed
        `chunk_size` pairs (k * chunk_size decoder rows) at a time."""
        bounds = []
        for chunk in x.split(chunk_size):
            chunk = self.standardize(chunk)
            mu, log_std = self.encode(chunk)  # [B, L]
            eps = torch.randn((iw_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
            z = mu + log_std.exp() * eps  # [k, B, L]
            log_p_x_given_z = gaussian_log_prob(chunk, *self.decode(z))  # [k, B]
            log_p_z = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
            log_w = log_p_x_given_z + log_p_z - gaussian_log_prob(z, mu, log_std)
            bounds.append(torch.logsumexp(log_w, dim=0) - math.log(iw_samples))
        return torch.cat(bounds) - self.std.log().sum()


def train_vae(
    vae: VAE, train, held_out, steps: int, batch_size: int, lr: float, log_every: int, writer=None
):
    """Adam on -ELBO of uniform minibatches of the train pairs [M, D]; every `log_every` steps a
    progress line (and TensorBoard scalars) with the minibatch ELBO and that of up to 10,000
    held-out pairs."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    held_out = held_out[:10_000]
    start_time, last_step, progress = time.time(), 0, Progress("VAE step", steps)
    for step in range(1, steps + 1):
        idx = torch.randint(len(train), (batch_size,), device=train.device)
        elbo = vae.elbo(train[idx]).mean()
        optimizer.zero_grad(set_to_none=True)
        (-elbo).backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                elbo, held_out_elbo = elbo.item(), vae.elbo(held_out).mean().item()
            if not (math.isfinite(elbo) and math.isfinite(held_out_elbo)):
                raise SystemExit(
                    f"error: non-finite ELBO at VAE step {step} ({elbo}, held out "
                    f"{held_out_elbo}); try a lower --vae-lr"
                )
            sps = (step - last_step) / (time.time() - start_time)
            start_time, last_step = time.time(), step
            if writer is not None:
                writer.add_scalar("losses/elbo", elbo, step)
                writer.add_scalar("losses/held_out_elbo", held_out_elbo, step)
                writer.add_scalar("charts/SPS", sps, step)
            print(
                f"VAE step {step:,}/{steps:,} | ELBO {elbo:.3f} | "
                f"held-out ELBO {held_out_elbo:.3f} | {rate_text(sps)} SPS",
                flush=True,
            )
        progress(step, printed=step % log_every == 0 or step == steps)
    return vae


# ---------------------------------------------------------------------------------------------
# The shift in one number (AUROC) and one figure
# ---------------------------------------------------------------------------------------------
def auroc(positive, negative) -> float:
    """P(a positive scores above a negative), ties counting 1/2 (the Mann-Whitney U statistic)."""
    scores = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average rank of ties, from 1
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def plot_log_likelihoods(offline, online, title: str):
    """Both histograms overlaid on shared bins (as densities), means as dashed lines. The axis
    starts at the lower of the two sets' 0.5% quantiles, so a few extreme online pairs do not
    squash it; how many fall left of it is in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    low = min(np.quantile(offline, 0.005), np.quantile(online, 0.005))
    high = max(offline.max(), online.max())
    bins = np.linspace(low, high, 80)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    sets = (
        (offline, "offline (held out)", "tab:blue"),
        (online, "online (the agent)", "tab:orange"),
    )
    for values, label, color in sets:
        label += f": mean {values.mean():.1f}"
        if below := int((values < low).sum()):
            label += f", {below:,} below the axis"
        ax.hist(values, bins=bins, density=True, alpha=0.55, color=color, label=label)
        ax.axvline(values.mean(), color=color, linestyle="--")
    ax.set_xlabel("log-likelihood of (s, a) (importance-weighted bound, nats)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize="medium")
    ax.set_ylim(top=1.3 * ax.get_ylim()[1])  # room for the legend
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Datasets and environments: D4RL-style names -> Minari datasets (or a D4RL hdf5 file)
# -> flat transitions
# ---------------------------------------------------------------------------------------------
D4RL_NAME = re.compile(
    r"^(halfcheetah|hopper|walker2d)-(random|medium|expert|medium-expert|medium-replay)-v\d+$"
)
GYM_IDS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5"}
D4RL_REF_RETURNS = {  # D4RL's (random, expert) returns of the -v2 datasets
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
}
RANDOM_DATASET_ID = "off2on/{env_name}/random-n{size}-v0"  # made by cql_pretrain.py


class DatasetError(ValueError):
    """A dataset that can't be found or read; the message says how to provide it."""


def make_env(env_spec, **kwargs) -> gym.Env:
    """gym.make(env_spec, **kwargs). Gymnasium's HalfCheetah XML sets its mass with the compiler
    attribute `settotalmass`, which MuJoCo 4 deprecates with a warning per env: compile it without
    that attribute, then scale the masses as the attribute did (the same model, bit for bit)."""
    default_xml = env_spec.kwargs.get("xml_file", "half_cheetah.xml") == "half_cheetah.xml"
    if not (env_spec.name == "HalfCheetah" and default_xml):
        return gym.make(env_spec, **kwargs)
    import gymnasium.envs.mujoco
    import mujoco

    assets = os.path.join(os.path.dirname(gymnasium.envs.mujoco.__file__), "assets")
    with open(os.path.join(assets, "half_cheetah.xml")) as f:
        xml = f.read()
    total_mass = re.search(r' settotalmass="([^"]+)"', xml)
    if total_mass is None:  # a Gymnasium without the attribute
        return gym.make(env_spec, **kwargs)
    path = os.path.join(tempfile.gettempdir(), f"off2on_half_cheetah_{os.getpid()}.xml")
    with open(path, "w") as f:
        f.write(xml.replace(total_mass.group(0), ""))
    env = gym.make(env_spec, xml_file=path, **kwargs)
    mujoco.mj_setTotalmass(env.unwrapped.model, float(total_mass.group(1)))
    mujoco.mj_setConst(env.unwrapped.model, env.unwrapped.data)
    env.unwrapped.spec = env_spec  # what it is, with no temporary file in it
    return env


def episodes_to_transitions(episodes) -> dict:
    """Minari episodes (T + 1 observations, T actions) -> flat (s, a, r, s', d); no transition
    crosses an episode boundary."""
    parts = {k: [] for k in FIELDS}
    for ep in episodes:
        if not isinstance(ep.observations, np.ndarray):
            raise DatasetError("only flat (Box) observations are supported, not dict or tuple ones")
        parts["observations"].append(ep.observations[:-1])
        parts["next_observations"].append(ep.observations[1:])
        parts["actions"].append(ep.actions)
        parts["rewards"].append(ep.rewards)
        parts["terminations"].append(ep.terminations)
    return {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}


def load_d4rl_hdf5(path: str) -> dict:
    """A D4RL-format file -> flat transitions. Without `next_observations`, s' is the next row,
    so the last step of an episode cut by a time limit (its s' is unknown) is dropped."""
    import h5py

    if not os.path.isfile(path):
        raise DatasetError(f"--dataset-path {path} does not exist")
    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise DatasetError(
            f"--dataset-path {path} is not an HDF5 file: a D4RL-format file is HDF5 with the "
            f"arrays {', '.join(keys)} (and optionally next_observations)"
        ) from None
    with f:
        if missing := [k for k in keys if k not in f]:
            raise DatasetError(f"{path} is not a D4RL-format file: it lacks {missing}")
        d = {k: f[k][()] for k in keys}
        if "next_observations" in f:
            next_obs, keep = f["next_observations"][()], np.ones(len(d["rewards"]), bool)
        else:
            next_obs = np.concatenate([d["observations"][1:], d["observations"][-1:]])
            keep = ~d["timeouts"].astype(bool)
            keep[-1] = False
    return {
        "observations": d["observations"][keep].astype(np.float32),
        "actions": d["actions"][keep].astype(np.float32),
        "rewards": d["rewards"][keep].astype(np.float32).reshape(-1),
        "next_observations": next_obs[keep].astype(np.float32),
        "terminations": d["terminals"][keep].astype(np.float32).reshape(-1),
    }


def load_minari_dataset(dataset_id: str):
    """A local Minari dataset, downloaded first if missing; a clear error where that fails."""
    import minari
    from minari.storage.datasets_root_dir import get_dataset_path

    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        pass
    except ValueError as e:
        raise DatasetError(f"'{dataset_id}' is not a valid Minari dataset id ({e})") from None
    print(f"Minari dataset {dataset_id} is not local: downloading it ...", flush=True)
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as e:
        root, reason = get_dataset_path(), f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise DatasetError(
            f"Minari dataset '{dataset_id}' is not in {root} and could not be downloaded "
            f"({reason}). With internet: `minari download {dataset_id}`. Without: copy the "
            f"dataset folder from a machine that has it into {root} (or point "
            f"MINARI_DATASETS_PATH at it), or pass --dataset-path to a D4RL-format .hdf5 file."
        ) from None


def load_offline_data(
    env_id: str, dataset_path: str | None = None, random_dataset_size: int = 1_000_000
) -> OfflineData:
    """Resolve `--env-id` / `--dataset-path` to transitions, the eval env and the score refs."""
    import minari

    name = D4RL_NAME.match(env_id)
    env_name = name.group(1) if name else None
    if dataset_path is not None:  # --env-id only names the environment
        if env_name is None:
            try:
                env_spec = gym.spec(env_id)
            except gym.error.Error:
                msg = f"--env-id {env_id} is neither a D4RL-style name nor a Gymnasium env id"
                raise DatasetError(msg) from None
            env_name = next((k for k, v in GYM_IDS.items() if v.startswith(env_spec.name)), None)
        else:
            env_spec = gym.spec(GYM_IDS[env_name])
        transitions, dataset_id, minari_refs = (
            load_d4rl_hdf5(dataset_path),
            os.path.abspath(dataset_path),
            None,
        )
    elif name:
        kind = name.group(2)
        if kind == "medium-replay":
            raise DatasetError(
                f"{env_id} has no Minari equivalent: download D4RL's "
                f"{env_name}_medium_replay-v2.hdf5 and pass it with --dataset-path"
            )
        if kind == "random":  # not downloadable: generated here by cql_pretrain.py
            random_id = RANDOM_DATASET_ID.format(env_name=env_name, size=random_dataset_size)
            try:
                datasets = [minari.load_dataset(random_id)]
            except Exception as e:
                raise DatasetError(
                    f"the locally generated dataset {random_id} is missing or unreadable "
                    f"({type(e).__name__}): make it with `python cql_pretrain.py --env-id {env_id} "
                    f"--random-dataset-size {random_dataset_size} --dataset-only`"
                ) from None
        else:  # medium-expert is medium and expert concatenated, as D4RL built it
            datasets = [load_minari_dataset(f"mujoco/{env_name}/{k}-v0") for k in kind.split("-")]
        transitions = episodes_to_transitions(ep for ds in datasets for ep in ds.iterate_episodes())
        env_spec = datasets[0].spec.env_spec or gym.spec(GYM_IDS[env_name])
        dataset_id, minari_refs = env_id, datasets[0]
    elif "/" in env_id:
        ds = load_minari_dataset(env_id)
        if ds.spec.env_spec is None:
            raise DatasetError(f"Minari dataset {env_id} records no environment to evaluate in")
        env_spec, dataset_id, minari_refs = ds.spec.env_spec, env_id, ds
        env_name = next((k for k, v in GYM_IDS.items() if v.startswith(env_spec.name)), None)
        transitions = episodes_to_transitions(ds.iterate_episodes())
    else:
        raise DatasetError(
            f"unknown --env-id '{env_id}': expected "
            "`{halfcheetah,hopper,walker2d}-{random,medium,expert,medium-expert}-v2`, a Minari "
            "dataset id such as mujoco/hopper/expert-v0, or a Gymnasium env id with --dataset-path"
        )

    meta = minari_refs.storage.metadata if minari_refs is not None else {}
    minari_ref_returns = None
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        minari_ref_returns = (float(meta["ref_min_score"]), float(meta["ref_max_score"]))
    # A D4RL-style name promises D4RL's scale; Minari's refs (its own v5 policies) are another
    if minari_ref_returns is not None and not name:
        ref_returns = minari_ref_returns
        ref_source = "the Minari dataset's ref_min_score/ref_max_score"
    elif env_name is not None:
        ref_returns, ref_source = D4RL_REF_RETURNS[env_name], "D4RL's -v2 reference returns"
    else:
        ref_returns, ref_source = None, "none (no reference returns for this environment)"

    action_space = make_env(env_spec).action_space
    if transitions["actions"].shape[1:] != action_space.shape:
        shape = transitions["actions"].shape[1:]
        raise DatasetError(
            f"dataset actions have shape {shape}, env {env_spec.id} expects {action_space.shape}"
        )
    transitions["actions"] = scale_to_unit(transitions["actions"], action_space)
    for key, value in transitions.items():
        if not np.isfinite(value).all():
            raise DatasetError(f"dataset {dataset_id} has non-finite values in {key}")
    return OfflineData(
        **transitions,
        env_spec=env_spec,
        dataset_id=dataset_id,
        ref_returns=ref_returns,
        ref_source=ref_source,
        minari_ref_returns=minari_ref_returns,
    )


def scale_to_unit(actions, action_space):
    """Env action bounds -> [-1, 1] (identity for the MuJoCo locomotion envs)."""
    low, high = action_space.low, action_space.high
    return np.clip(2 * (actions - low) / (high - low) - 1, -1, 1).astype(np.float32)


def scale_to_env(actions, action_space):
    """[-1, 1] -> env action bounds."""
    low, high = action_space.low, action_space.high
    return low + (actions + 1) * (high - low) / 2


def normalized_score(returns, ref_returns):
    """D4RL-normalized score: 100 * (R - R_random) / (R_expert - R_random)."""
    return 100 * (np.asarray(returns) - ref_returns[0]) / (ref_returns[1] - ref_returns[0])


# ---------------------------------------------------------------------------------------------
# Checkpoints and arguments
# ---------------------------------------------------------------------------------------------
def rate_text(rate: float) -> str:
    """A rate to two significant figures (0.42, 5.3, 53; 530 and up whole): a slow machine
    shows as slow, never as 0."""
    return f"{rate:.2g}" if rate < 100 else f"{rate:,.0f}"


class Progress:
    """Prints a line at least every `seconds` of wall time through a long phase, with its rate
    and the time left, so that a slow or loaded machine is not taken for a hung run. Call it
    after every step; `printed` says the loop printed its own line (the clock starts again)."""

    def __init__(self, what: str, total: int, done: int = 0, seconds: float = 30.0):
        self.what, self.total, self.seconds = what, total, seconds
        self.done_at_start, self.start = done, time.time()
        self.last = self.start

    def __call__(self, done: int, printed: bool = False):
        now = time.time()
        if printed:
            self.last = now
        if now - self.last < self.seconds:
            return
        self.last = now
        rate = (done - self.done_at_start) / (now - self.start)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        when = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.1f} min"
        when = f"{left:.0f} s" if left < 60 else when
        print(
            f"  {self.what} {done:,}/{self.total:,}: {rate_text(rate)}/s, {when} left", flush=True
        )


CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that does not match this run; the message names both sides."""


def load_checkpoint(path: str) -> dict:
    """Read on the CPU (RNG states must stay there); load_state_dict moves tensors to the device."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own text would suggest unsafe loading: never pass it on
        raise CheckpointError(
            f"{path} ({os.path.getsize(path):,} bytes) is not a readable checkpoint: it is damaged "
            "(cut short by a crash or a full disk?) or was not written by these scripts; delete "
            "it or pass another file"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an off2on checkpoint of format {CHECKPOINT_FORMAT}")
    return checkpoint


def check_checkpoint_matches(metadata: dict, expected: dict, path: str):
    """Fail, naming both values, when a checkpoint was made for another env, data or network."""
    for key, value in expected.items():
        if metadata.get(key) != value:
            saved = f"{key}={metadata.get(key)!r}"
            raise CheckpointError(
                f"checkpoint {path} has {saved}, but this run has {key}={value!r}"
            )


def default_checkpoint_path(env_id: str, ensemble_size: int, seed: int) -> str:
    return f"checkpoints/cql__{env_id.replace('/', '-')}__n{ensemble_size}__seed{seed}.pt"


def validate_args(args: Args):
    names = "random_dataset_size online_steps vae_steps batch_size iw_samples log_every"
    for name in names.split():
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.latent_dim is not None and args.latent_dim < 1:
        raise ValueError(f"--latent-dim must be >= 1, got {args.latent_dim}")
    if any(h < 1 for h in args.vae_hidden_sizes):
        raise ValueError(
            f"--vae-hidden-sizes must be positive integers, got {args.vae_hidden_sizes}"
        )
    if not 0 < args.held_out_fraction < 1:
        raise ValueError(f"--held-out-fraction must be in (0, 1), got {args.held_out_fraction}")


# ---------------------------------------------------------------------------------------------
# Experiment tracking (CleanRL's --track)
# ---------------------------------------------------------------------------------------------
def start_tracking(args, run_name: str, run_id: str | None = None):
    """With --track, a Weights & Biases run that receives every TensorBoard scalar (started before
    the SummaryWriter, as CleanRL does); `run_id` (kept in the checkpoint) continues a resumed
    run's. None without --track."""
    if not args.track:
        return None
    import wandb

    return wandb.init(
        project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
        config=vars(args), name=run_name, save_code=True, id=run_id,
        resume="allow" if run_id else None,
    )  # fmt: skip


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint_path = args.checkpoint or default_checkpoint_path(args.env_id, 5, args.seed)
    try:
        validate_args(args)
        if not os.path.isfile(checkpoint_path):
            if not D4RL_NAME.match(args.env_id):  # a bad --env-id fails here, not in the command
                load_offline_data(args.env_id, args.dataset_path, args.random_dataset_size)
            raise CheckpointError(
                f"--checkpoint {checkpoint_path} does not exist: pretrain one with "
                f"`python cql_pretrain.py --env-id {args.env_id}`"
            )
        checkpoint = load_checkpoint(checkpoint_path)  # before the data, which take longer
        data = load_offline_data(args.env_id, args.dataset_path, args.random_dataset_size)
        obs_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
        meta = checkpoint["metadata"]
        expected = {"env_id": data.env_spec.id, "obs_dim": obs_dim, "action_dim": action_dim}
        check_checkpoint_matches(meta, expected, checkpoint_path)
        rng = np.random.default_rng(args.seed)
        train_idx, held_out_idx = split_held_out(len(data), args.held_out_fraction, rng)
    except ValueError as e:  # DatasetError and CheckpointError included
        raise SystemExit(f"error: {e}")
    if meta["dataset_id"] != data.dataset_id:
        print(
            f"note: {checkpoint_path} was pretrained on {meta['dataset_id']}, "
            f"the VAE learns {data.dataset_id}"
        )
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    run_dir = f"runs/{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}"
    run_dir += f"__{int(time.time())}"

    tracking = start_tracking(args, os.path.basename(run_dir))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")

    # TRAIN the VAE on the train split's (s, a) pairs
    pairs = np.concatenate([data.observations, data.actions], 1)
    pairs = torch.as_tensor(pairs, device=device)  # [M, obs_dim + act_dim]
    train, held_out = pairs[train_idx], pairs[held_out_idx]
    latent_dim = args.latent_dim or obs_dim + action_dim
    mean, std = train.mean(0), train.std(0).clamp_min(1e-3)
    vae = VAE(obs_dim + action_dim, latent_dim, args.vae_hidden_sizes, mean, std).to(device)
    print(
        f"{data.dataset_id}: {len(train):,} train and {len(held_out):,} held-out (s, a) pairs, "
        f"env {data.env_spec.id}; VAE latent {latent_dim}, hidden {list(args.vae_hidden_sizes)} "
        f"on {device}; logs in {run_dir}",
        flush=True,
    )
    train_vae(
        vae, train, held_out, args.vae_steps, args.batch_size, args.vae_lr, args.log_every, writer
    )

    # COLLECT online pairs with the checkpoint's merged policy, sampling as fine-tuning does
    N = meta["ensemble_size"]
    actor = Actor(obs_dim, action_dim, meta["hidden_sizes"], N).to(device)
    actor.load_state_dict(checkpoint["actor"])
    print(
        f"Collecting {args.online_steps:,} online pairs with the merged policy of the {N} agents "
        f"of {checkpoint_path} (sampled actions)",
        flush=True,
    )
    env = make_env(data.env_spec)
    online_obs, online_actions, episode_returns = collect_online_pairs(
        actor, N, env, args.online_steps, args.seed, device, args.log_every
    )
    for i, r in enumerate(episode_returns):
        writer.add_scalar("charts/episodic_return", r, i)
    if len(episode_returns):
        mean_return = episode_returns.mean()
        line = f"online episodes: mean return {mean_return:.1f} over {len(episode_returns)}"
        if data.ref_returns is not None:
            line += f" (normalized {normalized_score(mean_return, data.ref_returns):.1f})"
        if data.minari_ref_returns is not None:
            minari_score = normalized_score(mean_return, data.minari_ref_returns)
            line += f" (Minari-normalized {minari_score:.1f})"
        print(line)

    # SCORE both sets of pairs: log-likelihoods, their AUROC, the figure
    online = torch.as_tensor(np.concatenate([online_obs, online_actions], 1), device=device)
    offline_ll = vae.log_likelihood(held_out, args.iw_samples).cpu().numpy()
    online_ll = vae.log_likelihood(online, args.iw_samples).cpu().numpy()
    score = auroc(offline_ll, online_ll)
    step = args.vae_steps
    writer.add_histogram("log_likelihood/offline_held_out", offline_ll, step)
    writer.add_histogram("log_likelihood/online", online_ll, step)
    writer.add_scalar("charts/log_likelihood_offline_mean", offline_ll.mean(), step)
    writer.add_scalar("charts/log_likelihood_online_mean", online_ll.mean(), step)
    writer.add_scalar("charts/auroc", score, step)
    title = (
        f"{args.env_id}: held-out offline pairs vs online pairs of "
        f"{os.path.basename(checkpoint_path)}\n"
        f"VAE log-likelihood, k={args.iw_samples}, AUROC {score:.3f}"
    )
    fig = plot_log_likelihoods(offline_ll, online_ll, title)
    fig.savefig(f"{run_dir}/log_likelihood.png", dpi=120)
    writer.add_figure("log_likelihood/histograms", fig, step)
    np.savez(
        f"{run_dir}/log_likelihood.npz",
        offline_held_out=offline_ll,
        online=online_ll,
        online_observations=online_obs,
        online_actions=online_actions,
        iw_samples=args.iw_samples,
    )
    writer.close()
    if tracking:
        tracking.finish()
    stats = {
        name: f"mean {ll.mean():.3f} (median {np.median(ll):.3f}, n={len(ll):,})"
        for name, ll in (("offline", offline_ll), ("online", online_ll))
    }
    print(
        f"log-likelihood (IWAE bound, k={args.iw_samples}, nats per (s, a) pair): "
        f"held-out offline {stats['offline']}, online {stats['online']}"
    )
    print(
        f"AUROC of the log-likelihood, held-out offline vs online: {score:.4f} "
        "(0.5: no difference; 1: every online pair less likely)"
    )
    print(f"Wrote {run_dir}/log_likelihood.png and {run_dir}/log_likelihood.npz")
