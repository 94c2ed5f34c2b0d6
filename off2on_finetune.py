"""Online phase of Off2On (Lee et al., CoRL 2021): fine-tune a pretrained CQL ensemble with SAC,
balanced replay and the pessimistic Q-ensemble.

    python off2on_finetune.py --env-id halfcheetah-medium-v2 --ensemble-size 5

Starts from the N CQL agents of `cql_pretrain.py` (`checkpoints/cql__{env_id}__n5__seed{seed}.pt`,
or `--checkpoint`; if there is none, it pretrains them here first with the same CQL code), then
fine-tunes online:
- one replay buffer holds every offline and every online transition, sampled in proportion to a
  priority `w(s, a)^(1/T)`, where `w ~ d_online / d_offline` is a density ratio learned on the
  fly (balanced replay, paper section 4.1, eq. 4 and eq. 6);
- the N agents act as one: their Gaussians merged into one policy, trained through the mean of the
  members' Q-functions (pessimistic Q-ensemble, section 4.2, eq. 5).
The exact algorithm and defaults: SPEC.md sections 3-7.
"""

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    env_id: str = "halfcheetah-medium-v2"
    """dataset: a D4RL-style name `{halfcheetah,hopper,walker2d}-{random,medium,expert,medium-expert}-v2`,
    a Minari dataset id (`mujoco/hopper/expert-v0`), or, with `--dataset-path`, the environment"""
    dataset_path: Optional[str] = None
    """a D4RL-format .hdf5 file to use instead of a Minari dataset"""
    random_dataset_size: int = 1_000_000
    """transitions in the locally generated uniform-random dataset (`*-random-v2`)"""
    checkpoint: Optional[str] = None
    """pretrained CQL ensemble [default: checkpoints/cql__{env_id}__n{N}__seed{seed}.pt, else ...__n5__...;
    if none exists, the ensemble is pretrained here first (`--offline-steps`)]"""
    ensemble_size: int = 5
    """number of agents N in the Q-ensemble"""
    members: Optional[str] = None
    """which members of the checkpoint to use, e.g. `0,1,2` [default: the first N]"""
    from_scratch: bool = False
    """no pretraining: start from random networks (the SAC baseline)"""
    seed: int = 1
    """seed of the run"""
    total_timesteps: int = 250_000
    """online environment steps"""
    epoch_length: int = 1_000
    """environment steps collected per epoch; then as many gradient steps"""
    first_epoch_multiplier: int = 5
    """the first epoch trains this many times `epoch_length` gradient steps"""
    batch_size: int = 256
    """RL minibatch size (and the density-ratio net's online and offline batch sizes)"""
    replay: Literal["balanced", "uniform", "online-only"] = "balanced"
    """balanced: prioritized by the density ratio; uniform: over offline and online; online-only"""
    ratio_target: Literal["offline", "replay"] = "offline"
    """the density ratio estimates d_online / d_offline, or d_online / d_replay (appendix E.1)"""
    temperature: float = 5.0
    """T: priorities are w^(1/T)"""
    init_online_fraction: float = 0.75
    """f: share of online samples wanted in the first RL batches (sets the new-sample priority)"""
    online_buffer_size: int = 250_000
    """the density-ratio net's online samples come from this many most recent online transitions"""
    finetune_loss: Literal["sac", "cql"] = "sac"
    """sac: plain SAC critics; cql: keep the CQL regularizer online (appendix E.1, and the CQL-ft baseline)"""
    policy_lr: float = 3e-4
    """actor learning rate"""
    q_lr: float = 3e-4
    """critic learning rate"""
    alpha_lr: float = 3e-4
    """entropy temperature learning rate (alpha restarts at 1)"""
    density_ratio_lr: float = 3e-4
    """density-ratio net learning rate"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network soft-update rate"""
    cql_alpha: float = 5.0
    """weight of the CQL regularizer (inline pretraining, and `--finetune-loss cql`)"""
    cql_n_actions: int = 10
    """M: sampled actions of each kind in the CQL logsumexp"""
    offline_steps: int = 1_000_000
    """inline CQL pretraining: gradient steps (used only when no checkpoint exists)"""
    bc_steps: int = 40_000
    """inline CQL pretraining: behaviour-cloning warm start of the actor"""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden sizes of new networks (inline pretraining, --from-scratch); a checkpoint brings its own"""
    eval_every: int = 1
    """epochs between evaluations"""
    eval_episodes: int = 5
    """deterministic evaluation episodes"""
    auroc_every: int = 10
    """epochs between Q-ensemble discrimination measurements (paper Figure 4b)"""
    auroc_samples: int = 1_000
    """online transitions used for each AUROC measurement (10 random actions each)"""
    save_every: int = 10
    """epochs between checkpoints of the whole fine-tuning state"""
    resume: bool = False
    """continue the fine-tuning run saved in checkpoints/{exp_name}__{env_id}__n{N}__seed{seed}.pt"""
    cuda: bool = torch.cuda.is_available()
    """use CUDA"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    exp_name: str = "off2on_finetune"
    """name of the experiment: part of the run name and of the fine-tuning state's file (one per variant)"""


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
# Networks: every layer holds the weights of all members (SPEC section 0)
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

    def forward(self, x, members: Optional[slice] = None):
        # all members: no indexing (its backward would zero-fill and copy each gradient)
        weight, bias = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        if weight.shape[-1] == 1:  # one output (a Q-value): a dot product; CPU BLAS is ~50x slower on batched matrix-vector products (README, Speed)
            return (x * weight.transpose(1, 2)).sum(-1, keepdim=True) + bias
        return torch.baddbmm(bias, x, weight)


def vectorized_mlp(in_dim: int, hidden_sizes, out_dim: int, ensemble_size: int) -> nn.Sequential:
    sizes = [in_dim, *hidden_sizes]
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [VectorizedLinear(n_in, n_out, ensemble_size), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, VectorizedLinear(sizes[-1], out_dim, ensemble_size))


