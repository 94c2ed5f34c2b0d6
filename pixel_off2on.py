"""Off2On on pixels: CQL pretraining, then fine-tuning with balanced replay and the Q-ensemble.

Lee, Seo, Lee, Abbeel, Shin, "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021, https://arxiv.org/abs/2107.00591 (section 6.2, appendix D.2).

    python pixel_off2on.py --task pick-place --ensemble-size 5

The paper's pixel benchmark: sparse-reward tabletop manipulation seen by a 48x48 RGB camera, the
tasks of COG (https://github.com/avisingh599/cog) rebuilt in MuJoCo in pixel_envs.py, the one file
of ours this script imports. Both phases of the method run here:
1. offline, unless `--checkpoint` or `checkpoints/cql__{task}__n{N}__seed{seed}.pt` exists: N CQL
   agents trained on the task's offline dataset, as cql_pretrain.py trains them on states;
2. online: the N agents fine-tuned as one with balanced replay and the pessimistic Q-ensemble, as
   off2on_finetune.py does after the authors' code (https://github.com/shlee94/Off2OnRL).
What differs from those two scripts: a convolutional encoder in front of every MLP, a replay that
stores each frame once, and an "epoch" of one episode.
Docs: docs/pixels.md; the method: docs/algorithm.md.

Shared word for word with other scripts (tests/test_shared_blocks.py checks every copy):
    layers [cql_pretrain off2on_finetune fqe_baseline vae_shift_probe]: VectorizedLinear
        vectorized_mlp LOG_STD_MIN
    policy [cql_pretrain off2on_finetune fqe_baseline vae_shift_probe]: tanh_gaussian_log_prob
        tanh_gaussian_sample
    merged policy [cql_pretrain off2on_finetune vae_shift_probe]: ensemble_gaussian
    CQL term [cql_pretrain off2on_finetune]: cql_proposals cql_gap
    balanced replay [off2on_finetune]: SumTree density_ratio_loss priority
    checkpoints [cql_pretrain off2on_finetune fqe_baseline vae_shift_probe awac_finetune
        bcq_finetune]: CHECKPOINT_FORMAT CheckpointError load_checkpoint check_checkpoint_matches
    saving [cql_pretrain off2on_finetune fqe_baseline awac_finetune bcq_finetune]: save_checkpoint
        rng_state restore_rng_state
    resuming [cql_pretrain off2on_finetune awac_finetune bcq_finetune]: check_same_settings
    members [off2on_finetune]: parse_members
    progress [cql_pretrain off2on_finetune awac_finetune bcq_finetune fqe_baseline vae_shift_probe]:
        rate_text Progress
    tracking [cql_pretrain off2on_finetune awac_finetune bcq_finetune fqe_baseline vae_shift_probe]:
        start_tracking
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import pixel_envs


@dataclass
class Args:
    task: Literal["pick-place", "grasp-closed-drawer", "grasp-blocked-drawer"] = "pick-place"
    """the manipulation task (pixel_envs.py)"""
    dataset_size: int = 200_000
    """offline transitions: half scripted attempts, half uniform-random rollouts (paper: 100k
    random)"""
    dataset_workers: int = 1
    """processes that generate the dataset (the data do not depend on it)"""
    checkpoint: str | None = None
    """pretrained CQL ensemble [default: checkpoints/cql__{task}__n{N}__seed{seed}.pt, else
    ...__n5__...; if neither exists, it is pretrained here (`--offline-steps`)]"""
    ensemble_size: int = 5
    """number of agents N (the paper's pixel value was lost from its text: docs/pixels.md)"""
    members: str | None = None
    """which members of the checkpoint to fine-tune, e.g. `0,1,2` [default: the first N]"""
    seed: int = 1
    """seed of the run"""
    offline_steps: int = 500_000
    """CQL pretraining gradient steps (used only when no checkpoint exists)"""
    bc_steps: int = 40_000
    """CQL pretraining: initial steps in which the actor does behaviour cloning"""
    online_episodes: int = 1_000
    """online episodes of fine-tuning"""
    first_epoch_multiplier: int = 5
    """the first episode is followed by this many times its length in gradient steps"""
    batch_size: int = 256
    """RL minibatch size (and the density-ratio net's online and offline batch sizes)"""
    replay: Literal["balanced", "uniform", "online-only"] = "balanced"
    """balanced: prioritized by the density ratio; uniform: over offline and online; online-only"""
    temperature: float = 5.0
    """T: priorities are w^(1/T) (the paper's pixel value was lost: docs/pixels.md)"""
    init_online_fraction: float = 0.75
    """f: share of online samples wanted in the RL batches after the first episode"""
    finetune_loss: Literal["sac", "cql"] = "sac"
    """sac: plain SAC critics online; cql: keep the CQL regularizer (with `--replay online-only`:
    COG's CQL-online baseline)"""
    hidden_sizes: tuple[int, ...] = (1024, 512, 256)
    """MLP hidden sizes of actor and critics after the conv encoder"""
    policy_lr: float = 1e-4
    """actor learning rate, both phases (COG's default; the paper's was lost: docs/pixels.md)"""
    q_lr: float = 3e-4
    """critic learning rate, both phases (COG's default)"""
    alpha_lr: float = 1e-4
    """entropy temperature learning rate (alpha restarts at 1 online)"""
    density_ratio_lr: float = 3e-4
    """density-ratio net learning rate"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network soft-update rate"""
    cql_alpha: float = 5.0
    """weight of the CQL regularizer (eq. 3)"""
    cql_n_actions: int = 10
    """M: sampled actions of each kind in the CQL logsumexp"""
    eval_every: int = 10
    """episodes between evaluations"""
    eval_episodes: int = 10
    """deterministic evaluation episodes"""
    save_every: int = 50
    """episodes between checkpoints of the whole fine-tuning state"""
    resume: bool = False
    """continue the fine-tuning run saved in checkpoints/{exp_name}__{task}__n{N}__seed{seed}.pt"""
    cuda: bool = torch.cuda.is_available()
    """use CUDA"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    exp_name: str = "pixel_off2on"
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
# Data: every frame stored once, transitions as frame indices (docs/pixels.md, "Networks and
# replay")
# ---------------------------------------------------------------------------------------------
class DatasetError(ValueError):
    """A dataset that can't be made or read; the message says what to do."""


@dataclass
class FrameData:
    frames: np.ndarray  # [F, 3, 48, 48] uint8: each episode's T + 1 frames, episode after episode
    obs_index: np.ndarray  # [M] int64: transition j goes from frames[obs_index[j]] to the next
    actions: np.ndarray  # [M, 4] float32 in [-1, 1]
    rewards: np.ndarray  # [M] float32
    terminations: np.ndarray  # [M] float32: 1 on success (the episode ends), never on time limits
    dataset_id: str

    def __len__(self):
        return len(self.rewards)


def episodes_to_frames(episodes) -> dict:
    """Minari episodes (T + 1 frames, T actions) -> one frame array and transitions that index
    it. An episode's frames are contiguous, so s' of a transition is the frame after its s."""
    frames, offset = [], 0
    parts = {"obs_index": [], "actions": [], "rewards": [], "terminations": []}
    for ep in episodes:
        T = len(ep.actions)
        frames.append(ep.observations)
        parts["obs_index"].append(offset + np.arange(T))
        parts["actions"].append(ep.actions)
        parts["rewards"].append(ep.rewards)
        parts["terminations"].append(ep.terminations)
        offset += T + 1
    dtypes = {"obs_index": np.int64, "actions": np.float32}
    dtypes |= {"rewards": np.float32, "terminations": np.float32}
    out = {k: np.concatenate(parts[k]).astype(dtype) for k, dtype in dtypes.items()}
    return {"frames": np.concatenate(frames).astype(np.uint8), **out}


def load_pixel_data(task: str, size: int, workers: int = 1) -> FrameData:
    """The task's offline dataset, generated first if it is not local (seed 0: one dataset per
    task and size, whatever the run's seed)."""
    import minari

    try:
        dataset_id = pixel_envs.generate_dataset(task, size, seed=0, workers=workers)
        dataset = minari.load_dataset(dataset_id)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    data = episodes_to_frames(dataset.iterate_episodes())
    shape = data["frames"].shape[1:]
    if shape != (3, pixel_envs.IMAGE_SIZE, pixel_envs.IMAGE_SIZE):
        raise DatasetError(
            f"{dataset_id} holds frames of shape {shape}, expected (3, 48, 48): delete it with "
            f"`minari delete {dataset_id}` and rerun"
        )
    return FrameData(**data, dataset_id=dataset_id)


# ---------------------------------------------------------------------------------------------
# Networks: a conv encoder in front of every MLP; every layer holds the weights of all N members
# (docs/algorithm.md, "Vectorized ensembles")
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


ENCODER_FEATURES = 16 * 8 * 8  # 48 -conv-> 46 -pool-> 23 -conv-> 21 -pool-> 10 -conv-> 8


class VectorizedEncoder(nn.Module):
    """N conv encoders in one: three 3x3 convolutions of 16 channels, ReLU, 2x2 max-pooling after
    the first two. Grouped convolutions (groups = N) keep the members apart: member i owns input
    channels 3i..3i+2 and output channels 16i..16i+15.
    frames [N, B, 3, 48, 48] uint8 -> features [N, B, 1024]."""

    def __init__(self, ensemble_size: int, channels: int = 16):
        super().__init__()
        N, c = ensemble_size, channels
        self.convs = nn.ModuleList(
            [nn.Conv2d(3 * N, c * N, 3, groups=N)]
            + [nn.Conv2d(c * N, c * N, 3, groups=N) for _ in range(2)]
        )

    def forward(self, frames):
        N, B = frames.shape[:2]
        x = frames.transpose(0, 1).reshape(B, N * 3, *frames.shape[-2:])  # members side by side
        x = x.to(self.convs[0].weight.dtype) / 255  # [B, 3N, 48, 48] in [0, 1]
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i < 2:
                x = F.max_pool2d(x, 2)
        return x.reshape(B, N, -1).transpose(0, 1)  # [N, B, 1024]


class Critic(nn.Module):
    """The two critics of each of N agents as 2N members (member 2i + k is critic k of agent i),
    each an encoder whose features are concatenated with the action, then an MLP:
    frames [N, B, 3, 48, 48], actions [N, B, A] -> Q [N, 2, B]."""

    def __init__(self, action_dim: int, hidden_sizes, ensemble_size: int):
        super().__init__()
        self.ensemble_size = ensemble_size
        self.encoder = VectorizedEncoder(2 * ensemble_size)
        in_dim = ENCODER_FEATURES + action_dim
        self.net = vectorized_mlp(in_dim, hidden_sizes, 1, 2 * ensemble_size)

    def features(self, frames):
        """[N, B, 3, 48, 48] -> [2N, B, 1024]: split from head() so that a frame is encoded once
        for all the actions it is scored with."""
        return self.encoder(frames.repeat_interleave(2, dim=0))

    def head(self, features, actions):
        """features [2N, B', 1024], actions [N, B', A] -> Q [N, 2, B']."""
        x = torch.cat([features, actions.repeat_interleave(2, dim=0)], -1)
        return self.net(x).view(self.ensemble_size, 2, -1)

    def forward(self, frames, actions):
        return self.head(self.features(frames), actions)


class Actor(nn.Module):
    """N tanh-Gaussian policies: frames [N, B, 3, 48, 48] -> mean, log_std [N, B, A] of the
    pre-tanh Gaussian. The last layer is the mean head and the log-std head side by side."""

    def __init__(self, action_dim: int, hidden_sizes, ensemble_size: int):
        super().__init__()
        self.encoder = VectorizedEncoder(ensemble_size)
        self.net = vectorized_mlp(ENCODER_FEATURES, hidden_sizes, 2 * action_dim, ensemble_size)

    def forward(self, frames):
        mean, log_std = self.net(self.encoder(frames)).chunk(2, dim=-1)
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


# ---------------------------------------------------------------------------------------------
# Losses: the CQL term (eq. 3), the N CQL agents of the offline phase, and the pessimistic
# Q-ensemble of the online phase (section 4.2: SAC losses, eqs. 1 and 2, through eq. 5)
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


def q_data_and_proposals(qf: Critic, frames, actions, proposals):
    """Q at s of the data action and of the 3M proposals: each frame encoded once, its features
    shared by its 1 + 3M actions. -> [N, 2, 1 + 3M, B]."""
    N, K, B, A = proposals.shape
    features = qf.features(frames)  # [2N, B, 1024]
    all_actions = torch.cat([actions[:, None], proposals], 1).reshape(N, -1, A)
    all_features = features[:, None].expand(-1, K + 1, -1, -1).reshape(2 * N, (K + 1) * B, -1)
    return qf.head(all_features, all_actions).view(N, 2, K + 1, B)


def cql_gap(q, log_density):
    """The CQL(H) regularizer of eq. 3 for each agent and critic,
    E_s[ log sum_j exp(Q(s, a_j) - log density(a_j)) - Q(s, a_data) ]:
    q [N, 2, 1 + 3M, B] from q_data_and_proposals -> [N, 2]."""
    logsumexp = torch.logsumexp(q[:, :, 1:] - log_density[:, None], dim=2)  # [N, 2, B]
    return (logsumexp - q[:, :, 0]).mean(-1)


OPTIMIZERS = ("actor_optimizer", "qf_optimizer", "alpha_optimizer")


class SACEnsemble:
    """What the agents of both phases hold: N actors, 2N critics and their targets, the
    temperature log_alpha (one per agent offline, one for the ensemble online) and three Adam
    optimizers; how a gradient step applies the losses; and what a checkpoint keeps of them."""

    def __init__(
        self, action_dim, hidden_sizes, ensemble_size, alpha_shape, gamma, tau, policy_lr, q_lr,
        alpha_lr, device,
    ):  # fmt: skip
        self.action_dim, self.ensemble_size = action_dim, ensemble_size
        self.gamma, self.tau, self.target_entropy = gamma, tau, -float(action_dim)
        self.actor = Actor(action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf = Critic(action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target = Critic(action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.log_alpha = torch.zeros(alpha_shape, device=device, requires_grad=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=policy_lr)
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=q_lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=alpha_lr)

    def step_critics(self, qf_loss):
        self.qf_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.qf_optimizer.step()

    def step_actors_and_targets(self, actor_loss, alpha_loss):
        """Against the critics step_critics has just updated; then the targets follow them."""
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.alpha_optimizer.zero_grad(set_to_none=True)
        (actor_loss + alpha_loss).backward()  # disjoint parameters: one backward for both
        self.actor_optimizer.step()
        self.alpha_optimizer.step()
        with torch.no_grad():
            targets, params = list(self.qf_target.parameters()), list(self.qf.parameters())
            torch._foreach_lerp_(targets, params, self.tau)

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
            if name in state:
                getattr(self, name).load_state_dict(state[name])


class CQLEnsemble(SACEnsemble):
    """The offline phase: N CQL agents trained side by side, each on its own minibatches, with
    the deterministic backup of CQL's code. Every loss is summed over members, so each member's
    gradient (and, Adam being elementwise, each member's update) is exactly its own."""

    def __init__(
        self, action_dim, hidden_sizes, ensemble_size, cql_alpha=5.0, cql_n_actions=10,
        gamma=0.99, tau=0.005, policy_lr=1e-4, q_lr=3e-4, alpha_lr=1e-4, device="cpu",
    ):  # fmt: skip
        super().__init__(
            action_dim, hidden_sizes, ensemble_size, ensemble_size, gamma, tau, policy_lr, q_lr,
            alpha_lr, device,
        )  # fmt: skip
        self.cql_alpha, self.cql_n_actions = cql_alpha, cql_n_actions

    def draw_noise(self, batch_size: int) -> dict:
        """All randomness of one update: an update is a function of (weights, batch, noise)."""
        N, M, B, A = self.ensemble_size, self.cql_n_actions, batch_size, self.action_dim
        dev = self.log_alpha.device
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
            next_actions, _ = tanh_gaussian_sample(next_mean, next_log_std, noise["target"])
            next_q = self.qf_target(next_obs, next_actions).min(1).values  # [N, B]
            target = rewards + self.gamma * (1 - terminations) * next_q
            proposals, log_density = cql_proposals(mean, log_std, next_mean, next_log_std, noise)
        q = q_data_and_proposals(self.qf, obs, actions, proposals)
        q_data = q[:, :, 0]  # [N, 2, B]
        bellman_loss = ((q_data - target[:, None]) ** 2).mean(-1)  # [N, 2]
        cql_loss = cql_gap(q, log_density)  # [N, 2]
        loss = (bellman_loss + self.cql_alpha * cql_loss).sum()
        logs = {"qf_loss": bellman_loss.mean(), "cql_loss": cql_loss.mean()}
        return loss, {**logs, "q_data": q_data.mean()}

    def actor_loss(self, obs, actions, mean, log_std, noise, behaviour_cloning: bool):
        """E[alpha log pi(a|s) - min_k Q_k(s, a)] (eq. 2), or for the first bc_steps
        E[alpha log pi(a|s) - log pi(a_data|s)]; plus the temperature loss. Summed over members."""
        pi_actions, log_pi = tanh_gaussian_sample(mean, log_std, noise["actor"])
        if behaviour_cloning:
            data_u = torch.atanh(actions.clamp(-1 + 1e-6, 1 - 1e-6))
            objective = tanh_gaussian_log_prob(mean, log_std, data_u)
        else:
            objective = self.qf(obs, pi_actions).min(1).values
        alpha = self.log_alpha.exp()[:, None].detach()
        actor_loss = (alpha * log_pi - objective).mean(-1).sum()
        entropy_gap = log_pi.detach() + self.target_entropy
        alpha_loss = -(self.log_alpha[:, None] * entropy_gap).mean(-1).sum()
        logs = {"actor_loss": actor_loss / self.ensemble_size, "alpha": alpha.mean()}
        return actor_loss, alpha_loss, {**logs, "entropy": -log_pi.mean()}

    def update(self, batch, behaviour_cloning=False, noise=None) -> dict:
        """One gradient step of every agent: the critics, then the actors and temperatures against
        the updated critics, then the targets. batch: (frames, actions, rewards, next_frames,
        terminations), each [N, B, ...]."""
        obs, actions, rewards, next_obs, terminations = batch
        noise = self.draw_noise(obs.shape[1]) if noise is None else noise
        mean, log_std = self.actor(obs)
        pi = (mean.detach(), log_std.detach())
        qf_loss, logs = self.critic_loss(obs, actions, rewards, next_obs, terminations, *pi, noise)
        self.step_critics(qf_loss)

        self.qf.requires_grad_(False)  # the actor loss only trains the actors
        actor_loss, alpha_loss, actor_logs = self.actor_loss(
            obs, actions, mean, log_std, noise, behaviour_cloning
        )
        self.qf.requires_grad_(True)
        self.step_actors_and_targets(actor_loss, alpha_loss)
        return {k: v.detach() for k, v in {**logs, **actor_logs}.items()}


def members_view(x, N: int):
    """One batch [B, ...] seen by all N members: [N, B, ...], without a copy."""
    return x.expand(N, *x.shape)


def select_members(state: dict, members: list[int], n_members: int) -> dict:
    """The rows of `members` in a vectorized network's state dict: row m of every linear weight
    and bias, and output channels c m .. c m + c - 1 of every conv (c channels a member)."""
    selected = {}
    for k, v in state.items():
        if k.startswith("encoder."):  # conv weights [n_members c, in, 3, 3], biases [n_members c]
            c = v.shape[0] // n_members
            selected[k] = v[[m * c + j for m in members for j in range(c)]]
        else:  # linear weights [n_members, in, out] and biases [n_members, 1, out]
            selected[k] = v[members]
    return selected


class Off2OnEnsemble(SACEnsemble):
    """The online phase: N pretrained agents fine-tuned as one. The merged policy pi_E acts and
    is trained through mean_i min_k Q_ik; member i's critics regress on their own target y_i,
    with one a' ~ pi_E(.|s') shared by all. One temperature alpha, restarted at 1."""

    def __init__(
        self, action_dim, hidden_sizes, ensemble_size, gamma=0.99, tau=0.005, policy_lr=1e-4,
        q_lr=3e-4, alpha_lr=1e-4, finetune_loss="sac", cql_alpha=5.0, cql_n_actions=10,
        device="cpu",
    ):  # fmt: skip
        super().__init__(
            action_dim, hidden_sizes, ensemble_size, (), gamma, tau, policy_lr, q_lr, alpha_lr,
            device,
        )  # fmt: skip
        self.finetune_loss, self.cql_alpha = finetune_loss, cql_alpha
        self.cql_n_actions = cql_n_actions

    def load_pretrained(self, checkpoint: dict, members: list[int]):
        """Take the chosen members' actors and critics from a pretrained checkpoint; alpha and
        the optimizers start fresh. Agent i is critics 2i and 2i + 1."""
        critic_members = [2 * i + k for i in members for k in (0, 1)]
        n = checkpoint["metadata"]["ensemble_size"]
        self.actor.load_state_dict(select_members(checkpoint["actor"], members, n))
        self.qf.load_state_dict(select_members(checkpoint["qf"], critic_members, 2 * n))
        target = select_members(checkpoint["qf_target"], critic_members, 2 * n)
        self.qf_target.load_state_dict(target)

    def policy(self, frames):
        """pi_E(.|s): frames [B, 3, 48, 48] -> mean, log_std [B, A] of the merged pre-tanh
        Gaussian."""
        return ensemble_gaussian(*self.actor(members_view(frames, self.ensemble_size)))

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
        obs, actions, next_obs = (members_view(x, N) for x in (obs, actions, next_obs))
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_members = self.actor(next_obs)
            merged = ensemble_gaussian(*next_members)
            next_actions, next_log_pi = tanh_gaussian_sample(*merged, noise["target"])
            next_q = self.qf_target(next_obs, members_view(next_actions, N)).min(1).values
            target = rewards + self.gamma * (1 - terminations) * (next_q - alpha * next_log_pi)
            if self.finetune_loss == "cql":  # proposals from each member's own policy
                proposals, log_density = cql_proposals(*self.actor(obs), *next_members, noise)
        if self.finetune_loss == "cql":
            q = q_data_and_proposals(self.qf, obs, actions, proposals)
            q_data = q[:, :, 0]
        else:
            q_data = self.qf(obs, actions)  # [N, 2, B]
        bellman_loss = ((q_data - target[:, None]) ** 2).mean(-1)  # [N, 2]
        loss, logs = bellman_loss, {"qf_loss": bellman_loss.mean(), "q_data": q_data.mean()}
        if self.finetune_loss == "cql":
            cql_loss = cql_gap(q, log_density)  # [N, 2]
            loss, logs["cql_loss"] = bellman_loss + self.cql_alpha * cql_loss, cql_loss.mean()
        return loss.sum(), logs

    def actor_loss(self, obs, noise):
        """E[alpha log pi_E(a|s) - mean_i min_k Q_ik(s, a)], a ~ pi_E(.|s) (eqs. 2, 5), and the
        temperature loss."""
        N = self.ensemble_size
        actions, log_pi = tanh_gaussian_sample(*self.policy(obs), noise["actor"])
        self.qf.requires_grad_(False)  # the actor loss only trains the actors
        q = self.qf(members_view(obs, N), members_view(actions, N)).min(1).values.mean(0)
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
        self.step_critics(qf_loss)
        actor_loss, alpha_loss, actor_logs = self.actor_loss(batch[0], noise)
        self.step_actors_and_targets(actor_loss, alpha_loss)
        return {k: v.detach() for k, v in {**logs, **actor_logs}.items()}


# ---------------------------------------------------------------------------------------------
# Balanced replay (section 4.1): a sum tree of priorities, the density ratio (eq. 4), the
# priority (eq. 6), and one buffer for offline and online transitions that stores frames once
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
    """w_psi(s, a) >= 0, trained so that w -> d_online(s, a) / d_offline(s, a) (eq. 4): a conv
    encoder, its features concatenated with the action, an MLP (256, 128). Softplus output: a
    ReLU output stuck at 0 has no gradient to leave it (docs/algorithm.md, "Where this differs
    from the paper"). The last bias starts at log(e - 1), so that w starts at 1."""

    def __init__(self, action_dim: int, hidden_sizes=(256, 128)):
        super().__init__()
        self.encoder = VectorizedEncoder(1)
        sizes, layers = [ENCODER_FEATURES + action_dim, *hidden_sizes], []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 1))
        nn.init.constant_(self.net[-1].bias, math.log(math.e - 1))

    def forward(self, frames, actions):
        features = self.encoder(frames[None])[0]  # an ensemble of one
        return F.softplus(self.net(torch.cat([features, actions], -1))).squeeze(-1)


def density_ratio_loss(w_online, w_offline):
    """The Jensen-Shannon bound of eq. 4; its minimizer is w = d_online / d_offline."""
    offline_term = -torch.log(2 / (w_offline + 1) + 1e-10).mean()
    return offline_term - torch.log(2 * w_online / (w_online + 1) + 1e-10).mean()


def priority(w, w_offline, temperature: float):
    """Self-normalized priority (eq. 6): w^(1/T) / mean over the offline batch of w^(1/T),
    clamped to [1e-3, 1e3]."""
    normalizer = (w_offline ** (1 / temperature)).mean() + 1e-10
    return (w ** (1 / temperature) / normalizer).clamp(1e-3, 1e3)


class PixelReplay:
    """Every offline and every online transition in one buffer on the training device, sampled
    (balanced) in proportion to its priority, (uniform) uniformly, or (online-only) uniformly
    from the online part. Frames are stored once (uint8): transition j is (frames[obs_index[j]],
    actions[j], rewards[j], frames[obs_index[j] + 1], terminations[j]), since an episode's frames
    are contiguous. Online transitions are never evicted."""

    def __init__(
        self, data: FrameData, online_capacity: int, online_episodes: int, mode="balanced",
        init_online_fraction=0.75, epoch_length=40, seed=0, device="cpu",
    ):  # fmt: skip
        self.mode, self.device = mode, device
        self.n_offline, self.n_online = len(data), 0
        self.n_offline_frames = self.n_frames = len(data.frames)
        capacity = len(data.frames) + online_capacity + online_episodes  # T + 1 frames an episode
        shape = data.frames.shape[1:]
        self.frames = torch.zeros(capacity, *shape, dtype=torch.uint8, device=device)
        self.frames[: self.n_frames] = torch.as_tensor(data.frames).to(device)
        size = self.n_offline + online_capacity
        self.transitions = {}
        for name in ("obs_index", "actions", "rewards", "terminations"):
            offline = torch.as_tensor(getattr(data, name))
            shape, dtype = offline.shape[1:], offline.dtype
            self.transitions[name] = torch.zeros(size, *shape, dtype=dtype, device=device)
            self.transitions[name][: self.n_offline] = offline.to(device)
        self.rng = np.random.default_rng(seed)
        if mode == "balanced":
            self.tree = SumTree(size)
            self.tree.update(np.arange(self.n_offline), np.ones(self.n_offline))
            # P_new: an episode of new samples makes up a fraction f of the next batches
            f = init_online_fraction
            self.new_priority = self.n_offline * f / ((1 - f) * epoch_length)
            self.max_priority = self.new_priority

    def start_episode(self, frame):
        """The first frame of an online episode."""
        self.frames[self.n_frames] = torch.as_tensor(frame)
        self.n_frames += 1

    def add(self, action, reward, next_frame, terminated):
        """The transition from the last stored frame to next_frame."""
        i = self.n_offline + self.n_online
        self.transitions["obs_index"][i] = self.n_frames - 1
        self.transitions["actions"][i] = torch.as_tensor(action, dtype=torch.float32)
        self.transitions["rewards"][i] = float(reward)
        self.transitions["terminations"][i] = float(terminated)
        self.frames[self.n_frames] = torch.as_tensor(next_frame)
        self.n_frames += 1
        self.n_online += 1
        if self.mode == "balanced":
            self.tree.update([i], [self.max_priority])

    def sample_indices(self, batch_size: int):
        if self.mode == "balanced":
            return self.tree.sample(batch_size, self.rng)
        low = self.n_offline if self.mode == "online-only" else 0
        return self.rng.integers(low, self.n_offline + self.n_online, batch_size)

    def density_ratio_indices(self, batch_size: int):
        """Online: uniform over all online transitions (at most 80k: no recent-only window);
        offline: uniform over the offline data."""
        online = self.n_offline + self.rng.integers(0, self.n_online, batch_size)
        return online, self.rng.integers(0, self.n_offline, batch_size)

    def get(self, idx):
        """(frames, actions, rewards, next_frames, terminations) of transitions idx."""
        idx = torch.as_tensor(idx, device=self.device)
        t = self.transitions
        frame = t["obs_index"][idx]
        frames, next_frames = self.frames[frame], self.frames[frame + 1]
        return [frames, t["actions"][idx], t["rewards"][idx], next_frames, t["terminations"][idx]]

    def update_priorities(self, idx, priorities):
        if not np.isfinite(priorities).all():
            bad = priorities[~np.isfinite(priorities)][:5]
            raise ValueError(f"non-finite priorities {bad}: the density-ratio net diverged")
        self.tree.update(idx, priorities)
        self.max_priority = max(self.max_priority, float(priorities.max()))

    def state_dict(self) -> dict:
        end = self.n_offline + self.n_online
        state = {name: v[self.n_offline : end].cpu() for name, v in self.transitions.items()}
        state["frames"] = self.frames[self.n_offline_frames : self.n_frames].cpu()
        state["rng"] = json.dumps(self.rng.bit_generator.state)
        if self.mode == "balanced":
            state["priorities"] = torch.as_tensor(self.tree.get(np.arange(end)))
            state["max_priority"] = self.max_priority
        return state

    def load_state_dict(self, state: dict):
        self.n_online = len(state["rewards"])
        self.n_frames = self.n_offline_frames + len(state["frames"])
        online = slice(self.n_offline, self.n_offline + self.n_online)
        for name in self.transitions:
            self.transitions[name][online] = state[name].to(self.device)
        self.frames[self.n_offline_frames : self.n_frames] = state["frames"].to(self.device)
        self.rng.bit_generator.state = json.loads(state["rng"])
        if self.mode == "balanced":
            self.tree.update(np.arange(len(state["priorities"])), state["priorities"].numpy())
            self.max_priority = state["max_priority"]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agents: Off2OnEnsemble, envs: list, seed: int, device) -> np.ndarray:
    """Success (reward 1 at some step) of the deterministic merged policy, tanh of its mean: one
    episode per env, all in lockstep."""
    obs = np.stack([env.reset(seed=seed + j)[0] for j, env in enumerate(envs)])
    success, active = np.zeros(len(envs)), np.ones(len(envs), bool)
    while active.any():
        mean, _ = agents.policy(torch.as_tensor(obs, device=device))
        actions = torch.tanh(mean).cpu().numpy()
        for j in np.flatnonzero(active):
            obs[j], reward, terminated, truncated, _ = envs[j].step(actions[j])
            success[j] = max(success[j], reward > 0)
            active[j] = not (terminated or truncated)
    return success


