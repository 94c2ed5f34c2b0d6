"""Off2On, online phase: fine-tune a pretrained CQL ensemble with balanced replay and the
pessimistic Q-ensemble.

Lee, Seo, Lee, Abbeel, Shin, "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021, https://arxiv.org/abs/2107.00591 (section 4, eqs. 1-6).

    python off2on_finetune.py --env-id halfcheetah-medium-v2 --ensemble-size 5

Starts from the N CQL agents of cql_pretrain.py (`checkpoints/cql__{env_id}__n{N}__seed{seed}.pt`,
or `--checkpoint`; if there is none, it runs cql_pretrain.py first), then fine-tunes online:
- one replay buffer holds every offline and every online transition, sampled in proportion to a
  priority w(s, a)^(1/T), where w ~ d_online / d_offline is a density ratio learned on the fly
  (balanced replay, section 4.1, eqs. 4 and 6);
- the N agents act as one: their Gaussians merged into one policy, trained through the mean of
  the members' Q-functions (pessimistic Q-ensemble, section 4.2, eq. 5).
Follows the authors' code (https://github.com/shlee94/Off2OnRL, rlkit-based) for the schedule,
the density-ratio net and the defaults. Docs: docs/off2on_finetune.md; the method, its equations
mapped to functions and where we differ from the paper: docs/algorithm.md.

Shared word for word with other scripts (tests/test_shared_blocks.py checks every copy):
    data [cql_pretrain fqe_baseline vae_shift_probe awac_finetune bcq_finetune]: D4RL_NAME GYM_IDS
        D4RL_REF_RETURNS RANDOM_DATASET_ID FIELDS DatasetError OfflineData make_env
        episodes_to_transitions load_d4rl_hdf5 load_minari_dataset load_offline_data scale_to_unit
        scale_to_env normalized_score
    layers [cql_pretrain fqe_baseline vae_shift_probe pixel_off2on]: VectorizedLinear vectorized_mlp
        LOG_STD_MIN
    actor [cql_pretrain fqe_baseline vae_shift_probe]: Actor
    critic [cql_pretrain fqe_baseline]: Critic
    policy [cql_pretrain fqe_baseline vae_shift_probe pixel_off2on]: tanh_gaussian_log_prob
        tanh_gaussian_sample
    merged policy [cql_pretrain vae_shift_probe pixel_off2on]: ensemble_gaussian
    CQL term [cql_pretrain pixel_off2on]: cql_proposals cql_gap
    CQL term, state-based [cql_pretrain]: q_data_and_proposals
    balanced replay [pixel_off2on]: SumTree density_ratio_loss priority
    AUROC [vae_shift_probe]: auroc
    checkpoints [cql_pretrain fqe_baseline vae_shift_probe pixel_off2on awac_finetune bcq_finetune]:
        CHECKPOINT_FORMAT CheckpointError load_checkpoint check_checkpoint_matches
    saving [cql_pretrain fqe_baseline pixel_off2on awac_finetune bcq_finetune]: save_checkpoint
        rng_state restore_rng_state
    resuming [cql_pretrain pixel_off2on awac_finetune bcq_finetune]: check_same_settings
    online env [awac_finetune bcq_finetune]: env_snapshot restore_env collect
    checkpoint path [cql_pretrain vae_shift_probe]: default_checkpoint_path
    members [pixel_off2on]: parse_members
    progress [cql_pretrain awac_finetune bcq_finetune pixel_off2on fqe_baseline vae_shift_probe]:
        rate_text Progress
    tracking [cql_pretrain awac_finetune bcq_finetune fqe_baseline pixel_off2on vae_shift_probe]:
        start_tracking
    videos [cql_pretrain awac_finetune bcq_finetune]: VideoRecorder
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    env_id: str = "halfcheetah-medium-v2"
    """dataset: `{halfcheetah,hopper,walker2d}-{random,medium,expert,medium-expert}-v2`, a Minari
    dataset id (`mujoco/hopper/expert-v0`), or, with `--dataset-path`, the environment"""
    dataset_path: str | None = None
    """a D4RL-format .hdf5 file to use instead of a Minari dataset"""
    random_dataset_size: int = 1_000_000
    """transitions in the locally generated uniform-random dataset (`*-random-v2`)"""
    checkpoint: str | None = None
    """pretrained CQL ensemble [default: checkpoints/cql__{env_id}__n{N}__seed{seed}.pt, else
    ...__n5__...; if neither exists, cql_pretrain.py makes the first (`--offline-steps`)]"""
    ensemble_size: int = 5
    """number of agents N in the Q-ensemble"""
    members: str | None = None
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
    """sac: plain SAC critics; cql: keep the CQL regularizer online (appendix E.1; CQL-ft)"""
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
    """weight of the CQL regularizer (pretraining, and `--finetune-loss cql`)"""
    cql_n_actions: int = 10
    """M: sampled actions of each kind in the CQL logsumexp"""
    offline_steps: int = 1_000_000
    """CQL pretraining steps, when no checkpoint exists (passed to cql_pretrain.py)"""
    bc_steps: int = 40_000
    """CQL pretraining: behaviour-cloning warm start of the actor (passed to cql_pretrain.py)"""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden sizes of new networks (pretraining, --from-scratch); a checkpoint brings its own"""
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
    """continue the run saved in checkpoints/{exp_name}__{env_id}__n{N}__seed{seed}.pt"""
    cuda: bool = torch.cuda.is_available()
    """use CUDA"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    exp_name: str = "off2on_finetune"
    """name of the experiment: part of the run name and of the fine-tuning state's file"""
    track: bool = False
    """also log to Weights & Biases: every TensorBoard scalar, the settings and this file"""
    wandb_project_name: str = "off2on"
    """W&B project, with --track"""
    wandb_entity: str | None = None
    """W&B team or user, with --track (yours if not given)"""
    capture_video: bool = False
    """record evaluation episodes to videos/{run_name}/ (mp4) and to TensorBoard"""
    video_every: int = 10
    """with --capture-video: the first and the last evaluation, and every this many in between"""


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
# Networks: every layer holds the weights of all N members (docs/algorithm.md, "Vectorized
# ensembles")
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


