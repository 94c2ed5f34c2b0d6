"""Concept experiment of Off2On (Lee et al., CoRL 2021), Figure 1a: online samples are out of
distribution for the offline data.

    python vae_shift_probe.py --env-id halfcheetah-random-v2 --checkpoint checkpoints/cql__halfcheetah-random-v2__n5__seed1.pt

1. Train a VAE on the offline (s, a) pairs of a train split; a held-out split (whole blocks of
   1,000 consecutive transitions, so held-out pairs are not time-neighbours of training pairs)
   is kept aside.
2. Collect `--online-steps` online (s, a) pairs with the pretrained CQL ensemble of the checkpoint,
   acting as `off2on_finetune.py` explores: actions *sampled* from the merged Gaussian of all its
   members (not the deterministic tanh(mean)).
3. Estimate log p(s, a) of every held-out offline pair and every online pair with the
   importance-weighted bound (Burda et al. 2016) with k = `--iw-samples` samples.
The two histograms (a PNG in runs/{run_name}/ and TensorBoard), their means, and the AUROC of the
log-likelihood as a classifier "held-out offline vs online" (0.5: no difference) show the
shift: the paper's agent, trained to convergence, visits states and takes actions that the
offline data rarely contains, so its pairs get a lower likelihood (AUROC towards 1). An agent
that stays in the data's densest region scores higher instead (AUROC towards 0): away from 0.5
either way is a shift. The raw values are saved in runs/{run_name}/log_likelihood.npz.

The VAE sees (s, a) standardized with the train split's mean and std; every log-likelihood
reported includes the Jacobian of that standardization (- sum log std), so it is in nats of the
raw pair (s, a) (actions scaled to [-1, 1]). p(z) = N(0, I); encoder q(z|s, a) a diagonal
Gaussian; decoder p(s, a|z) a diagonal Gaussian whose mean is an MLP of z and whose log-std is
one learned parameter per dimension. The paper's learning rate was lost from its text: Adam [1e-3]
as BCQ's VAE. Hidden sizes [256 256] as the project's other networks (BCQ's VAE: 750 750).
The exact setting: SPEC.md section 9.
"""

import math
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro


@dataclass
class Args:
    env_id: str = "halfcheetah-random-v2"
    """dataset: a D4RL-style name `{halfcheetah,hopper,walker2d}-{random,medium,expert,medium-expert}-v2`,
    a Minari dataset id (`mujoco/hopper/expert-v0`), or, with `--dataset-path`, the environment"""
    dataset_path: Optional[str] = None
    """a D4RL-format .hdf5 file to use instead of a Minari dataset"""
    random_dataset_size: int = 1_000_000
    """transitions in the locally generated uniform-random dataset (`*-random-v2`)"""
    checkpoint: Optional[str] = None
    """the ensemble whose merged policy collects the online pairs: a `cql_pretrain.py` checkpoint, or an
    `off2on_finetune.py` state for the fine-tuned agent [default: checkpoints/cql__{env_id}__n5__seed{seed}.pt]"""
    online_steps: int = 10_000
    """online environment steps (= online (s, a) pairs) collected with the checkpoint's policy"""
    held_out_fraction: float = 0.1
    """share of the offline transitions held out from VAE training (in blocks of 1,000)"""
    latent_dim: Optional[int] = None
    """VAE latent dimension [default: obs_dim + action_dim, enough for any full-covariance Gaussian]"""
    vae_hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the VAE's encoder and of its decoder"""
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


# ---------------------------------------------------------------------------------------
# Data: D4RL-style names -> Minari datasets (or a D4RL hdf5 file) -> flat transitions
# ---------------------------------------------------------------------------------------
D4RL_NAME = re.compile(r"^(halfcheetah|hopper|walker2d)-(random|medium|expert|medium-expert|medium-replay)-v\d+$")
GYM_IDS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5"}
# D4RL's random / expert returns of the -v2 datasets (SPEC section 6)
D4RL_REF_RETURNS = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3)}
CHECKPOINT_FORMAT = 1