class Critic(nn.Module):
    """The two critics Q_1, Q_2 of each of N agents, as 2N vectorized members (member 2i + k is
    critic k of agent i): obs [N, B, obs_dim], actions [N, B, act_dim] -> Q [N, 2, B]."""

    cpu_chunk_rows = 2048  # on CPU, inputs taller than this run one agent at a time (see forward)

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes, ensemble_size: int):
        super().__init__()
        self.ensemble_size = ensemble_size
        self.net = vectorized_mlp(obs_dim + action_dim, hidden_sizes, 1, 2 * ensemble_size)

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], -1).repeat_interleave(2, dim=0)  # [2N, B, obs_dim + act_dim]
        if x.device.type == "cpu" and x.shape[1] > self.cpu_chunk_rows:
            # Tall inputs (the CQL term: 31 actions a state) go one agent at a time on CPU: batched,
            # the activations (80 MB for N=5) overflow the cache, and it ran 1.3x slower (README, Speed).
            q = torch.cat([self.member_forward(x[2 * i : 2 * i + 2], slice(2 * i, 2 * i + 2)) for i in range(self.ensemble_size)])
        else:
            q = self.net(x)
        return q.view(self.ensemble_size, 2, -1)

    def member_forward(self, x, members: slice):
        for layer in self.net:
            x = layer(x, members) if isinstance(layer, VectorizedLinear) else layer(x)
        return x


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
    """Merge N members' Gaussians [N, B, A] into the one Gaussian that matches their mixture's first
    two moments (the ensemble policy of eq. 5): mu = mean_i mu_i and
    sigma^2 = mean_i (sigma_i^2 + mu_i^2) - mu^2, written as mean_i sigma_i^2 + mean_i (mu_i - mu)^2
    to avoid cancellation. Returns mean, log_std [B, A]."""
    mu = mean.mean(0)
    var = (2 * log_std).exp().mean(0) + ((mean - mu) ** 2).mean(0)
    return mu, (0.5 * var.log()).clamp(LOG_STD_MIN, LOG_STD_MAX)


# ---------------------------------------------------------------------------------------
# CQL (eq. 3): for pretraining when no checkpoint exists, and for `--finetune-loss cql`
# ---------------------------------------------------------------------------------------
def cql_proposals(mean, log_std, next_mean, next_log_std, noise):
    """The 3M actions of the importance-sampled logsumexp and their log-densities: M uniform,
    M from pi(.|s), M from pi(.|s'). Inputs [N, B, A] -> actions [N, 3M, B, A], log-density [N, 3M, B]."""
    cur_actions, cur_log_pi = tanh_gaussian_sample(mean[:, None], log_std[:, None], noise["cur_cql"])
    nxt_actions, nxt_log_pi = tanh_gaussian_sample(next_mean[:, None], next_log_std[:, None], noise["next_cql"])
    uniform_log_density = torch.full_like(cur_log_pi, -mean.shape[-1] * math.log(2))
    return torch.cat([noise["uniform"], cur_actions, nxt_actions], 1), torch.cat([uniform_log_density, cur_log_pi, nxt_log_pi], 1)


def q_data_and_proposals(qf, obs, actions, proposals):
    """Q at s of the data action and of the 3M proposals, in one pass: [N, 2, 1 + 3M, B]."""
    N, K, B, A = proposals.shape
    all_actions = torch.cat([actions[:, None], proposals], 1)
    all_obs = obs[:, None].expand(-1, K + 1, -1, -1)
    return qf(all_obs.reshape(N, -1, obs.shape[-1]), all_actions.reshape(N, -1, A)).view(N, 2, K + 1, B)


def cql_gap(q, log_density):
    """The CQL(H) regularizer of eq. 3 for each agent and critic:
    E_s[ log sum_j exp(Q(s, a_j) - log density(a_j)) - Q(s, a_data) ]. q from q_data_and_proposals -> [N, 2]."""
    logsumexp = torch.logsumexp(q[:, :, 1:] - log_density[:, None], dim=2)  # [N, 2, B]
    return (logsumexp - q[:, :, 0]).mean(-1)