class VideoRecorder(gym.Wrapper):
    """An evaluation env that keeps, for the episodes it is told to record (`start`), the agent's
    48x48 frames and the same scene at 256x256 (render_mode="rgb_array"), and writes both as mp4s
    and to TensorBoard (`save`)."""

    def __init__(self, env: gym.Env, folder: str):
        super().__init__(env)
        self.folder, self.frames = folder, None

    def keep(self, obs):
        if self.frames is not None:
            self.frames.append((obs.transpose(1, 2, 0), self.env.render()))

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.keep(obs)
        return obs, info

    def step(self, action):
        result = self.env.step(action)
        self.keep(result[0])
        return result

    def start(self):
        self.frames = []

    def save(self, writer, step: int) -> list[str]:
        """{folder}/step{step}_48.mp4 and _256.mp4; TensorBoard tags eval/video_agent_view (48)
        and eval/video (256)."""
        import imageio

        os.makedirs(self.folder, exist_ok=True)
        fps, paths = self.env.metadata["render_fps"], []
        for k, tag in enumerate(("eval/video_agent_view", "eval/video")):
            frames = np.stack([pair[k] for pair in self.frames])
            paths.append(os.path.join(self.folder, f"step{step}_{frames.shape[1]}.mp4"))
            imageio.mimwrite(paths[-1], frames, fps=fps, macro_block_size=1)
            writer.add_video(tag, torch.as_tensor(frames).permute(0, 3, 1, 2)[None], step, fps=fps)
        self.frames = None
        return paths