class DatasetError(ValueError):
    """A dataset that can't be found or read; the message says how to provide it."""


class CheckpointError(ValueError):
    """A checkpoint that does not match this run; the message names both sides."""


@dataclass
class OfflineData:
    observations: np.ndarray  # [M, obs_dim] float32
    actions: np.ndarray  # [M, act_dim] float32, scaled to [-1, 1]
    rewards: np.ndarray  # [M] float32
    next_observations: np.ndarray  # [M, obs_dim] float32
    terminations: np.ndarray  # [M] float32: 1 only on a true termination, never on a time limit
    env_spec: gym.envs.registration.EnvSpec  # the environment to evaluate in
    dataset_id: str
    ref_returns: Optional[tuple[float, float]]  # (random, expert) returns for the normalized score
    ref_source: str  # where ref_returns came from

    def __len__(self):
        return len(self.rewards)


def episodes_to_transitions(episodes) -> dict:
    """Minari episodes (T+1 observations, T actions) -> flat (s, a, r, s', d); none crosses an episode."""
    parts = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminations")}
    for ep in episodes:
        if not isinstance(ep.observations, np.ndarray):
            raise DatasetError("only flat (Box) observations are supported, this dataset has dict or tuple observations")
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
    with h5py.File(path, "r") as f:
        missing = [k for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k not in f]
        if missing:
            raise DatasetError(f"{path} is not a D4RL-format file: it lacks {missing}")
        d = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
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
        root = get_dataset_path()
        raise DatasetError(
            f"Minari dataset '{dataset_id}' is not in {root} and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). With internet: `minari download {dataset_id}`. "
            f"Without: copy the dataset folder from a machine that has it into {root} (or point MINARI_DATASETS_PATH at it), "
            f"or pass --dataset-path to a D4RL-format .hdf5 file."
        ) from None


def make_random_dataset(env_name: str, size: int, seed: int = 0):
    """Roll out a uniform-random policy for `size` steps in the v5 env and store it as a local
    Minari dataset, so it is made once. (D4RL's random-v2 files can't be downloaded here.)"""
    import minari
    from minari.data_collector import EpisodeBuffer

    dataset_id = f"off2on/{env_name}/random-n{size}-v0"
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        pass
    except Exception as e:  # a generation interrupted while writing: make it again
        print(f"{dataset_id} is unreadable ({type(e).__name__}): generating it again", flush=True)
        minari.delete_dataset(dataset_id)
    env = gym.make(GYM_IDS[env_name])
    env.action_space.seed(seed)
    buffers, steps, episode = [], 0, 0
    t0 = time.time()
    print(f"Generating {dataset_id}: {size:,} uniform-random steps in {GYM_IDS[env_name]} ...", flush=True)
    while steps < size:
        obs, _ = env.reset(seed=seed + episode)
        ep = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            steps += 1
            truncated = truncated or steps == size
            for k, v in zip(("observations", "actions", "rewards", "terminations", "truncations"), (obs, action, reward, terminated, truncated)):
                ep[k].append(v)
            done = terminated or truncated
            if steps % 100_000 == 0:
                print(f"  {steps:,}/{size:,} steps ({steps / (time.time() - t0):,.0f} steps/s)", flush=True)
        buffers.append(EpisodeBuffer(id=episode, **{k: np.asarray(v) for k, v in ep.items()}))
        episode += 1
    return minari.create_dataset_from_buffers(  # no reference scores stored: D4RL's are used
        dataset_id, buffers, env=env.spec, eval_env=env.spec, algorithm_name="uniform-random policy",
        author="off2on", author_email="none", code_permalink="cql_pretrain.py",
        description=f"{size} steps of a uniform-random policy in {GYM_IDS[env_name]} (stands in for D4RL's {env_name}-random-v2)",
    )