class CQLEnsemble:
    """N CQL agents trained side by side. Every loss is summed over members, so each member's
    gradient (and, Adam being elementwise, each member's update) is exactly its own."""

    def __init__(self, obs_dim, action_dim, hidden_sizes=(256, 256), ensemble_size=5, cql_alpha=5.0, cql_n_actions=10,
                 gamma=0.99, tau=0.005, policy_lr=1e-4, q_lr=3e-4, alpha_lr=1e-4, deterministic_backup=True, device="cpu"):
        self.obs_dim, self.action_dim, self.ensemble_size = obs_dim, action_dim, ensemble_size
        self.cql_alpha, self.cql_n_actions, self.gamma, self.tau = cql_alpha, cql_n_actions, gamma, tau
        self.deterministic_backup, self.target_entropy = deterministic_backup, -float(action_dim)
        self.actor = Actor(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf = Critic(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target = Critic(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.log_alpha = torch.zeros(ensemble_size, device=device, requires_grad=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=policy_lr)
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=q_lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=alpha_lr)

    def draw_noise(self, batch_size: int) -> dict:
        """All randomness of one update, so that an update is a function of (weights, batch, noise)."""
        N, M, B, A, dev = self.ensemble_size, self.cql_n_actions, batch_size, self.action_dim, self.log_alpha.device
        return {
            "target": torch.randn(N, B, A, device=dev),  # a'' ~ pi(.|s') of the Bellman target
            "next_cql": torch.randn(N, M, B, A, device=dev),  # M actions from pi(.|s')
            "cur_cql": torch.randn(N, M, B, A, device=dev),  # M actions from pi(.|s)
            "uniform": torch.rand(N, M, B, A, device=dev) * 2 - 1,  # M uniform actions
            "actor": torch.randn(N, B, A, device=dev),  # a ~ pi(.|s) of the actor loss
        }

    def critic_loss(self, obs, actions, rewards, next_obs, terminations, mean, log_std, noise):
        """Bellman error + cql_alpha * CQL(H) regularizer (eq. 3) for both critics of all agents.
        Inputs [N, B, ...]; mean/log_std: the actor at s, detached."""
        with torch.no_grad():
            next_mean, next_log_std = self.actor(next_obs)
            next_actions, next_log_pi = tanh_gaussian_sample(next_mean, next_log_std, noise["target"])
            next_q = self.qf_target(next_obs, next_actions).min(1).values  # [N, B]
            if not self.deterministic_backup:
                next_q = next_q - self.log_alpha.exp()[:, None] * next_log_pi
            target = rewards + self.gamma * (1 - terminations) * next_q
            proposals, log_density = cql_proposals(mean, log_std, next_mean, next_log_std, noise)
        q = q_data_and_proposals(self.qf, obs, actions, proposals)
        q_data = q[:, :, 0]  # [N, 2, B]
        bellman_loss = ((q_data - target[:, None]) ** 2).mean(-1)  # [N, 2]: plain MSE, as the CQL code
        cql_loss = cql_gap(q, log_density)  # [N, 2]
        loss = (bellman_loss + self.cql_alpha * cql_loss).sum()
        return loss, {"qf_loss": bellman_loss.mean(), "cql_loss": cql_loss.mean(), "q_data": q_data.mean()}

    def actor_loss(self, obs, actions, mean, log_std, noise, behaviour_cloning: bool):
        """E[alpha log pi(a|s) - min_k Q_k(s, a)] (eq. 2), or for the first bc_steps
        E[alpha log pi(a|s) - log pi(a_data|s)]; plus the temperature loss. Summed over members."""
        pi_actions, log_pi = tanh_gaussian_sample(mean, log_std, noise["actor"])  # [N, B, A], [N, B]
        if behaviour_cloning:
            objective = tanh_gaussian_log_prob(mean, log_std, torch.atanh(actions.clamp(-1 + 1e-6, 1 - 1e-6)))
        else:
            objective = self.qf(obs, pi_actions).min(1).values
        alpha = self.log_alpha.exp()[:, None].detach()
        actor_loss = (alpha * log_pi - objective).mean(-1).sum()
        alpha_loss = -(self.log_alpha[:, None] * (log_pi.detach() + self.target_entropy)).mean(-1).sum()
        return actor_loss, alpha_loss, {"actor_loss": actor_loss / self.ensemble_size, "alpha": alpha.mean(), "entropy": -log_pi.mean()}

    def update(self, batch, behaviour_cloning=False, noise=None) -> dict:
        """One gradient step of every agent. batch: (obs, actions, rewards, next_obs, terminations), each [N, B, ...]."""
        obs, actions, rewards, next_obs, terminations = batch
        noise = self.draw_noise(obs.shape[1]) if noise is None else noise
        mean, log_std = self.actor(obs)

        qf_loss, logs = self.critic_loss(obs, actions, rewards, next_obs, terminations, mean.detach(), log_std.detach(), noise)
        self.step_critics(qf_loss)
        self.qf.requires_grad_(False)  # the actor loss only trains the actor
        actor_loss, alpha_loss, actor_logs = self.actor_loss(obs, actions, mean, log_std, noise, behaviour_cloning)
        self.qf.requires_grad_(True)
        self.step_actors_and_targets(actor_loss, alpha_loss)
        return {k: v.detach() for k, v in {**logs, **actor_logs}.items()}

    def step_critics(self, qf_loss):
        self.qf_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.qf_optimizer.step()

    def step_actors_and_targets(self, actor_loss, alpha_loss):
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.alpha_optimizer.zero_grad(set_to_none=True)
        (actor_loss + alpha_loss).backward()  # disjoint parameters: one backward for both
        self.actor_optimizer.step()
        self.alpha_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.qf_target.parameters()), list(self.qf.parameters()), self.tau)

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(), "qf": self.qf.state_dict(), "qf_target": self.qf_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(), "actor_optimizer": self.actor_optimizer.state_dict(),
            "qf_optimizer": self.qf_optimizer.state_dict(), "alpha_optimizer": self.alpha_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict):
        self.actor.load_state_dict(state["actor"])
        self.qf.load_state_dict(state["qf"])
        self.qf_target.load_state_dict(state["qf_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for name in ("actor_optimizer", "qf_optimizer", "alpha_optimizer"):
            if name in state:
                getattr(self, name).load_state_dict(state[name])


# ---------------------------------------------------------------------------------------
# The pessimistic Q-ensemble, fine-tuned online (eq. 5 with the SAC losses of eqs. 1, 2)
# ---------------------------------------------------------------------------------------
class Off2OnEnsemble:
    """N pretrained agents fine-tuned as one: the merged policy pi_E acts and is trained through
    mean_i min_k Q_ik; member i's critics regress on their own target y_i with one a' ~ pi_E(.|s')
    shared by all. One temperature alpha, restarted at 1."""

    def __init__(self, obs_dim, action_dim, hidden_sizes=(256, 256), ensemble_size=5, gamma=0.99, tau=0.005, policy_lr=3e-4,
                 q_lr=3e-4, alpha_lr=3e-4, finetune_loss="sac", cql_alpha=5.0, cql_n_actions=10, device="cpu"):
        self.obs_dim, self.action_dim, self.ensemble_size = obs_dim, action_dim, ensemble_size
        self.gamma, self.tau, self.finetune_loss, self.cql_alpha, self.cql_n_actions = gamma, tau, finetune_loss, cql_alpha, cql_n_actions
        self.target_entropy = -float(action_dim)
        self.actor = Actor(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf = Critic(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target = Critic(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        # fused Adam: one kernel per step, ~5% faster here (README, Speed)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=policy_lr, fused=True)
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=q_lr, fused=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=alpha_lr, fused=True)

    # the same fields as a CQL ensemble's (networks, log_alpha, the three optimizers), stepped the same way
    state_dict, load_state_dict = CQLEnsemble.state_dict, CQLEnsemble.load_state_dict
    step_critics, step_actors_and_targets = CQLEnsemble.step_critics, CQLEnsemble.step_actors_and_targets

    def load_pretrained(self, checkpoint: dict, members: list[int]):
        """Take the chosen members' actors and critics from a pretrained checkpoint (section 5);
        alpha and the optimizers start fresh."""
        critic_rows = [2 * i + k for i in members for k in (0, 1)]  # member 2i + k is critic k of agent i
        self.actor.load_state_dict({k: v[members] for k, v in checkpoint["actor"].items()})
        self.qf.load_state_dict({k: v[critic_rows] for k, v in checkpoint["qf"].items()})
        self.qf_target.load_state_dict({k: v[critic_rows] for k, v in checkpoint["qf_target"].items()})

    def policy(self, obs):
        """pi_E(.|s): obs [B, obs_dim] -> mean, log_std [B, A] of the merged pre-tanh Gaussian."""
        return ensemble_gaussian(*self.actor(obs.expand(self.ensemble_size, -1, -1)))

    def q_values(self, obs, actions):
        """min_k Q_ik(s, a) of every member: [B, ...] -> [N, B]. The ensemble's Q is its mean over i."""
        N = self.ensemble_size
        return self.qf(obs.expand(N, -1, -1), actions.expand(N, -1, -1)).min(1).values

    def draw_noise(self, batch_size: int) -> dict:
        N, M, B, A, dev = self.ensemble_size, self.cql_n_actions, batch_size, self.action_dim, self.log_alpha.device
        noise = {"target": torch.randn(B, A, device=dev), "actor": torch.randn(B, A, device=dev)}  # shared by all members
        if self.finetune_loss == "cql":  # the proposals of each member's CQL term
            noise |= {"next_cql": torch.randn(N, M, B, A, device=dev), "cur_cql": torch.randn(N, M, B, A, device=dev),
                      "uniform": torch.rand(N, M, B, A, device=dev) * 2 - 1}
        return noise

    def critic_loss(self, obs, actions, rewards, next_obs, terminations, noise):
        """Sum over members of each member's Bellman MSE against y_i = r + gamma (1 - d)
        (min_k Qtarget_ik(s', a') - alpha log pi_E(a'|s')); plus CQL(H) with `--finetune-loss cql`."""
        N = self.ensemble_size
        obs, actions, next_obs = (x.expand(N, -1, -1) for x in (obs, actions, next_obs))  # one batch for all members
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_members = self.actor(next_obs)
            next_actions, next_log_pi = tanh_gaussian_sample(*ensemble_gaussian(*next_members), noise["target"])
            next_q = self.qf_target(next_obs, next_actions.expand(N, -1, -1)).min(1).values  # [N, B]
            target = rewards + self.gamma * (1 - terminations) * (next_q - alpha * next_log_pi)
            if self.finetune_loss == "cql":  # proposals from each member's own policy, as in pretraining
                proposals, log_density = cql_proposals(*self.actor(obs), *next_members, noise)
        if self.finetune_loss == "cql":
            q = q_data_and_proposals(self.qf, obs, actions, proposals)
            q_data = q[:, :, 0]
        else:
            q_data = self.qf(obs, actions)
        bellman_loss = ((q_data - target[:, None]) ** 2).mean(-1)  # [N, 2]
        logs = {"qf_loss": bellman_loss.mean(), "q_data": q_data.mean()}
        if self.finetune_loss == "cql":
            cql_loss = cql_gap(q, log_density)
            return (bellman_loss + self.cql_alpha * cql_loss).sum(), {**logs, "cql_loss": cql_loss.mean()}
        return bellman_loss.sum(), logs

    def actor_loss(self, obs, noise):
        """E[alpha log pi_E(a|s) - mean_i min_k Q_ik(s, a)], a ~ pi_E(.|s), and the temperature loss."""
        actions, log_pi = tanh_gaussian_sample(*self.policy(obs), noise["actor"])
        self.qf.requires_grad_(False)  # the actor loss only trains the actors
        q = self.q_values(obs, actions).mean(0)
        self.qf.requires_grad_(True)
        actor_loss = (self.log_alpha.exp().detach() * log_pi - q).mean()
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
        return actor_loss, alpha_loss, {"actor_loss": actor_loss, "alpha": self.log_alpha.exp(), "entropy": -log_pi.mean()}

    def update(self, batch, noise=None) -> dict:
        """One gradient step on a batch [B, ...] shared by all members: critics, then actors and alpha."""
        noise = self.draw_noise(batch[0].shape[0]) if noise is None else noise
        qf_loss, logs = self.critic_loss(*batch, noise)
        self.step_critics(qf_loss)
        actor_loss, alpha_loss, actor_logs = self.actor_loss(batch[0], noise)
        self.step_actors_and_targets(actor_loss, alpha_loss)
        return {k: v.detach() for k, v in {**logs, **actor_logs}.items()}


# ---------------------------------------------------------------------------------------
# Balanced replay (eq. 4 and eq. 6): a sum tree of priorities and a density-ratio estimator
# ---------------------------------------------------------------------------------------
class SumTree:
    """Priorities in a complete binary tree stored in one array: node k has children 2k and 2k + 1,
    the root is node 1 and leaf j is node capacity + j, so a node's value is the sum of its
    leaves. Sampling and updates are vectorized over the batch: one numpy step per tree level."""

    def __init__(self, size: int):
        self.capacity = 1 << max(0, (size - 1).bit_length())  # next power of two >= size
        self.depth = self.capacity.bit_length() - 1
        self.nodes = np.zeros(2 * self.capacity)

    @property
    def total(self) -> float:
        return self.nodes[1]

    def get(self, idx):
        return self.nodes[self.capacity + np.asarray(idx)]

    def update(self, idx, priorities):
        """Set leaves (a repeated index keeps its last value), then recompute their ancestors as
        sums of children, level by level, so the sums never drift. An ancestor of several updated
        leaves is written once for each, always with the same sum (2x faster than np.unique first)."""
        nodes = self.capacity + np.asarray(idx, dtype=np.int64)
        self.nodes[nodes] = priorities
        for _ in range(self.depth):
            nodes = nodes // 2
            self.nodes[nodes] = self.nodes[2 * nodes] + self.nodes[2 * nodes + 1]

    def sample(self, batch_size: int, rng: np.random.Generator):
        """Stratified: one uniform draw in each of batch_size equal segments of [0, total), each
        followed down the tree. A zero-priority subtree is never entered."""
        u = (np.arange(batch_size) + rng.random(batch_size)) * (self.total / batch_size)
        nodes = np.ones(batch_size, dtype=np.int64)
        for _ in range(self.depth):
            left = self.nodes[2 * nodes]
            go_right = (u >= left) & (self.nodes[2 * nodes + 1] > 0)
            u = np.where(go_right, u - left, u)
            nodes = 2 * nodes + go_right
        return nodes - self.capacity


class DensityRatio(nn.Module):
    """w_psi(s, a) >= 0, trained so that w -> d_online(s, a) / d_offline(s, a) (eq. 4). The output
    goes through a softplus, not SPEC's ReLU: a ReLU output stuck at 0 for an online sample has no
    gradient to leave it, and the JS loss of that sample stays at -log(1e-10) (README, "Where this
    differs"). The last bias starts at log(e - 1), so w starts near softplus(log(e - 1)) = 1."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes=(256, 256)):
        super().__init__()
        sizes, layers = [obs_dim + action_dim, *hidden_sizes], []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 1))
        nn.init.constant_(self.net[-1].bias, math.log(math.e - 1))

    def forward(self, obs, actions):
        return F.softplus(self.net(torch.cat([obs, actions], -1))).squeeze(-1)


def density_ratio_loss(w_online, w_offline):
    """The Jensen-Shannon bound of eq. 4; its minimizer is w = d_online / d_offline."""
    return -torch.log(2 / (w_offline + 1) + 1e-10).mean() - torch.log(2 * w_online / (w_online + 1) + 1e-10).mean()


def priority(w, w_offline, temperature: float):
    """Self-normalized priority (eq. 6): w^(1/T) / mean over the offline batch of w^(1/T), in [1e-3, 1e3]."""
    return (w ** (1 / temperature) / ((w_offline ** (1 / temperature)).mean() + 1e-10)).clamp(1e-3, 1e3)


FIELDS = ("observations", "actions", "rewards", "next_observations", "terminations")


class BalancedReplay:
    """Every offline and every online transition in one buffer on the training device, sampled
    (balanced) in proportion to its priority, (uniform) uniformly, or (online-only) uniformly from
    the online part. Online transitions are never evicted."""

    def __init__(self, data: OfflineData, online_capacity: int, mode="balanced", init_online_fraction=0.75,
                 epoch_length=1000, online_buffer_size=250_000, seed=0, device="cpu"):
        self.mode, self.online_buffer_size, self.device = mode, online_buffer_size, device
        self.n_offline, self.n_online = len(data), 0
        size = self.n_offline + online_capacity
        self.storage = {}
        for name in FIELDS:
            offline = torch.as_tensor(getattr(data, name))
            self.storage[name] = torch.zeros(size, *offline.shape[1:], device=device)
            self.storage[name][: self.n_offline] = offline.to(device)
        self.rng = np.random.default_rng(seed)
        if mode == "balanced":
            self.tree = SumTree(size)
            self.tree.update(np.arange(self.n_offline), np.ones(self.n_offline))
            f = init_online_fraction  # P_new: a 1000-step epoch of new samples makes up f of the first batches
            self.new_priority = self.n_offline * f / ((1 - f) * epoch_length)
            self.max_priority = self.new_priority

    def add(self, obs, action, reward, next_obs, terminated):
        i = self.n_offline + self.n_online
        for name, value in zip(FIELDS, (obs, action, reward, next_obs, float(terminated))):
            self.storage[name][i] = torch.as_tensor(value, dtype=torch.float32)
        self.n_online += 1
        if self.mode == "balanced":
            self.tree.update([i], [self.max_priority])

    def sample_indices(self, batch_size: int):
        if self.mode == "balanced":
            return self.tree.sample(batch_size, self.rng)
        low = self.n_offline if self.mode == "online-only" else 0
        return self.rng.integers(low, self.n_offline + self.n_online, batch_size)

    def density_ratio_indices(self, batch_size: int, ratio_target="offline"):
        """Online: uniform over the most recent online_buffer_size online transitions.
        Offline: uniform over the offline data, or over the whole buffer (ratio_target replay)."""
        end = self.n_offline + self.n_online
        online = end - 1 - self.rng.integers(0, min(self.n_online, self.online_buffer_size), batch_size)
        offline = self.rng.integers(0, self.n_offline if ratio_target == "offline" else end, batch_size)
        return online, offline

    def get(self, idx, fields=FIELDS):
        idx = torch.as_tensor(idx, device=self.device)
        return [self.storage[name][idx] for name in fields]

    def update_priorities(self, idx, priorities):
        if not np.isfinite(priorities).all():
            raise ValueError(f"non-finite priorities {priorities[~np.isfinite(priorities)][:5]}: the density-ratio net diverged")
        self.tree.update(idx, priorities)
        self.max_priority = max(self.max_priority, float(priorities.max()))

    def state_dict(self) -> dict:
        end = self.n_offline + self.n_online
        state = {name: self.storage[name][self.n_offline : end].cpu() for name in FIELDS}
        state["rng"] = json.dumps(self.rng.bit_generator.state)
        if self.mode == "balanced":
            state["priorities"], state["max_priority"] = torch.as_tensor(self.tree.get(np.arange(end))), self.max_priority
        return state

    def load_state_dict(self, state: dict):
        self.n_online = len(state["rewards"])
        for name in FIELDS:
            self.storage[name][self.n_offline : self.n_offline + self.n_online] = state[name].to(self.device)
        self.rng.bit_generator.state = json.loads(state["rng"])
        if self.mode == "balanced":
            self.tree.update(np.arange(len(state["priorities"])), state["priorities"].numpy())
            self.max_priority = state["max_priority"]


# ---------------------------------------------------------------------------------------
# Analyses (SPEC section 7) and evaluation
# ---------------------------------------------------------------------------------------
def auroc(positive, negative) -> float:
    """P(a positive scores above a negative), ties counting 1/2 (the Mann-Whitney U statistic)."""
    scores = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average rank of ties, from 1
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def q_discrimination(agents: Off2OnEnsemble, replay: BalancedReplay, n_samples: int, rng, n_random=10):
    """Figure 4b: AUROC of Q as a score for "real online action" against "uniform random action",
    for the ensemble (mean over members of each member's min) and for member 0 alone."""
    idx = replay.n_offline + rng.choice(replay.n_online, min(n_samples, replay.n_online), replace=False)
    obs, actions = replay.get(idx)[:2]
    random_actions = torch.rand(len(idx) * n_random, agents.action_dim, device=obs.device) * 2 - 1
    q = agents.q_values(torch.cat([obs, obs.repeat_interleave(n_random, 0)]), torch.cat([actions, random_actions]))  # [N, S(1 + n)]
    n = len(idx)
    ensemble, member0 = q.mean(0).cpu().numpy(), q[0].cpu().numpy()
    return auroc(ensemble[:n], ensemble[n:]), auroc(member0[:n], member0[n:])


@torch.no_grad()
def evaluate(agents: Off2OnEnsemble, envs: list, seed: int, device) -> np.ndarray:
    """Deterministic returns of the ensemble policy, tanh of the merged mean: one episode per env, in lockstep."""
    obs = np.stack([env.reset(seed=seed + j)[0] for j, env in enumerate(envs)])
    returns, active = np.zeros(len(envs)), np.ones(len(envs), bool)
    while active.any():
        mean, _ = agents.policy(torch.as_tensor(obs, dtype=torch.float32, device=device))
        actions = torch.tanh(mean).cpu().numpy()
        for j in np.flatnonzero(active):
            obs[j], reward, terminated, truncated, _ = envs[j].step(scale_to_env(actions[j], envs[j].action_space))
            returns[j] += reward
            active[j] = not (terminated or truncated)
    return returns


# ---------------------------------------------------------------------------------------
# Checkpoints (SPEC section 5)
# ---------------------------------------------------------------------------------------
def save_checkpoint(path: str, checkpoint: dict):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


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


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def restore_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_same_settings(saved: dict, current: dict, path: str, ignore=()):
    """Resuming under other algorithm settings would silently mix two runs: fail, naming them."""
    differing = {k: (saved.get(k), v) for k, v in current.items() if k not in ignore and saved.get(k) != v}
    if differing:
        raise CheckpointError(f"{path} was made with other settings (saved, now): {differing}; resume with the same ones, or start a new run")


def default_checkpoint_path(env_id: str, ensemble_size: int, seed: int) -> str:
    return f"checkpoints/cql__{env_id.replace('/', '-')}__n{ensemble_size}__seed{seed}.pt"


def parse_members(members: Optional[str], ensemble_size: int) -> list[int]:
    if members is None:
        return list(range(ensemble_size))
    try:
        chosen = [int(m) for m in members.split(",")]
    except ValueError:
        raise ValueError(f"--members must be comma-separated member indices like 0,1,2, got {members!r}") from None
    if len(chosen) != ensemble_size or len(set(chosen)) != len(chosen) or min(chosen) < 0:
        raise ValueError(f"--members {members} must name {ensemble_size} distinct members (--ensemble-size {ensemble_size})")
    return chosen


def run_metadata(args: Args, data: OfflineData, hidden_sizes, critic_source: str) -> dict:
    """The checkpoint metadata of SPEC section 5."""
    return {"obs_dim": data.observations.shape[1], "action_dim": data.actions.shape[1], "hidden_sizes": list(hidden_sizes),
            "ensemble_size": args.ensemble_size, "dataset_id": data.dataset_id, "env_id": data.env_spec.id, "critic_source": critic_source,
            "args": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()}}


def pretrain_cql(args: Args, data: OfflineData, path: str, device) -> dict:
    """No checkpoint: pretrain the N CQL agents here, as cql_pretrain.py does (without its
    evaluations). Progress is saved to `path`.partial every 10k steps; rerunning continues it."""
    obs_dim, action_dim, N = data.observations.shape[1], data.actions.shape[1], args.ensemble_size
    agents = CQLEnsemble(obs_dim, action_dim, args.hidden_sizes, N, args.cql_alpha, args.cql_n_actions, args.gamma, args.tau, device=device)  # CQL's own lrs
    metadata = run_metadata(args, data, args.hidden_sizes, critic_source="cql")
    partial, start = f"{path}.partial", 0
    if os.path.exists(partial):
        checkpoint = load_checkpoint(partial)
        check_checkpoint_matches(checkpoint["metadata"], {k: metadata[k] for k in ("dataset_id", "obs_dim", "action_dim", "hidden_sizes", "ensemble_size")}, partial)
        agents.load_state_dict(checkpoint)
        start = checkpoint["global_step"]
        restore_rng_state(checkpoint["rng"])
    print(f"No pretrained ensemble found: pretraining {N} CQL agents for {args.offline_steps:,} steps (from step {start:,}) into {path}", flush=True)
    dataset = [torch.as_tensor(x, device=device) for x in (data.observations, data.actions, data.rewards, data.next_observations, data.terminations)]
    start_time = time.time()
    for step in range(start + 1, args.offline_steps + 1):
        idx = torch.randint(len(data), (N, args.batch_size), device=device)  # each agent its own minibatch
        logs = agents.update([x[idx] for x in dataset], behaviour_cloning=step <= args.bc_steps)
        last = step == args.offline_steps
        if step % 1000 == 0 or last:
            logs = {k: v.item() for k, v in logs.items()}
            if not all(math.isfinite(v) for v in logs.values()):
                raise SystemExit(f"error: non-finite CQL loss at step {step} ({logs}); progress so far is in {partial}")
            print(f"  CQL step {step:,}/{args.offline_steps:,} | qf {logs['qf_loss']:.3f} | cql {logs['cql_loss']:.3f} | "
                  f"actor {logs['actor_loss']:.3f} | {(step - start) / (time.time() - start_time):.1f} steps/s", flush=True)
        if step % 10_000 == 0 or last:
            save_checkpoint(partial, {"format_version": CHECKPOINT_FORMAT, "metadata": metadata, **agents.state_dict(),
                                      "global_step": step, "run_name": "inline", "rng": rng_state()})
    os.replace(partial, path)
    return load_checkpoint(path)


def validate_args(args: Args):
    for name in ("ensemble_size", "total_timesteps", "epoch_length", "first_epoch_multiplier", "batch_size", "eval_every", "eval_episodes",
                 "auroc_every", "auroc_samples", "save_every", "online_buffer_size", "offline_steps", "cql_n_actions", "random_dataset_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.total_timesteps % args.epoch_length:
        raise ValueError(f"--total-timesteps {args.total_timesteps} must be a multiple of --epoch-length {args.epoch_length}")
    if not 0 < args.init_online_fraction < 1:
        raise ValueError(f"--init-online-fraction must be in (0, 1), got {args.init_online_fraction}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.replay != "balanced" and args.ratio_target != "offline":
        raise ValueError(f"--ratio-target {args.ratio_target} needs --replay balanced (no density ratio is learned with --replay {args.replay})")
    if args.from_scratch and (args.checkpoint or args.members):
        raise ValueError("--from-scratch starts from random networks: drop --checkpoint and --members")


if __name__ == "__main__":
    args = tyro.cli(Args)
    env_tag = args.env_id.replace("/", "-")
    state_path = f"checkpoints/{args.exp_name}__{env_tag}__n{args.ensemble_size}__seed{args.seed}.pt"  # this fine-tuning run, for --resume
    try:
        validate_args(args)
        members = parse_members(args.members, args.ensemble_size)
        if os.path.exists(state_path) and not args.resume:
            raise ValueError(f"{state_path} exists: pass --resume to continue that run, or --exp-name to start another")
        data = load_offline_data(args.env_id, args.dataset_path, args.random_dataset_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    N = args.ensemble_size
    obs_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    resume = args.resume and os.path.exists(state_path)
    try:
        if resume:
            state = load_checkpoint(state_path)
            check_same_settings(state["metadata"]["args"], run_metadata(args, data, args.hidden_sizes, "")["args"], state_path, ignore=(
                "resume", "cuda", "torch_deterministic", "total_timesteps", "eval_every", "eval_episodes", "auroc_every", "auroc_samples", "save_every"))
            hidden_sizes = state["metadata"]["hidden_sizes"]
        elif args.from_scratch:
            pretrained, hidden_sizes = None, list(args.hidden_sizes)
        else:
            candidates = [args.checkpoint] if args.checkpoint else [default_checkpoint_path(args.env_id, n, args.seed) for n in (N, 5)]
            path = next((p for p in candidates if os.path.exists(p)), None)
            if args.checkpoint and path is None:
                raise CheckpointError(f"--checkpoint {args.checkpoint} does not exist")
            if path is None and max(members) >= N:
                raise CheckpointError(f"no checkpoint at {' or '.join(candidates)}, and members {members} are not among the {N} agents pretraining would make")
            pretrained = load_checkpoint(path) if path else pretrain_cql(args, data, candidates[0], device)
            path = path or candidates[0]
            meta = pretrained["metadata"]
            check_checkpoint_matches(meta, {"dataset_id": data.dataset_id, "obs_dim": obs_dim, "action_dim": action_dim}, path)
            if max(members) >= meta["ensemble_size"]:
                raise CheckpointError(f"checkpoint {path} has {meta['ensemble_size']} members, but this run asks for members {members}")
            hidden_sizes = meta["hidden_sizes"]
            print(f"Fine-tuning members {members} of {path} (critics from {meta.get('critic_source', 'cql')})")
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")

    agents = Off2OnEnsemble(obs_dim, action_dim, hidden_sizes, N, args.gamma, args.tau, args.policy_lr, args.q_lr, args.alpha_lr,
                            args.finetune_loss, args.cql_alpha, args.cql_n_actions, device)
    replay = BalancedReplay(data, args.total_timesteps, args.replay, args.init_online_fraction, args.epoch_length,
                            args.online_buffer_size, args.seed, device)
    density_ratio = DensityRatio(obs_dim, action_dim).to(device)
    density_ratio_optimizer = torch.optim.Adam(density_ratio.parameters(), lr=args.density_ratio_lr, fused=True)
    analysis_rng = np.random.default_rng(args.seed + 1)  # the online transitions the AUROC uses
    start_epoch, run_name = 0, f"{env_tag}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if resume:
        agents.load_state_dict(state)
        replay.load_state_dict(state["replay"])
        density_ratio.load_state_dict(state["density_ratio"])
        density_ratio_optimizer.load_state_dict(state["density_ratio_optimizer"])
        start_epoch, run_name = state["epoch"], state["run_name"]
        restore_rng_state(state["rng"])
        analysis_rng.bit_generator.state = json.loads(state["analysis_rng"])
        print(f"Resuming {state_path} after epoch {start_epoch}")
    elif pretrained is not None:
        agents.load_pretrained(pretrained, members)
    metadata = run_metadata(args, data, hidden_sizes, critic_source="off2on")

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    print(f"{data.dataset_id}: {len(data):,} offline transitions, env {data.env_spec.id}; replay {args.replay}, "
          f"N={N}, {args.finetune_loss} loss; normalized score uses {data.ref_source}; logs in runs/{run_name}")
    eval_envs = [gym.make(data.env_spec) for _ in range(args.eval_episodes)]
    env = gym.make(data.env_spec)

    def log_evaluation(epoch):
        returns = evaluate(agents, eval_envs, args.seed + 10_000, device)
        writer.add_scalar("eval/return", returns.mean(), epoch * args.epoch_length)
        line = f"eval after {epoch * args.epoch_length:,} online steps: return {returns.mean():.1f}"
        if data.ref_returns is not None:
            score = normalized_score(returns.mean(), data.ref_returns)
            writer.add_scalar("eval/normalized_score", score, epoch * args.epoch_length)
            line += f" (normalized {score:.1f})"
        print(line, flush=True)

    if start_epoch == 0:
        log_evaluation(0)  # the offline ensemble, before any online step
    obs, _ = env.reset(seed=args.seed + start_epoch)
    episode_return, n_epochs = 0.0, args.total_timesteps // args.epoch_length
    for epoch in range(start_epoch + 1, n_epochs + 1):
        epoch_start = time.time()
        with torch.no_grad():  # collect one epoch with the merged policy
            for t in range(args.epoch_length):
                mean, log_std = agents.policy(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
                action = tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))[0][0].cpu().numpy()
                next_obs, reward, terminated, truncated, _ = env.step(scale_to_env(action, env.action_space))
                replay.add(obs, action, reward, next_obs, terminated)
                obs, episode_return = next_obs, episode_return + reward
                if terminated or truncated:
                    writer.add_scalar("charts/episodic_return", episode_return, (epoch - 1) * args.epoch_length + t + 1)
                    obs, episode_return = env.reset()[0], 0.0

        n_updates = args.epoch_length * (args.first_epoch_multiplier if epoch == 1 else 1)
        sums, offline_count = {}, 0
        for _ in range(n_updates):
            idx = replay.sample_indices(args.batch_size)
            batch = replay.get(idx)
            offline_count += int((idx < replay.n_offline).sum())
            if args.replay == "balanced":
                # w on the RL batch (its priorities) and on an online and an offline batch (the loss of eq. 4)
                ratio_idx = np.concatenate([idx, *replay.density_ratio_indices(args.batch_size, args.ratio_target)])
                w_batch, w_online, w_offline = density_ratio(*replay.get(ratio_idx, FIELDS[:2])).split(args.batch_size)
                with torch.no_grad():  # priorities from w before this step's update of w
                    replay.update_priorities(idx, priority(w_batch, w_offline, args.temperature).cpu().numpy())
                loss = density_ratio_loss(w_online, w_offline)
                density_ratio_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                density_ratio_optimizer.step()
                ratio_logs = {"density_ratio_loss": loss.detach(), "w_online_mean": w_online.detach().mean(), "w_offline_mean": w_offline.detach().mean()}
            logs = agents.update(batch)
            if args.replay == "balanced":
                logs.update(ratio_logs)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v
        means = {k: (v / n_updates).item() for k, v in sums.items()}
        if not all(math.isfinite(v) for v in means.values()):
            raise SystemExit(f"error: non-finite loss in epoch {epoch} ({means}); the last good state ({state_path}) is kept. "
                             f"Try lower learning rates, and --resume from it")
        step, offline_fraction = epoch * args.epoch_length, offline_count / (n_updates * args.batch_size)
        for k, v in means.items():
            writer.add_scalar(f"charts/{k}" if k.startswith("w_") else f"losses/{k}", v, step)
        writer.add_scalar("charts/offline_fraction", offline_fraction, step)
        sps = int(args.epoch_length / (time.time() - epoch_start))
        writer.add_scalar("charts/SPS", sps, step)
        line = (f"epoch {epoch}/{n_epochs} | qf {means['qf_loss']:.3f} | actor {means['actor_loss']:.3f} | alpha {means['alpha']:.3f} | "
                f"offline fraction {offline_fraction:.2f}")
        if args.replay == "balanced":
            line += f" | w online {means['w_online_mean']:.2f} offline {means['w_offline_mean']:.2f}"
        print(line + f" | {sps} SPS", flush=True)

        if epoch % args.auroc_every == 0 or epoch == n_epochs:
            auroc_ensemble, auroc_member0 = q_discrimination(agents, replay, args.auroc_samples, analysis_rng)
            writer.add_scalar("charts/q_auroc_ensemble", auroc_ensemble, step)
            writer.add_scalar("charts/q_auroc_member0", auroc_member0, step)
        if epoch % args.eval_every == 0 or epoch == n_epochs:
            log_evaluation(epoch)
        if epoch % args.save_every == 0 or epoch == n_epochs:
            save_checkpoint(state_path, {
                "format_version": CHECKPOINT_FORMAT, "metadata": metadata, **agents.state_dict(), "epoch": epoch, "run_name": run_name,
                "replay": replay.state_dict(), "density_ratio": density_ratio.state_dict(),
                "density_ratio_optimizer": density_ratio_optimizer.state_dict(), "rng": rng_state(),
                "analysis_rng": json.dumps(analysis_rng.bit_generator.state)})
    writer.close()
    print(f"Wrote {state_path}")