# ---------------------------------------------------------------------------------------------
# Checkpoints, the offline phase, arguments
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


def check_same_settings(saved: dict, current: dict, path: str, ignore=()):
    """Resuming under other algorithm settings would silently mix two runs: fail, naming them."""
    differing = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if differing := {k: v for k, v in differing.items() if k not in ignore}:
        raise CheckpointError(
            f"{path} was made with other settings (saved, now): {differing}; "
            "resume with the same ones, or start a new run"
        )


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


def run_metadata(args: Args, data: FrameData, critic_source: str) -> dict:
    """What a checkpoint says about itself (docs/pixels.md, "Networks and replay")."""
    return {
        "obs_shape": list(data.frames.shape[1:]),
        "action_dim": data.actions.shape[1],
        "hidden_sizes": list(args.hidden_sizes),
        "ensemble_size": args.ensemble_size,
        "dataset_id": data.dataset_id,
        "env_id": pixel_envs.TASKS[args.task],
        "critic_source": critic_source,
        "args": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()},
    }


def pretrain_cql(args: Args, data: FrameData, path: str, device):
    """The offline phase, when no pretrained ensemble exists: N CQL agents on pixels, each on its
    own minibatches, as cql_pretrain.py trains them on states. Progress is saved to
    `path`.partial every 1,000 steps, and a rerun continues from it; at the end it becomes
    `path`."""
    N, action_dim = args.ensemble_size, data.actions.shape[1]
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    agents = CQLEnsemble(
        action_dim, args.hidden_sizes, N, args.cql_alpha, args.cql_n_actions, args.gamma, args.tau,
        args.policy_lr, args.q_lr, args.alpha_lr, device,
    )  # fmt: skip
    metadata = run_metadata(args, data, critic_source="cql")
    partial, start = f"{path}.partial", 0
    if os.path.exists(partial):
        checkpoint = load_checkpoint(partial)
        keys = ("dataset_id", "obs_shape", "action_dim", "hidden_sizes", "ensemble_size")
        check_checkpoint_matches(checkpoint["metadata"], {k: metadata[k] for k in keys}, partial)
        agents.load_state_dict(checkpoint)
        start = checkpoint["global_step"]
        restore_rng_state(checkpoint["rng"])
    print(
        f"No pretrained ensemble found: pretraining {N} CQL agents on pixels for "
        f"{args.offline_steps:,} steps (from step {start:,}) into {path}",
        flush=True,
    )
    frames = torch.as_tensor(data.frames, device=device)
    dataset = (data.obs_index, data.actions, data.rewards, data.terminations)
    obs_index, actions, rewards, terminations = (torch.as_tensor(x, device=device) for x in dataset)
    start_time, progress = time.time(), Progress("CQL step", args.offline_steps, start)
    for step in range(start + 1, args.offline_steps + 1):
        # TRAIN: each agent its own minibatch, one gradient step of all N
        idx = torch.randint(len(data), (N, args.batch_size), device=device)
        frame = obs_index[idx]
        batch = [frames[frame], actions[idx], rewards[idx], frames[frame + 1], terminations[idx]]
        logs = agents.update(batch, behaviour_cloning=step <= args.bc_steps)

        # LOG every 100 steps, and stop on a non-finite loss before it reaches a checkpoint
        last = step == args.offline_steps
        if step % 100 == 0 or last:
            logs = {k: v.item() for k, v in logs.items()}
            if not all(math.isfinite(v) for v in logs.values()):
                raise SystemExit(
                    f"error: non-finite CQL loss at step {step} ({logs}); progress so far is in "
                    f"{partial}. Try a lower --q-lr, --policy-lr or --cql-alpha"
                )
            rate = (step - start) / (time.time() - start_time)
            print(
                f"  CQL step {step:,}/{args.offline_steps:,} | qf {logs['qf_loss']:.4f} | "
                f"cql {logs['cql_loss']:.3f} | actor {logs['actor_loss']:.3f} | "
                f"Q {logs['q_data']:.3f} | {rate_text(rate)} steps/s",
                flush=True,
            )

        # SAVE the whole pretraining state every 1,000 steps, atomically
        if step % 1000 == 0 or last:
            state = {"global_step": step, "run_name": "inline", "rng": rng_state()}
            checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata}
            save_checkpoint(partial, {**checkpoint, **agents.state_dict(), **state})
        progress(step, printed=step % 100 == 0 or last)
    os.replace(partial, path)