def load_offline_data(env_id: str, dataset_path: Optional[str] = None, random_dataset_size: int = 1_000_000) -> OfflineData:
    """Resolve `--env-id` / `--dataset-path` to transitions, the eval env and the score references."""
    name = D4RL_NAME.match(env_id)
    env_name = name.group(1) if name else None
    if dataset_path is not None:  # --env-id only names the environment
        if env_name is None:
            try:
                env_spec = gym.spec(env_id)
            except gym.error.Error:
                raise DatasetError(f"--env-id {env_id} is neither a D4RL-style name nor a Gymnasium env id") from None
            env_name = next((k for k, v in GYM_IDS.items() if v.split("-")[0] == env_spec.name), None)
        else:
            env_spec = gym.spec(GYM_IDS[env_name])
        transitions, dataset_id, minari_refs = load_d4rl_hdf5(dataset_path), os.path.abspath(dataset_path), None
    elif name:
        kind = name.group(2)
        if kind == "medium-replay":
            raise DatasetError(
                f"{env_id} has no Minari equivalent: download D4RL's {env_name}_medium_replay-v2.hdf5 "
                f"and pass it with --dataset-path (and --env-id {env_id})"
            )
        if kind == "random":
            datasets = [make_random_dataset(env_name, random_dataset_size)]
        else:  # medium-expert is medium and expert concatenated, as D4RL built it
            datasets = [load_minari_dataset(f"mujoco/{env_name}/{k}-v0") for k in kind.split("-")]
        transitions = episodes_to_transitions(ep for ds in datasets for ep in ds.iterate_episodes())
        env_spec, dataset_id, minari_refs = datasets[0].spec.env_spec or gym.spec(GYM_IDS[env_name]), env_id, datasets[0]
    elif "/" in env_id:
        ds = load_minari_dataset(env_id)
        if ds.spec.env_spec is None:
            raise DatasetError(f"Minari dataset {env_id} records no environment to evaluate in")
        env_spec, dataset_id, minari_refs = ds.spec.env_spec, env_id, ds
        env_name = next((k for k, v in GYM_IDS.items() if v.split("-")[0] == env_spec.name), None)
        transitions = episodes_to_transitions(ds.iterate_episodes())
    else:
        raise DatasetError(
            f"unknown --env-id '{env_id}': expected `{{halfcheetah,hopper,walker2d}}-{{random,medium,expert,medium-expert}}-v2`, "
            f"a Minari dataset id such as mujoco/hopper/expert-v0, or a Gymnasium env id together with --dataset-path FILE.hdf5"
        )

    meta = minari_refs.storage.metadata if minari_refs is not None else {}
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        ref_returns, ref_source = (float(meta["ref_min_score"]), float(meta["ref_max_score"])), "the Minari dataset's ref_min_score/ref_max_score"
    elif env_name is not None:
        ref_returns, ref_source = D4RL_REF_RETURNS[env_name], "D4RL's -v2 reference returns"
    else:
        ref_returns, ref_source = None, "none (no reference returns for this environment)"

    action_space = gym.make(env_spec).action_space
    if transitions["actions"].shape[1:] != action_space.shape:
        raise DatasetError(f"dataset actions have shape {transitions['actions'].shape[1:]}, env {env_spec.id} expects {action_space.shape}")
    transitions["actions"] = scale_to_unit(transitions["actions"], action_space)
    for key, value in transitions.items():
        if not np.isfinite(value).all():
            raise DatasetError(f"dataset {dataset_id} has non-finite values in {key}")
    return OfflineData(**transitions, env_spec=env_spec, dataset_id=dataset_id, ref_returns=ref_returns, ref_source=ref_source)


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