class Critic(nn.Module):
    """The two critics Q_1, Q_2 of each of N agents, as 2N vectorized members (member 2i + k is
    critic k of agent i): obs [N, B, obs_dim], actions [N, B, act_dim] -> Q [N, 2, B]."""

    cpu_chunk_rows = 2048  # on CPU, inputs taller than this run one agent at a time

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes, ensemble_size: int):
        super().__init__()
        self.ensemble_size = ensemble_size
        self.net = vectorized_mlp(obs_dim + action_dim, hidden_sizes, 1, 2 * ensemble_size)

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], -1).repeat_interleave(2, dim=0)  # [2N, B, obs_dim + act_dim]
        if x.device.type == "cpu" and x.shape[1] > self.cpu_chunk_rows:
            # the CQL term's 31 actions a state: batched, the activations overflow the CPU cache
            # (docs/speed.md, "Per-agent chunking of the CQL critic on CPU")
            agents = [slice(2 * i, 2 * i + 2) for i in range(self.ensemble_size)]
            q = torch.cat([self.member_forward(x, members) for members in agents])
        else:
            q = self.net(x)
        return q.view(self.ensemble_size, 2, -1)

    def member_forward(self, x, members: slice):
        x = x[members]
        for layer in self.net:
            x = layer(x, members) if isinstance(layer, VectorizedLinear) else layer(x)
        return x


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