# settings that may change when a run is resumed: they don't change what is computed
NOT_SETTINGS = ("resume", "cuda", "torch_deterministic", "online_episodes", "eval_every")
NOT_SETTINGS += ("eval_episodes", "save_every", "dataset_workers")
NOT_SETTINGS += ("track", "wandb_project_name", "wandb_entity", "capture_video")
NOT_SETTINGS += ("video_every",)


def validate_args(args: Args):
    counts = ("dataset_size", "dataset_workers", "ensemble_size", "offline_steps")
    counts += ("online_episodes", "first_epoch_multiplier", "batch_size", "cql_n_actions")
    for name in (*counts, "eval_every", "eval_episodes", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.init_online_fraction < 1:
        raise ValueError(
            f"--init-online-fraction must be in (0, 1), got {args.init_online_fraction}"
        )
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if not args.hidden_sizes or min(args.hidden_sizes) < 1:
        raise ValueError(f"--hidden-sizes must be positive integers, got {args.hidden_sizes}")


# ---------------------------------------------------------------------------------------------
# The online loop's two bodies: collecting an episode, and one training step
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_episode(env, act, replay, seed: int):
    """One episode from env.reset(seed=seed) with act(frame) -> action, each transition stored in
    the replay. Returns the episode's return and its number of steps."""
    obs, _ = env.reset(seed=seed)
    replay.start_episode(obs)
    episode_return, done, steps = 0.0, False, 0
    while not done:
        action = act(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        # a time limit is not an end of the task: only a termination stops the bootstrapping
        replay.add(action, reward, obs, terminated)
        episode_return, steps = episode_return + reward, steps + 1
        done = terminated or truncated
    return episode_return, steps


def train_step(agents, replay, density_ratio, ratio_optimizer, args: Args):
    """One gradient step of the online phase: an RL batch drawn by priority, (balanced replay) the
    density ratio's step and the batch's new priorities, then the ensemble's update. Returns the
    update's logs and how many of the batch's transitions are offline ones."""
    idx = replay.sample_indices(args.batch_size)
    batch = replay.get(idx)
    if replay.mode == "balanced":
        # DENSITY RATIO: w of the RL batch gives its new priorities (eq. 6, with w before this
        # step's update); w of an online and an offline batch, the loss (eq. 4)
        on_idx, off_idx = replay.density_ratio_indices(args.batch_size)
        on, off = replay.get(on_idx), replay.get(off_idx)
        frames, actions = (torch.cat([batch[k], on[k], off[k]]) for k in (0, 1))
        w_batch, w_online, w_offline = density_ratio(frames, actions).split(args.batch_size)
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


if __name__ == "__main__":
    args = tyro.cli(Args)
    N, seed = args.ensemble_size, args.seed
    state_path = f"checkpoints/{args.exp_name}__{args.task}__n{N}__seed{seed}.pt"  # for --resume
    try:
        validate_args(args)
        members = parse_members(args.members, N)
        if os.path.exists(state_path) and not args.resume:
            raise ValueError(
                f"{state_path} exists: pass --resume to continue that run, "
                "or --exp-name to start another"
            )
        data = load_pixel_data(args.task, args.dataset_size, args.dataset_workers)
    except ValueError as e:  # DatasetError included
        raise SystemExit(f"error: {e}")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    action_dim, episode_length = data.actions.shape[1], pixel_envs.EPISODE_LENGTH[args.task]
    metadata = run_metadata(args, data, critic_source="off2on")
    resume = args.resume and os.path.exists(state_path)
    try:
        if resume:
            state = load_checkpoint(state_path)
            saved = state["metadata"]["args"]
            check_same_settings(saved, metadata["args"], state_path, NOT_SETTINGS)
        else:  # the pretrained ensemble; if there is none, the offline phase makes it
            candidates = [f"checkpoints/cql__{args.task}__n{n}__seed{seed}.pt" for n in (N, 5)]
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
                pretrain_cql(args, data, path, device)
            pretrained = load_checkpoint(path)
            meta = pretrained["metadata"]
            keys = ("dataset_id", "obs_shape", "action_dim", "hidden_sizes")
            check_checkpoint_matches(meta, {k: metadata[k] for k in keys}, path)
            if max(members) >= meta["ensemble_size"]:
                raise CheckpointError(
                    f"checkpoint {path} has {meta['ensemble_size']} members, but this run asks "
                    f"for members {members}"
                )
            print(f"Fine-tuning members {members} of {path}")
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    torch.manual_seed(seed)  # the same fine-tuning whether the offline phase ran here or not
    np.random.seed(seed)
    agents = Off2OnEnsemble(
        action_dim, args.hidden_sizes, N, args.gamma, args.tau, args.policy_lr, args.q_lr,
        args.alpha_lr, args.finetune_loss, args.cql_alpha, args.cql_n_actions, device,
    )  # fmt: skip
    replay = PixelReplay(
        data, args.online_episodes * episode_length, args.online_episodes, args.replay,
        args.init_online_fraction, episode_length, seed, device,
    )  # fmt: skip
    density_ratio = DensityRatio(action_dim).to(device)
    ratio_optimizer = torch.optim.Adam(density_ratio.parameters(), lr=args.density_ratio_lr)
    start_episode, run_name = 0, f"{args.task}__{args.exp_name}__{seed}__{int(time.time())}"
    if resume:
        agents.load_state_dict(state)
        replay.load_state_dict(state["replay"])
        density_ratio.load_state_dict(state["density_ratio"])
        ratio_optimizer.load_state_dict(state["density_ratio_optimizer"])
        start_episode, run_name = state["episode"], state["run_name"]
        restore_rng_state(state["rng"])
        if start_episode >= args.online_episodes:  # leave its logs alone
            print(f"{state_path} is complete ({start_episode} episodes): nothing to resume")
            raise SystemExit(0)
        print(f"Resuming {state_path} after episode {start_episode}")
    else:
        agents.load_pretrained(pretrained, members)

    tracking = start_tracking(args, run_name, state.get("wandb_id") if resume else None)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    print(
        f"{data.dataset_id}: {len(data):,} offline transitions ({len(data.frames):,} frames); "
        f"replay {args.replay}, N={N}, {args.finetune_loss} loss, {device}; logs in runs/{run_name}"
    )
    eval_envs = [gym.make(pixel_envs.TASKS[args.task]) for _ in range(args.eval_episodes)]
    if args.capture_video:  # the first evaluation episode, also rendered at 256x256
        video_env = gym.make(pixel_envs.TASKS[args.task], render_mode="rgb_array")
        eval_envs[0] = VideoRecorder(video_env, f"videos/{run_name}")
    env = gym.make(pixel_envs.TASKS[args.task])

    def log_evaluation(episode):
        evaluation, last = episode // args.eval_every, episode == args.online_episodes
        if args.capture_video and (evaluation % args.video_every == 0 or last):
            eval_envs[0].start()
        success = evaluate(agents, eval_envs, seed + 10_000, device)
        if args.capture_video and eval_envs[0].frames is not None:
            print(f"videos: {', '.join(eval_envs[0].save(writer, replay.n_online))}")
        writer.add_scalar("eval/success_rate", success.mean(), replay.n_online)
        when = f"{episode} episodes ({replay.n_online:,} online steps)"
        print(f"eval after {when}: success rate {success.mean():.2f}", flush=True)

    if start_episode == 0:
        log_evaluation(0)  # the offline ensemble, before any online step

    def act(frame):  # a sample of the merged policy pi_E
        mean, log_std = agents.policy(torch.as_tensor(frame, device=device)[None])
        return tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))[0][0].cpu().numpy()

    for episode in range(start_episode + 1, args.online_episodes + 1):
        # COLLECT one episode with the merged policy (an "epoch" here: docs/pixels.md, "Schedule")
        episode_start = time.time()
        episode_return, steps = collect_episode(env, act, replay, seed + episode)
        writer.add_scalar("charts/episodic_return", episode_return, replay.n_online)

        # TRAIN: as many gradient steps as the episode had env steps (5x after the first)
        n_updates = steps * (args.first_epoch_multiplier if episode == 1 else 1)
        sums, offline_count = {}, 0
        progress = Progress(f"episode {episode}: update", n_updates)
        for update in range(1, n_updates + 1):
            logs, n_offline = train_step(agents, replay, density_ratio, ratio_optimizer, args)
            offline_count += n_offline
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v
            progress(update)

        # LOG the episode's means; a non-finite loss stops the run before it reaches a checkpoint
        means = {k: (v / n_updates).item() for k, v in sums.items()}
        if not all(math.isfinite(v) for v in means.values()):
            raise SystemExit(
                f"error: non-finite loss after episode {episode} ({means}); the last good state "
                f"({state_path}) is kept. Try lower learning rates, and --resume from it"
            )
        step, offline_fraction = replay.n_online, offline_count / (n_updates * args.batch_size)
        for k, v in means.items():
            writer.add_scalar(f"charts/{k}" if k.startswith("w_") else f"losses/{k}", v, step)
        writer.add_scalar("charts/offline_fraction", offline_fraction, step)
        sps = steps / (time.time() - episode_start)
        writer.add_scalar("charts/SPS", sps, step)
        line = f"episode {episode}/{args.online_episodes} | return {episode_return:.0f} | "
        line += f"qf {means['qf_loss']:.4f} | actor {means['actor_loss']:.3f} | "
        line += f"alpha {means['alpha']:.3f} | offline fraction {offline_fraction:.2f}"
        print(f"{line} | {rate_text(sps)} SPS", flush=True)

        # EVALUATE, and SAVE the whole fine-tuning state
        if episode % args.eval_every == 0 or episode == args.online_episodes:
            log_evaluation(episode)
        if episode % args.save_every == 0 or episode == args.online_episodes:
            state = {"episode": episode, "run_name": run_name, "replay": replay.state_dict()}
            state["density_ratio"] = density_ratio.state_dict()
            state["density_ratio_optimizer"] = ratio_optimizer.state_dict()
            state["rng"] = rng_state()
            state["wandb_id"] = tracking.id if tracking else None
            checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata}
            writer.flush()  # the logs up to this state are on disk before the state is
            save_checkpoint(state_path, {**checkpoint, **agents.state_dict(), **state})
    writer.close()
    if tracking:
        tracking.finish()
    print(f"Wrote {state_path}")