# ---------------------------------------------------------------------------------------
# The pretrained policy: vectorized actors (SPEC sections 0, 1), merged into one Gaussian (section 3)
# ---------------------------------------------------------------------------------------
class VectorizedLinear(nn.Module):
    """N independent linear layers in one: x [N, B, in] -> x @ W + b, W [N, in, out], b [N, 1, out]."""

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features))
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialization, for each member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x, members=slice(None)):
        return torch.baddbmm(self.bias[members], x, self.weight[members])


def vectorized_mlp(in_dim: int, hidden_sizes, out_dim: int, ensemble_size: int) -> nn.Sequential:
    sizes = [in_dim, *hidden_sizes]
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [VectorizedLinear(n_in, n_out, ensemble_size), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, VectorizedLinear(sizes[-1], out_dim, ensemble_size))


LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class Actor(nn.Module):
    """N tanh-Gaussian policies: obs [N, B, obs_dim] -> mean, log_std [N, B, act_dim] of the pre-tanh
    Gaussian. The last layer is the mean head and the log-std head side by side."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes, ensemble_size: int):
        super().__init__()
        self.net = vectorized_mlp(obs_dim, hidden_sizes, 2 * action_dim, ensemble_size)

    def forward(self, obs):
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def ensemble_gaussian(mean, log_std):
    """Merge N members' Gaussians [N, B, A] into the one Gaussian that matches their mixture's first
    two moments (the ensemble policy of eq. 5): mu = mean_i mu_i and
    sigma^2 = mean_i (sigma_i^2 + mu_i^2) - mu^2, written as mean_i sigma_i^2 + mean_i (mu_i - mu)^2
    to avoid cancellation. Returns mean, log_std [B, A]."""
    mu = mean.mean(0)
    var = (2 * log_std).exp().mean(0) + ((mean - mu) ** 2).mean(0)
    return mu, (0.5 * var.log()).clamp(LOG_STD_MIN, LOG_STD_MAX)


@torch.no_grad()
def collect_online_pairs(actor: Actor, ensemble_size: int, env: gym.Env, steps: int, seed: int, device, log_every: int = 1_000):
    """Roll out the merged ensemble policy for `steps` env steps, actions sampled from it as in
    fine-tuning's exploration: a = tanh(u), u ~ N(mu, sigma) of `ensemble_gaussian`. Episodes
    restart when they end. Returns observations [steps, obs_dim], actions [steps, act_dim] in
    [-1, 1], and the returns of the episodes that finished."""
    observations = np.zeros((steps, env.observation_space.shape[0]), np.float32)
    actions = np.zeros((steps, env.action_space.shape[0]), np.float32)
    episode_returns, episode_return = [], 0.0
    obs, _ = env.reset(seed=seed)
    start = time.time()
    for t in range(steps):
        x = torch.as_tensor(obs, dtype=torch.float32, device=device).expand(ensemble_size, 1, -1)
        mean, log_std = ensemble_gaussian(*actor(x))  # [1, A]
        action = torch.tanh(mean + log_std.exp() * torch.randn_like(mean))[0].cpu().numpy()
        observations[t], actions[t] = obs, action
        obs, reward, terminated, truncated, _ = env.step(scale_to_env(action, env.action_space))
        episode_return += reward
        if terminated or truncated:
            episode_returns.append(episode_return)
            obs, episode_return = env.reset()[0], 0.0
        if (t + 1) % log_every == 0 or t + 1 == steps:
            last = f"last episode return {episode_returns[-1]:.1f}" if episode_returns else "no episode finished yet"
            print(f"online step {t + 1:,}/{steps:,} | {len(episode_returns)} episodes, {last} | {(t + 1) / (time.time() - start):.0f} steps/s", flush=True)
    return observations, actions, np.array(episode_returns)


# ---------------------------------------------------------------------------------------
# The VAE on standardized (s, a) and its importance-weighted log-likelihood bound
# ---------------------------------------------------------------------------------------
def mlp(in_dim: int, hidden_sizes, out_dim: int) -> nn.Sequential:
    sizes = [in_dim, *hidden_sizes]
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], out_dim))


def gaussian_log_prob(x, mean, log_std):
    """log N(x; mean, diag(exp(log_std)^2)), summed over the last dimension."""
    return (-0.5 * ((x - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class VAE(nn.Module):
    """p(z) = N(0, I), p(x|z) = N(decoder(z), diag(sigma^2)) with one learned log sigma per dimension,
    q(z|x) = N(mu(x), diag(sigma_q(x)^2)), on x = (cat[s, a] - mean) / std. Inputs of `elbo` and
    `log_likelihood` are raw pairs cat[s, a] [M, D]; both return nats of the raw pair: the
    standardization's Jacobian, - sum log std, is included."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_sizes=(256, 256), mean=None, std=None):
        super().__init__()
        self.encoder = mlp(data_dim, hidden_sizes, 2 * latent_dim)
        self.decoder = mlp(latent_dim, hidden_sizes, data_dim)
        self.decoder_log_std = nn.Parameter(torch.zeros(data_dim))
        self.register_buffer("mean", torch.zeros(data_dim) if mean is None else torch.as_tensor(mean, dtype=torch.get_default_dtype()))
        self.register_buffer("std", torch.ones(data_dim) if std is None else torch.as_tensor(std, dtype=torch.get_default_dtype()))

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
        """E_q[log p(x|z)] - KL(q(z|x) || p(z)) per pair, one reparameterized z, the KL in closed form: [M, D] -> [M]."""
        x = self.standardize(x)
        mu, log_std = self.encode(x)
        z = mu + log_std.exp() * torch.randn_like(mu)
        kl = 0.5 * (mu**2 + (2 * log_std).exp() - 1 - 2 * log_std).sum(-1)
        return gaussian_log_prob(x, *self.decode(z)) - kl - self.std.log().sum()

    @torch.no_grad()
    def log_likelihood(self, x, iw_samples: int = 100, chunk_size: int = 256):
        """Importance-weighted bound on log p(x) per pair: log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x),
        z_1..k ~ q(.|x), with logsumexp. Below log p(x) in expectation, tighter as k grows (k = 1:
        the ELBO). [M, D] -> [M], `chunk_size` pairs (k * chunk_size decoder rows) at a time."""
        bounds = []
        for chunk in x.split(chunk_size):
            chunk = self.standardize(chunk)
            mu, log_std = self.encode(chunk)  # [B, L]
            z = mu + log_std.exp() * torch.randn((iw_samples, *mu.shape), dtype=mu.dtype, device=mu.device)  # [k, B, L]
            log_w = gaussian_log_prob(chunk, *self.decode(z)) + gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) \
                - gaussian_log_prob(z, mu, log_std)  # [k, B]
            bounds.append(torch.logsumexp(log_w, dim=0) - math.log(iw_samples))
        return torch.cat(bounds) - self.std.log().sum()