# ---------------------------------------------------------------------------------------------
# Balanced replay (section 4.1): a sum tree of priorities, the density ratio (eq. 4), the
# priority (eq. 6), and one buffer for offline and online transitions
# ---------------------------------------------------------------------------------------------
class SumTree:
    """Priorities in a complete binary tree stored in one array: node k has children 2k and
    2k + 1, the root is node 1 and leaf j is node capacity + j, so a node holds the sum of its
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
        """Set leaves (a repeated index keeps its last value), then recompute their ancestors
        level by level as sums of children, so the sums never drift. An ancestor of several
        leaves is written once for each, with the same sum (docs/speed.md, "Sum tree updates")."""
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
    """w_psi(s, a) >= 0, trained so that w -> d_online(s, a) / d_offline(s, a) (eq. 4). Softplus
    output: a ReLU output stuck at 0 has no gradient to leave it (docs/algorithm.md, "Where this
    differs from the paper"). The last bias starts at log(e - 1), so that w starts at 1."""

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
    offline_term = -torch.log(2 / (w_offline + 1) + 1e-10).mean()
    return offline_term - torch.log(2 * w_online / (w_online + 1) + 1e-10).mean()


def priority(w, w_offline, temperature: float):
    """Self-normalized priority (eq. 6): w^(1/T) / mean over the offline batch of w^(1/T),
    clamped to [1e-3, 1e3]."""
    normalizer = (w_offline ** (1 / temperature)).mean() + 1e-10
    return (w ** (1 / temperature) / normalizer).clamp(1e-3, 1e3)


class BalancedReplay:
    """Every offline and every online transition in one buffer on the training device, sampled
    (balanced) in proportion to its priority, (uniform) uniformly, or (online-only) uniformly
    from the online part. Online transitions are never evicted."""

    def __init__(
        self, data: OfflineData, online_capacity: int, mode="balanced", init_online_fraction=0.75,
        epoch_length=1000, online_buffer_size=250_000, seed=0, device="cpu",
    ):  # fmt: skip
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
            # P_new: an epoch of new samples makes up a fraction f of the first batches
            f = init_online_fraction
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
        recent = min(self.n_online, self.online_buffer_size)
        online = end - 1 - self.rng.integers(0, recent, batch_size)
        offline_end = self.n_offline if ratio_target == "offline" else end
        return online, self.rng.integers(0, offline_end, batch_size)

    def get(self, idx, fields=FIELDS):
        idx = torch.as_tensor(idx, device=self.device)
        return [self.storage[name][idx] for name in fields]

    def update_priorities(self, idx, priorities):
        if not np.isfinite(priorities).all():
            bad = priorities[~np.isfinite(priorities)][:5]
            raise ValueError(f"non-finite priorities {bad}: the density-ratio net diverged")
        self.tree.update(idx, priorities)
        self.max_priority = max(self.max_priority, float(priorities.max()))

    def state_dict(self) -> dict:
        end = self.n_offline + self.n_online
        state = {name: self.storage[name][self.n_offline : end].cpu() for name in FIELDS}
        state["rng"] = json.dumps(self.rng.bit_generator.state)
        if self.mode == "balanced":
            state["priorities"] = torch.as_tensor(self.tree.get(np.arange(end)))
            state["max_priority"] = self.max_priority
        return state

    def load_state_dict(self, state: dict):
        self.n_online = len(state["rewards"])
        for name in FIELDS:
            online = state[name].to(self.device)
            self.storage[name][self.n_offline : self.n_offline + self.n_online] = online
        self.rng.bit_generator.state = json.loads(state["rng"])
        if self.mode == "balanced":
            self.tree.update(np.arange(len(state["priorities"])), state["priorities"].numpy())
            self.max_priority = state["max_priority"]


# ---------------------------------------------------------------------------------------------
# The pessimistic Q-ensemble (section 4.2): SAC losses (eqs. 1, 2) through the merged policy
# (eq. 5); with --finetune-loss cql, each member keeps its CQL term (eq. 3)
# ---------------------------------------------------------------------------------------------
def cql_proposals(mean, log_std, next_mean, next_log_std, noise):
    """The 3M actions of the importance-sampled logsumexp and their log-densities: M uniform,
    M from pi(.|s), M from pi(.|s'). Inputs [N, B, A] -> actions [N, 3M, B, A] and their
    log-densities [N, 3M, B]."""
    from_s = tanh_gaussian_sample(mean[:, None], log_std[:, None], noise["cur_cql"])
    from_next_s = tanh_gaussian_sample(next_mean[:, None], next_log_std[:, None], noise["next_cql"])
    uniform_log_density = torch.full_like(from_s[1], -mean.shape[-1] * math.log(2))
    actions = torch.cat([noise["uniform"], from_s[0], from_next_s[0]], 1)
    return actions, torch.cat([uniform_log_density, from_s[1], from_next_s[1]], 1)


def q_data_and_proposals(qf, obs, actions, proposals):
    """Q at s of the data action and of the 3M proposals, in one pass: [N, 2, 1 + 3M, B]."""
    N, K, B, A = proposals.shape
    all_actions = torch.cat([actions[:, None], proposals], 1).reshape(N, -1, A)
    all_obs = obs[:, None].expand(-1, K + 1, -1, -1).reshape(N, (K + 1) * B, -1)
    return qf(all_obs, all_actions).view(N, 2, K + 1, B)


def cql_gap(q, log_density):
    """The CQL(H) regularizer of eq. 3 for each agent and critic,
    E_s[ log sum_j exp(Q(s, a_j) - log density(a_j)) - Q(s, a_data) ]:
    q [N, 2, 1 + 3M, B] from q_data_and_proposals -> [N, 2]."""
    logsumexp = torch.logsumexp(q[:, :, 1:] - log_density[:, None], dim=2)  # [N, 2, B]
    return (logsumexp - q[:, :, 0]).mean(-1)


OPTIMIZERS = ("actor_optimizer", "qf_optimizer", "alpha_optimizer")


class Off2OnEnsemble:
    """N pretrained agents fine-tuned as one: the merged policy pi_E acts and is trained through
    mean_i min_k Q_ik; member i's critics regress on their own target y_i, with one
    a' ~ pi_E(.|s') shared by all. One temperature alpha, restarted at 1."""

    def __init__(
        self, obs_dim, action_dim, hidden_sizes=(256, 256), ensemble_size=5, gamma=0.99, tau=0.005,
        policy_lr=3e-4, q_lr=3e-4, alpha_lr=3e-4, finetune_loss="sac", cql_alpha=5.0,
        cql_n_actions=10, device="cpu",
    ):  # fmt: skip
        self.obs_dim, self.action_dim, self.ensemble_size = obs_dim, action_dim, ensemble_size
        self.gamma, self.tau, self.target_entropy = gamma, tau, -float(action_dim)
        self.finetune_loss, self.cql_alpha = finetune_loss, cql_alpha
        self.cql_n_actions = cql_n_actions
        self.actor = Actor(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf = Critic(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target = Critic(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        # fused Adam: one kernel per step (docs/speed.md, "Fused Adam")
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=policy_lr, fused=True)
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=q_lr, fused=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=alpha_lr, fused=True)

    def load_pretrained(self, checkpoint: dict, members: list[int]):
        """Take the chosen members' actors and critics from a pretrained checkpoint (a
        cql_pretrain.py checkpoint or its FQE twin); alpha and the optimizers start fresh."""
        critic_rows = [2 * i + k for i in members for k in (0, 1)]  # 2i + k: critic k of agent i
        self.actor.load_state_dict({k: v[members] for k, v in checkpoint["actor"].items()})
        self.qf.load_state_dict({k: v[critic_rows] for k, v in checkpoint["qf"].items()})
        target = {k: v[critic_rows] for k, v in checkpoint["qf_target"].items()}
        self.qf_target.load_state_dict(target)

    def policy(self, obs):
        """pi_E(.|s): obs [B, obs_dim] -> mean, log_std [B, A] of the merged pre-tanh Gaussian."""
        return ensemble_gaussian(*self.actor(obs.expand(self.ensemble_size, -1, -1)))

    def q_values(self, obs, actions):
        """min_k Q_ik(s, a) of every member: [B, ...] -> [N, B]. The ensemble's Q is their mean."""
        N = self.ensemble_size
        return self.qf(obs.expand(N, -1, -1), actions.expand(N, -1, -1)).min(1).values

    def draw_noise(self, batch_size: int) -> dict:
        """All randomness of one update: an update is a function of (weights, batch, noise)."""
        N, M, B, A = self.ensemble_size, self.cql_n_actions, batch_size, self.action_dim
        dev = self.log_alpha.device
        noise = {"target": torch.randn(B, A, device=dev), "actor": torch.randn(B, A, device=dev)}
        if self.finetune_loss == "cql":  # the proposals of each member's CQL term
            noise["next_cql"] = torch.randn(N, M, B, A, device=dev)
            noise["cur_cql"] = torch.randn(N, M, B, A, device=dev)
            noise["uniform"] = torch.rand(N, M, B, A, device=dev) * 2 - 1
        return noise

    def critic_loss(self, obs, actions, rewards, next_obs, terminations, noise):
        """Sum over members of each member's Bellman MSE against its own target
        y_i = r + gamma (1 - d) (min_k Qtarget_ik(s', a') - alpha log pi_E(a'|s')) (eq. 1);
        plus each member's CQL(H) term (eq. 3) with `--finetune-loss cql`."""
        N = self.ensemble_size
        obs, actions, next_obs = (x.expand(N, -1, -1) for x in (obs, actions, next_obs))
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_members = self.actor(next_obs)
            merged = ensemble_gaussian(*next_members)
            next_actions, next_log_pi = tanh_gaussian_sample(*merged, noise["target"])
            next_q = self.qf_target(next_obs, next_actions.expand(N, -1, -1)).min(1).values
            target = rewards + self.gamma * (1 - terminations) * (next_q - alpha * next_log_pi)
            if self.finetune_loss == "cql":  # proposals from each member's own policy
                proposals, log_density = cql_proposals(*self.actor(obs), *next_members, noise)
        if self.finetune_loss == "cql":
            q = q_data_and_proposals(self.qf, obs, actions, proposals)
            q_data = q[:, :, 0]
        else:
            q_data = self.qf(obs, actions)  # [N, 2, B]
        bellman_loss = ((q_data - target[:, None]) ** 2).mean(-1)  # [N, 2]
        logs = {"qf_loss": bellman_loss.mean(), "q_data": q_data.mean()}
        if self.finetune_loss == "cql":
            cql_loss = cql_gap(q, log_density)  # [N, 2]
            bellman_loss, logs["cql_loss"] = (
                bellman_loss + self.cql_alpha * cql_loss,
                cql_loss.mean(),
            )
        return bellman_loss.sum(), logs

    def actor_loss(self, obs, noise):
        """E[alpha log pi_E(a|s) - mean_i min_k Q_ik(s, a)], a ~ pi_E(.|s) (eqs. 2, 5), and the
        temperature loss."""
        actions, log_pi = tanh_gaussian_sample(*self.policy(obs), noise["actor"])
        self.qf.requires_grad_(False)  # the actor loss only trains the actors
        q = self.q_values(obs, actions).mean(0)
        self.qf.requires_grad_(True)
        actor_loss = (self.log_alpha.exp().detach() * log_pi - q).mean()
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
        logs = {"actor_loss": actor_loss, "alpha": self.log_alpha.exp(), "entropy": -log_pi.mean()}
        return actor_loss, alpha_loss, logs

    def update(self, batch, noise=None) -> dict:
        """One gradient step on a batch [B, ...] shared by all members: the critics, then the
        actors and alpha against the updated critics, then the targets."""
        noise = self.draw_noise(batch[0].shape[0]) if noise is None else noise
        qf_loss, logs = self.critic_loss(*batch, noise)
        self.qf_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.qf_optimizer.step()

        actor_loss, alpha_loss, actor_logs = self.actor_loss(batch[0], noise)
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.alpha_optimizer.zero_grad(set_to_none=True)
        (actor_loss + alpha_loss).backward()  # disjoint parameters: one backward for both
        self.actor_optimizer.step()
        self.alpha_optimizer.step()
        with torch.no_grad():
            targets, params = list(self.qf_target.parameters()), list(self.qf.parameters())
            torch._foreach_lerp_(targets, params, self.tau)
        return {k: v.detach() for k, v in {**logs, **actor_logs}.items()}

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "qf": self.qf.state_dict(),
            "qf_target": self.qf_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            **{name: getattr(self, name).state_dict() for name in OPTIMIZERS},
        }

    def load_state_dict(self, state: dict):
        self.actor.load_state_dict(state["actor"])
        self.qf.load_state_dict(state["qf"])
        self.qf_target.load_state_dict(state["qf_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for name in OPTIMIZERS:
            getattr(self, name).load_state_dict(state[name])


# ---------------------------------------------------------------------------------------------
# Evaluation and the Q-ensemble's discrimination of real from random actions (Figure 4b)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agents: Off2OnEnsemble, envs: list, seed: int, device) -> np.ndarray:
    """Deterministic returns of the merged policy (tanh of its mean): one episode per env, all
    in lockstep."""
    obs = np.stack([env.reset(seed=seed + j)[0] for j, env in enumerate(envs)])
    returns, active = np.zeros(len(envs)), np.ones(len(envs), bool)
    while active.any():
        mean, _ = agents.policy(torch.as_tensor(obs, dtype=torch.float32, device=device))
        actions = torch.tanh(mean).cpu().numpy()
        for j in np.flatnonzero(active):
            action = scale_to_env(actions[j], envs[j].action_space)
            obs[j], reward, terminated, truncated, _ = envs[j].step(action)
            returns[j] += reward
            active[j] = not (terminated or truncated)
    return returns


def auroc(positive, negative) -> float:
    """P(a positive scores above a negative), ties counting 1/2 (the Mann-Whitney U statistic)."""
    scores = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average rank of ties, from 1
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def q_discrimination(
    agents: Off2OnEnsemble, replay: BalancedReplay, n_samples: int, rng, n_random=10
):
    """AUROC of Q as a score for "real online action" against "uniform random action", for the
    ensemble (mean over members of each member's min) and for member 0 alone."""
    n = min(n_samples, replay.n_online)
    idx = replay.n_offline + rng.choice(replay.n_online, n, replace=False)
    obs, actions = replay.get(idx, FIELDS[:2])
    random_actions = torch.rand(n * n_random, agents.action_dim, device=obs.device) * 2 - 1
    all_obs = torch.cat([obs, obs.repeat_interleave(n_random, 0)])
    q = agents.q_values(all_obs, torch.cat([actions, random_actions]))  # [N, n (1 + n_random)]
    ensemble, member0 = q.mean(0).cpu().numpy(), q[0].cpu().numpy()
    return auroc(ensemble[:n], ensemble[n:]), auroc(member0[:n], member0[n:])


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
# Checkpoints, pretraining, arguments
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


def save_checkpoint(path: str, checkpoint: dict):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


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


def rng_state() -> dict:
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    return {"torch": torch.get_rng_state(), **cuda}


def restore_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def env_snapshot(env, obs, episode_return: float) -> dict:
    """What the online episode needs to go on exactly after --resume: the env's RNG, MuJoCo's
    whole integration state (the solver's warm start included), the time-limit counter, the
    current observation and the episode's return so far."""
    import mujoco

    sim, kind = env.unwrapped, mujoco.mjtState.mjSTATE_INTEGRATION
    physics = np.empty(mujoco.mj_stateSize(sim.model, kind))
    mujoco.mj_getState(sim.model, sim.data, physics, kind)
    return {
        "rng": json.dumps(sim.np_random.bit_generator.state),
        "physics": torch.as_tensor(physics),
        "elapsed_steps": env.get_wrapper_attr("_elapsed_steps"),
        "obs": torch.as_tensor(obs),
        "episode_return": float(episode_return),
    }


def restore_env(env, snapshot: dict):
    """The inverse of env_snapshot on a new env: returns (obs, episode_return)."""
    import mujoco

    env.reset()  # the wrappers' own bookkeeping; everything it drew is overwritten below
    sim, kind = env.unwrapped, mujoco.mjtState.mjSTATE_INTEGRATION
    sim.np_random.bit_generator.state = json.loads(snapshot["rng"])
    mujoco.mj_setState(sim.model, sim.data, snapshot["physics"].numpy(), kind)
    env.set_wrapper_attr("_elapsed_steps", snapshot["elapsed_steps"])
    return snapshot["obs"].numpy(), snapshot["episode_return"]


def check_same_settings(saved: dict, current: dict, path: str, ignore=()):
    """Resuming under other algorithm settings would silently mix two runs: fail, naming them."""
    differing = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if differing := {k: v for k, v in differing.items() if k not in ignore}:
        raise CheckpointError(
            f"{path} was made with other settings (saved, now): {differing}; "
            "resume with the same ones, or start a new run"
        )


def default_checkpoint_path(env_id: str, ensemble_size: int, seed: int) -> str:
    return f"checkpoints/cql__{env_id.replace('/', '-')}__n{ensemble_size}__seed{seed}.pt"


def parse_members(members: str | None, ensemble_size: int) -> list[int]:
    if members is None:
        return list(range(ensemble_size))
    try:
        chosen = [int(m) for m in members.split(",")]
    except ValueError:
        msg = f"--members must be comma-separated member indices like 0,1,2, got {members!r}"
        raise ValueError(msg) from None
    if len(chosen) != ensemble_size or len(set(chosen)) != len(chosen) or min(chosen) < 0:
        raise ValueError(
            f"--members {members} must name {ensemble_size} distinct members "
            f"(--ensemble-size {ensemble_size})"
        )
    return chosen


def pretrain(args: Args, path: str):
    """Make the pretrained ensemble with cql_pretrain.py, in a child process with this run's
    settings. It saves to `path`.partial as it goes (rerunning continues it), renamed at the end."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cql_pretrain.py")
    command = [sys.executable, script, "--total-steps", str(args.offline_steps)]
    passed = "env_id random_dataset_size ensemble_size seed batch_size cql_alpha cql_n_actions"
    for name in f"{passed} bc_steps gamma tau eval_episodes".split():
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--dataset-path", args.dataset_path] if args.dataset_path else []
    command += ["--hidden-sizes", *map(str, args.hidden_sizes), "--resume"]
    command += ["--checkpoint-path", f"{path}.partial", "--cuda" if args.cuda else "--no-cuda"]
    command += [f"--{'' if args.torch_deterministic else 'no-'}torch-deterministic"]
    print(f"No pretrained ensemble at {path}: making it with\n  {shlex.join(command)}", flush=True)
    if (returncode := subprocess.run(command).returncode) != 0:
        raise SystemExit(returncode)  # cql_pretrain.py has printed why
    os.replace(f"{path}.partial", path)


def run_metadata(args: Args, data: OfflineData, hidden_sizes, critic_source: str) -> dict:
    """What a checkpoint says about itself (docs/cql_pretrain.md, "Checkpoints")."""
    return {
        "obs_dim": data.observations.shape[1],
        "action_dim": data.actions.shape[1],
        "hidden_sizes": list(hidden_sizes),
        "ensemble_size": args.ensemble_size,
        "dataset_id": data.dataset_id,
        "env_id": data.env_spec.id,
        "critic_source": critic_source,
        "args": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()},
    }


# settings that may change when a run is resumed: they don't change what is computed
NOT_SETTINGS = ("resume", "cuda", "torch_deterministic", "total_timesteps", "eval_every")
NOT_SETTINGS += ("eval_episodes", "auroc_every", "auroc_samples", "save_every")
NOT_SETTINGS += ("track", "wandb_project_name", "wandb_entity", "capture_video")
NOT_SETTINGS += ("video_every",)


def validate_args(args: Args):
    for name, value in vars(args).items():  # counts, sizes and periods
        if type(value) is int and name not in ("seed", "bc_steps") and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.total_timesteps % args.epoch_length:
        raise ValueError(
            f"--total-timesteps {args.total_timesteps} must be a multiple of "
            f"--epoch-length {args.epoch_length}"
        )
    if not 0 < args.init_online_fraction < 1:
        raise ValueError(
            f"--init-online-fraction must be in (0, 1), got {args.init_online_fraction}"
        )
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.replay != "balanced" and args.ratio_target != "offline":
        raise ValueError(
            f"--ratio-target {args.ratio_target} needs --replay balanced (no density ratio is "
            f"learned with --replay {args.replay})"
        )
    if args.from_scratch and (args.checkpoint or args.members):
        raise ValueError("--from-scratch starts from random networks: drop --checkpoint, --members")


# ---------------------------------------------------------------------------------------------
# The online loop's two bodies: collecting transitions, and one training step
# ---------------------------------------------------------------------------------------------
def make_learners(args: Args, data: OfflineData, hidden_sizes, device):
    """What the online phase trains: the ensemble, the replay over offline and online data, and
    the density-ratio net with its optimizer."""
    obs_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    agents = Off2OnEnsemble(
        obs_dim, action_dim, hidden_sizes, args.ensemble_size, args.gamma, args.tau,
        args.policy_lr, args.q_lr, args.alpha_lr, args.finetune_loss, args.cql_alpha,
        args.cql_n_actions, device,
    )  # fmt: skip
    replay = BalancedReplay(
        data, args.total_timesteps, args.replay, args.init_online_fraction, args.epoch_length,
        args.online_buffer_size, args.seed, device,
    )  # fmt: skip
    density_ratio = DensityRatio(obs_dim, action_dim).to(device)
    ratio_optimizer = torch.optim.Adam(
        density_ratio.parameters(), lr=args.density_ratio_lr, fused=True
    )
    return agents, replay, density_ratio, ratio_optimizer


@torch.no_grad()
def collect(env, act, replay, obs, episode_return: float, n_steps: int):
    """n_steps environment steps from obs with act(obs) -> an action in [-1, 1]^A, each stored in
    the replay. Returns the obs and return to go on from, and (steps taken, return) of each
    episode that ended."""
    low, high, finished = env.action_space.low, env.action_space.high, []
    for t in range(1, n_steps + 1):
        action = act(obs)
        # a Gaussian policy's samples leave [-1, 1]: clipped for the env (rlkit's
        # NormalizedBoxEnv does the same), stored as drawn
        env_action = np.clip(scale_to_env(action, env.action_space), low, high)
        next_obs, reward, terminated, truncated, _ = env.step(env_action)
        # a time limit is not an end of the task: only a termination stops the bootstrapping
        replay.add(obs, action, reward, next_obs, terminated)
        obs, episode_return = next_obs, episode_return + reward
        if terminated or truncated:
            finished.append((t, episode_return))
            obs, episode_return = env.reset()[0], 0.0
    return obs, episode_return, finished


def train_step(agents, replay, density_ratio, ratio_optimizer, args: Args):
    """One gradient step of the online phase: an RL batch drawn by priority, (balanced replay) the
    density ratio's step and the batch's new priorities, then the ensemble's update. Returns the
    update's logs and how many of the batch's transitions are offline ones."""
    idx = replay.sample_indices(args.batch_size)
    batch = replay.get(idx)
    if replay.mode == "balanced":
        # DENSITY RATIO: w of the RL batch gives its new priorities (eq. 6, with w before this
        # step's update); w of an online and an offline batch, the loss (eq. 4)
        on_idx, off_idx = replay.density_ratio_indices(args.batch_size, args.ratio_target)
        ratio_batch = replay.get(np.concatenate([idx, on_idx, off_idx]), FIELDS[:2])
        w_batch, w_online, w_offline = density_ratio(*ratio_batch).split(args.batch_size)
        with torch.no_grad():
            priorities = priority(w_batch, w_offline, args.temperature)
        replay.update_priorities(idx, priorities.cpu().numpy())
        loss = density_ratio_loss(w_online, w_offline)
        ratio_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ratio_optimizer.step()
    # ENSEMBLE UPDATE: critics, actors and alpha of all N members (eqs. 1, 2, 5)
    logs = agents.update(batch)
    if replay.mode == "balanced":
        logs["density_ratio_loss"] = loss.detach()
        logs["w_online_mean"] = w_online.detach().mean()
        logs["w_offline_mean"] = w_offline.detach().mean()
    return logs, int((idx < replay.n_offline).sum())


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


class VideoRecorder(gym.Wrapper):
    """An evaluation env that keeps the frames of the episodes it is told to record (`start`) and
    writes them as an mp4 and to TensorBoard (`save`). Rendering is headless (MUJOCO_GL=egl by
    default) and cheap: no shadows, reflections, skybox or multisampling (docs/tracking.md)."""

    def __init__(self, env: gym.Env, folder: str):
        super().__init__(env)
        env.unwrapped.model.vis.quality.offsamples = 0  # before the renderer's context exists
        self.folder, self.frames = folder, None

    def frame(self):
        import mujoco

        frame = self.env.render()
        scene = self.env.unwrapped.mujoco_renderer.viewer.scn
        if scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW]:  # the renderer's first frame
            for flag in ("mjRND_SHADOW", "mjRND_REFLECTION", "mjRND_SKYBOX"):
                scene.flags[getattr(mujoco.mjtRndFlag, flag)] = 0
            frame = self.env.render()
        return frame

    def reset(self, **kwargs):
        result = self.env.reset(**kwargs)
        if self.frames is not None:
            self.frames.append(self.frame())
        return result

    def step(self, action):
        result = self.env.step(action)
        if self.frames is not None:
            self.frames.append(self.frame())
        return result

    def start(self):
        self.frames = []

    def save(self, writer, step: int) -> str:
        """{folder}/step{step}.mp4 at the env's own frame rate; in TensorBoard (tag eval/video),
        every 4th frame at half size, which keeps the event file small."""
        import imageio

        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"step{step}.mp4")
        fps = self.env.metadata["render_fps"]
        imageio.mimwrite(path, self.frames, fps=fps, macro_block_size=1)
        small = torch.as_tensor(np.stack(self.frames[::4])[:, ::2, ::2]).permute(0, 3, 1, 2)
        writer.add_video("eval/video", small[None], step, fps=max(1, round(fps / 4)))
        self.frames = None
        return path


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.capture_video:  # headless rendering, chosen before MuJoCo is imported
        os.environ.setdefault("MUJOCO_GL", "egl")
    N, seed, env_tag = args.ensemble_size, args.seed, args.env_id.replace("/", "-")
    state_path = f"checkpoints/{args.exp_name}__{env_tag}__n{N}__seed{seed}.pt"  # for --resume
    resume = args.resume and os.path.exists(state_path)
    try:
        validate_args(args)
        members = parse_members(args.members, N)
        if os.path.exists(state_path) and not args.resume:
            raise ValueError(
                f"{state_path} exists: pass --resume to continue that run, "
                "or --exp-name to start another"
            )
        # the data first, so that a bad --env-id or --dataset-path fails before any pretraining
        # (a *-random-v2 dataset may not exist yet: pretraining makes it)
        name = D4RL_NAME.match(args.env_id)
        made_by_pretraining = name and name.group(2) == "random" and not args.dataset_path
        dataset_args = (args.env_id, args.dataset_path, args.random_dataset_size)
        data = None if made_by_pretraining else load_offline_data(*dataset_args)
        if not (resume or args.from_scratch):  # find the pretrained ensemble, or make it
            candidates = [default_checkpoint_path(args.env_id, n, seed) for n in (N, 5)]
            candidates = [args.checkpoint] if args.checkpoint else candidates
            path = next((p for p in candidates if os.path.exists(p)), None)
            if args.checkpoint and path is None:
                raise CheckpointError(f"--checkpoint {args.checkpoint} does not exist")
            if path is None and max(members) >= N:
                raise CheckpointError(
                    f"no checkpoint at {' or '.join(candidates)}, and members {members} are not "
                    f"among the {N} agents pretraining would make"
                )
            if path is None:
                path = candidates[0]
                pretrain(args, path)
        if data is None:
            data = load_offline_data(*dataset_args)
        obs_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
        if resume:
            state = load_checkpoint(state_path)
            current = run_metadata(args, data, args.hidden_sizes, "")["args"]
            check_same_settings(state["metadata"]["args"], current, state_path, NOT_SETTINGS)
            hidden_sizes = state["metadata"]["hidden_sizes"]
        elif args.from_scratch:
            pretrained, hidden_sizes = None, list(args.hidden_sizes)
        else:
            pretrained = load_checkpoint(path)
            meta = pretrained["metadata"]
            # agents pretrained elsewhere (imported), on data we can't name: check the env instead
            imported = "imported_from" in meta
            expected = {"env_id": data.env_spec.id} if imported else {"dataset_id": data.dataset_id}
            expected |= {"obs_dim": obs_dim, "action_dim": action_dim}
            check_checkpoint_matches(meta, expected, path)
            if max(members) >= meta["ensemble_size"]:
                raise CheckpointError(
                    f"checkpoint {path} has {meta['ensemble_size']} members, but this run asks "
                    f"for members {members}"
                )
            hidden_sizes = meta["hidden_sizes"]
            source = f"critics from {meta.get('critic_source', 'cql')}"
            if "imported_from" in meta:
                source += f"; imported from {meta['imported_from']['folder']}"
            print(f"Fine-tuning members {members} of {path} ({source})")
    except ValueError as e:  # DatasetError and CheckpointError included
        raise SystemExit(f"error: {e}")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.manual_seed(seed)
    np.random.seed(seed)

    agents, replay, density_ratio, ratio_optimizer = make_learners(args, data, hidden_sizes, device)
    analysis_rng = np.random.default_rng(seed + 1)  # the online transitions the AUROC uses
    start_epoch, run_name = 0, f"{env_tag}__{args.exp_name}__{seed}__{int(time.time())}"
    if resume:
        agents.load_state_dict(state)
        replay.load_state_dict(state["replay"])
        density_ratio.load_state_dict(state["density_ratio"])
        ratio_optimizer.load_state_dict(state["density_ratio_optimizer"])
        start_epoch, run_name = state["epoch"], state["run_name"]
        restore_rng_state(state["rng"])
        analysis_rng.bit_generator.state = json.loads(state["analysis_rng"])
        if start_epoch >= args.total_timesteps // args.epoch_length:  # leave its logs alone
            print(f"{state_path} is complete ({start_epoch} epochs): nothing to resume")
            raise SystemExit(0)
        print(f"Resuming {state_path} after epoch {start_epoch}")
    elif pretrained is not None:
        agents.load_pretrained(pretrained, members)
    metadata = run_metadata(args, data, hidden_sizes, critic_source="off2on")

    tracking = start_tracking(args, run_name, state.get("wandb_id") if resume else None)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    print(
        f"{data.dataset_id}: {len(data):,} offline transitions, env {data.env_spec.id}; replay "
        f"{args.replay}, N={N}, {args.finetune_loss} loss; normalized score uses "
        f"{data.ref_source}; logs in runs/{run_name}"
    )
    eval_envs = [make_env(data.env_spec) for _ in range(args.eval_episodes)]
    if args.capture_video:  # the first evaluation episode, rendered
        video_env = make_env(data.env_spec, render_mode="rgb_array", width=240, height=240)
        eval_envs[0] = VideoRecorder(video_env, f"videos/{run_name}")
    env = make_env(data.env_spec)

    def log_evaluation(step):
        evaluation, last = (
            step // (args.eval_every * args.epoch_length),
            step == args.total_timesteps,
        )
        if args.capture_video and (evaluation % args.video_every == 0 or last):
            eval_envs[0].start()
        returns = evaluate(agents, eval_envs, seed + 10_000, device)
        if args.capture_video and eval_envs[0].frames is not None:
            print(f"video: {eval_envs[0].save(writer, step)}")
        writer.add_scalar("eval/return", returns.mean(), step)
        line = f"eval after {step:,} online steps: return {returns.mean():.1f}"
        if data.ref_returns is not None:
            score = normalized_score(returns.mean(), data.ref_returns)
            writer.add_scalar("eval/normalized_score", score, step)
            line += f" (normalized {score:.1f})"
        if data.minari_ref_returns is not None:  # Minari's scale, beside D4RL's
            minari_score = normalized_score(returns.mean(), data.minari_ref_returns)
            writer.add_scalar("eval/minari_normalized_score", minari_score, step)
        print(line, flush=True)

    if start_epoch == 0:
        log_evaluation(0)  # the offline ensemble, before any online step
    if resume and "env" in state:  # the saved run's episode, exactly where it was
        obs, episode_return = restore_env(env, state["env"])
    else:
        obs, episode_return = env.reset(seed=seed + start_epoch)[0], 0.0

    def act(obs):  # a sample of the merged policy pi_E
        mean, log_std = agents.policy(
            torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
        )
        return tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))[0][0].cpu().numpy()

    n_epochs = args.total_timesteps // args.epoch_length
    for epoch in range(start_epoch + 1, n_epochs + 1):
        # COLLECT an epoch of online transitions with the merged policy
        epoch_start, step = time.time(), (epoch - 1) * args.epoch_length
        obs, episode_return, finished = collect(
            env, act, replay, obs, episode_return, args.epoch_length
        )
        for t, episodic_return in finished:
            writer.add_scalar("charts/episodic_return", episodic_return, step + t)
        step += args.epoch_length

        # TRAIN: as many gradient steps as new transitions (5x in the first epoch)
        n_updates = args.epoch_length * (args.first_epoch_multiplier if epoch == 1 else 1)
        sums, offline_count = {}, 0
        progress = Progress(f"epoch {epoch}: update", n_updates)
        for update in range(1, n_updates + 1):
            logs, n_offline = train_step(agents, replay, density_ratio, ratio_optimizer, args)
            offline_count += n_offline
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v
            progress(update)

        # LOG the epoch's means; a non-finite loss stops the run before it reaches a checkpoint
        means = {k: (v / n_updates).item() for k, v in sums.items()}
        if not all(math.isfinite(v) for v in means.values()):
            raise SystemExit(
                f"error: non-finite loss in epoch {epoch} ({means}); the last good state "
                f"({state_path}) is kept. Try lower learning rates, and --resume from it"
            )
        for k, v in means.items():
            writer.add_scalar(f"charts/{k}" if k.startswith("w_") else f"losses/{k}", v, step)
        offline_fraction = offline_count / (n_updates * args.batch_size)
        writer.add_scalar("charts/offline_fraction", offline_fraction, step)
        sps = args.epoch_length / (time.time() - epoch_start)
        writer.add_scalar("charts/SPS", sps, step)
        line = f"epoch {epoch}/{n_epochs} | qf {means['qf_loss']:.3f} | "
        line += f"actor {means['actor_loss']:.3f} | alpha {means['alpha']:.3f} | "
        line += f"offline fraction {offline_fraction:.2f}"
        if args.replay == "balanced":
            line += (
                f" | w online {means['w_online_mean']:.2f} offline {means['w_offline_mean']:.2f}"
            )
        print(f"{line} | {rate_text(sps)} SPS", flush=True)

        # EVALUATE, measure the Q-ensemble's discrimination (Figure 4b), SAVE the whole state
        if epoch % args.auroc_every == 0 or epoch == n_epochs:
            aurocs = q_discrimination(agents, replay, args.auroc_samples, analysis_rng)
            writer.add_scalar("charts/q_auroc_ensemble", aurocs[0], step)
            writer.add_scalar("charts/q_auroc_member0", aurocs[1], step)
        if epoch % args.eval_every == 0 or epoch == n_epochs:
            log_evaluation(step)
        if epoch % args.save_every == 0 or epoch == n_epochs:
            state = {"epoch": epoch, "run_name": run_name, "replay": replay.state_dict()}
            state["density_ratio"] = density_ratio.state_dict()
            state["density_ratio_optimizer"] = ratio_optimizer.state_dict()
            state["rng"] = rng_state()
            state["env"] = env_snapshot(env, obs, episode_return)
            state["analysis_rng"] = json.dumps(analysis_rng.bit_generator.state)
            state["wandb_id"] = tracking.id if tracking else None
            checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata}
            writer.flush()  # the logs up to this state are on disk before the state is
            save_checkpoint(state_path, {**checkpoint, **agents.state_dict(), **state})
    writer.close()
    if tracking:
        tracking.finish()
    print(f"Wrote {state_path}")