def train_vae(vae: VAE, train, held_out, steps: int, batch_size: int, lr: float, log_every: int, writer=None):
    """Adam on -ELBO of uniform minibatches of the train pairs [M, D]; every `log_every` steps a
    progress line (and TensorBoard scalars) with the minibatch ELBO and that of up to 10,000 held-out pairs."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    held_out = held_out[:10_000]
    start_time, last_step = time.time(), 0
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
                raise SystemExit(f"error: non-finite ELBO at VAE step {step} ({elbo}, held out {held_out_elbo}); try a lower --vae-lr")
            sps = int((step - last_step) / (time.time() - start_time))
            start_time, last_step = time.time(), step
            if writer is not None:
                writer.add_scalar("losses/elbo", elbo, step)
                writer.add_scalar("losses/held_out_elbo", held_out_elbo, step)
                writer.add_scalar("charts/SPS", sps, step)
            print(f"VAE step {step:,}/{steps:,} | ELBO {elbo:.3f} | held-out ELBO {held_out_elbo:.3f} | {sps} SPS", flush=True)
    return vae


# ---------------------------------------------------------------------------------------
# The split, the classifier score and the figure
# ---------------------------------------------------------------------------------------
def split_held_out(n: int, held_out_fraction: float, rng: np.random.Generator, block: int = 1_000):
    """Random train / held-out split of n transitions by contiguous blocks of `block` (a locomotion
    episode's length): round(fraction * blocks) blocks, at least one, are held out.
    Returns the train and the held-out indices, each sorted."""
    n_blocks = -(-n // block)
    n_held_out = max(1, round(held_out_fraction * n_blocks))
    if n_held_out >= n_blocks:
        raise DatasetError(f"{n:,} transitions are too few to hold out {held_out_fraction} of them in blocks of {block:,}: "
                           f"use a larger dataset (--random-dataset-size) or a smaller --held-out-fraction")
    held = np.zeros(n_blocks, bool)
    held[rng.permutation(n_blocks)[:n_held_out]] = True
    held = np.repeat(held, block)[:n]
    return np.flatnonzero(~held), np.flatnonzero(held)


def auroc(positive, negative) -> float:
    """P(a positive scores above a negative), ties counting 1/2 (the Mann-Whitney U statistic)."""
    scores = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average rank of ties, from 1
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def plot_log_likelihoods(offline, online, title: str):
    """Both histograms overlaid on shared bins (as densities), means as dashed lines. The axis starts
    at the lower of the two sets' 0.5% quantiles, so a few extreme online pairs do not squash it;
    how many fall left of it is in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    low = min(np.quantile(offline, 0.005), np.quantile(online, 0.005))
    high = max(offline.max(), online.max())
    bins = np.linspace(low, high, 80)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for values, label, color in ((offline, "offline (held out)", "tab:blue"), (online, "online (the agent)", "tab:orange")):
        below = int((values < low).sum())
        ax.hist(values, bins=bins, density=True, alpha=0.55, color=color,
                label=f"{label}: mean {values.mean():.1f}" + (f", {below:,} below the axis" if below else ""))
        ax.axvline(values.mean(), color=color, linestyle="--")
    ax.set_xlabel("log-likelihood of (s, a) (importance-weighted bound, nats)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize="medium")
    ax.set_ylim(top=1.3 * ax.get_ylim()[1])  # room for the legend
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# Checkpoints (SPEC section 5)
# ---------------------------------------------------------------------------------------
def load_checkpoint(path: str) -> dict:
    """Read on the CPU (RNG states must stay there); load_state_dict moves tensors to the device."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an off2on checkpoint of format {CHECKPOINT_FORMAT}")
    return checkpoint


def check_checkpoint_matches(metadata: dict, expected: dict, path: str):
    """Fail with both values named when a checkpoint was made for another env, dataset or network."""
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise CheckpointError(f"checkpoint {path} has {key}={metadata.get(key)!r}, but this run has {key}={value!r}")


def default_checkpoint_path(env_id: str, ensemble_size: int, seed: int) -> str:
    return f"checkpoints/cql__{env_id.replace('/', '-')}__n{ensemble_size}__seed{seed}.pt"


def validate_args(args: Args):
    for name in ("random_dataset_size", "online_steps", "vae_steps", "batch_size", "iw_samples", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.latent_dim is not None and args.latent_dim < 1:
        raise ValueError(f"--latent-dim must be >= 1, got {args.latent_dim}")
    if any(h < 1 for h in args.vae_hidden_sizes):
        raise ValueError(f"--vae-hidden-sizes must be positive integers, got {args.vae_hidden_sizes}")
    if not 0 < args.held_out_fraction < 1:
        raise ValueError(f"--held-out-fraction must be in (0, 1), got {args.held_out_fraction}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint_path = args.checkpoint or default_checkpoint_path(args.env_id, 5, args.seed)
    try:
        validate_args(args)
        if not os.path.isfile(checkpoint_path):
            raise CheckpointError(f"--checkpoint {checkpoint_path} does not exist: pretrain one with `python cql_pretrain.py --env-id {args.env_id}`")
        checkpoint = load_checkpoint(checkpoint_path)  # before the data, which may take minutes to generate
        data = load_offline_data(args.env_id, args.dataset_path, args.random_dataset_size)
        obs_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
        meta = checkpoint["metadata"]
        check_checkpoint_matches(meta, {"env_id": data.env_spec.id, "obs_dim": obs_dim, "action_dim": action_dim}, checkpoint_path)
        rng = np.random.default_rng(args.seed)
        train_idx, held_out_idx = split_held_out(len(data), args.held_out_fraction, rng)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if meta["dataset_id"] != data.dataset_id:
        print(f"note: {checkpoint_path} was pretrained on {meta['dataset_id']}, the VAE learns {data.dataset_id}")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = f"runs/{run_name}"

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    pairs = torch.as_tensor(np.concatenate([data.observations, data.actions], 1), device=device)  # [M, obs_dim + act_dim]
    train, held_out = pairs[train_idx], pairs[held_out_idx]
    latent_dim = args.latent_dim or obs_dim + action_dim
    vae = VAE(obs_dim + action_dim, latent_dim, args.vae_hidden_sizes, train.mean(0), train.std(0).clamp_min(1e-3)).to(device)
    print(f"{data.dataset_id}: {len(train):,} train and {len(held_out):,} held-out (s, a) pairs, env {data.env_spec.id}; "
          f"VAE latent {latent_dim}, hidden {list(args.vae_hidden_sizes)} on {device}; logs in {run_dir}", flush=True)
    train_vae(vae, train, held_out, args.vae_steps, args.batch_size, args.vae_lr, args.log_every, writer)

    N = meta["ensemble_size"]
    actor = Actor(obs_dim, action_dim, meta["hidden_sizes"], N).to(device)
    actor.load_state_dict(checkpoint["actor"])
    print(f"Collecting {args.online_steps:,} online pairs with the merged policy of the {N} agents of {checkpoint_path} (sampled actions)", flush=True)
    env = gym.make(data.env_spec)
    online_obs, online_actions, episode_returns = collect_online_pairs(actor, N, env, args.online_steps, args.seed, device, args.log_every)
    for i, r in enumerate(episode_returns):
        writer.add_scalar("charts/episodic_return", r, i)
    if len(episode_returns):
        line = f"online episodes: mean return {episode_returns.mean():.1f} over {len(episode_returns)}"
        if data.ref_returns is not None:
            line += f" (normalized {normalized_score(episode_returns.mean(), data.ref_returns):.1f})"
        print(line)

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
    fig = plot_log_likelihoods(offline_ll, online_ll, f"{args.env_id}: held-out offline pairs vs online pairs of {os.path.basename(checkpoint_path)}\n"
                                                      f"VAE log-likelihood, k={args.iw_samples}, AUROC {score:.3f}")
    fig.savefig(f"{run_dir}/log_likelihood.png", dpi=120)
    writer.add_figure("log_likelihood/histograms", fig, step)
    np.savez(f"{run_dir}/log_likelihood.npz", offline_held_out=offline_ll, online=online_ll,
             online_observations=online_obs, online_actions=online_actions, iw_samples=args.iw_samples)
    writer.close()
    print(f"log-likelihood (IWAE bound, k={args.iw_samples}, nats per (s, a) pair): "
          f"held-out offline mean {offline_ll.mean():.3f} (median {np.median(offline_ll):.3f}, n={len(offline_ll):,}), "
          f"online mean {online_ll.mean():.3f} (median {np.median(online_ll):.3f}, n={len(online_ll):,})")
    print(f"AUROC of the log-likelihood, held-out offline vs online: {score:.4f} (0.5: no difference; 1: every online pair less likely)")
    print(f"Wrote {run_dir}/log_likelihood.png and {run_dir}/log_likelihood.npz")
