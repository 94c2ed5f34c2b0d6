"""BCQ, and BCQ-ft: batch-constrained deep Q-learning trained offline on a dataset, then fine-tuned
online with the same updates.

Fujimoto, Meger, Precup, "Off-Policy Deep Reinforcement Learning without Exploration", ICML 2019,
https://arxiv.org/abs/1812.02900 (section 4, Algorithm 1); BCQ-ft is a baseline of Lee et al.,
"Offline-to-Online Reinforcement Learning via Balanced Replay and Pessimistic Q-Ensemble",
CoRL 2021 (appendix D).

    python bcq_finetune.py --env-id halfcheetah-medium-v2

Offline phase (BCQ, `--offline-steps` updates on the dataset): a conditional VAE G(s) models the
dataset's actions; a perturbation model xi(s, a) moves a VAE action by at most Phi; two critics
regress on a soft clipped double-Q target maximized over perturbed VAE actions; the policy is the
argmax of Q1 over perturbed VAE actions. Online phase (BCQ-ft): epochs of collecting with that
policy into the buffer that holds the dataset, then as many of the same updates ("we used
additional online samples for training", Lee et al., appendix D). Follows the implementation Lee et
al. used, https://github.com/rail-berkeley/d4rl_evaluations (bcq/continuous_bcq/BCQ.py,
bcq/scripts/run_script.py), for the networks, the losses and the defaults. Docs:
docs/bcq_finetune.md; the defaults and where this differs from that code are listed there.

Shared word for word with other scripts (tests/test_shared_blocks.py checks every copy):
    data [cql_pretrain off2on_finetune fqe_baseline vae_shift_probe awac_finetune]: D4RL_NAME
        GYM_IDS D4RL_REF_RETURNS RANDOM_DATASET_ID FIELDS DatasetError OfflineData make_env
        episodes_to_transitions load_d4rl_hdf5 load_minari_dataset load_offline_data scale_to_unit
        scale_to_env normalized_score
    checkpoints [cql_pretrain off2on_finetune fqe_baseline vae_shift_probe pixel_off2on
        awac_finetune]: CHECKPOINT_FORMAT CheckpointError load_checkpoint check_checkpoint_matches
    saving [cql_pretrain off2on_finetune fqe_baseline pixel_off2on awac_finetune]: save_checkpoint
        rng_state restore_rng_state
    resuming [cql_pretrain off2on_finetune pixel_off2on awac_finetune]: check_same_settings
    online env [off2on_finetune awac_finetune]: env_snapshot restore_env collect
    non-finite [awac_finetune]: stop_if_not_finite
    mlp [vae_shift_probe]: mlp
    progress [cql_pretrain off2on_finetune awac_finetune pixel_off2on fqe_baseline vae_shift_probe]:
        rate_text Progress
    tracking [cql_pretrain off2on_finetune awac_finetune fqe_baseline pixel_off2on vae_shift_probe]:
        start_tracking
    videos [cql_pretrain off2on_finetune awac_finetune]: VideoRecorder
"""

import copy
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass

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
    seed: int = 1
    """seed of the run"""
    offline_steps: int = 1_000_000
    """gradient steps of the offline phase (BCQ); 0 skips it and starts from `--offline-checkpoint`
    instead"""
    offline_checkpoint: str | None = None
    """the agent after the offline phase: written there when the offline phase ends, read with
    `--offline-steps 0` [default: checkpoints/{exp_name}__{env_id}__seed{seed}__offline.pt]"""
    total_timesteps: int = 250_000
    """online environment steps"""
    epoch_length: int = 1_000
    """environment steps collected per epoch; then as many gradient steps"""
    batch_size: int = 100
    """minibatch size"""
    hidden_sizes: tuple[int, ...] = (400, 300)
    """hidden sizes of the perturbation model and of each critic"""
    vae_hidden_sizes: tuple[int, ...] = (750, 750)
    """hidden sizes of the VAE's encoder and of its decoder"""
    latent_dim: int | None = None
    """size of the VAE's latent z [default: 2 x the action dimension]"""
    phi: float = 0.05
    """Phi: the perturbation moves each action coordinate by at most Phi (actions in [-1, 1])"""
    lmbda: float = 0.75
    """lambda of the soft clipped double-Q target: lambda min + (1 - lambda) max of two critics"""
    target_candidates: int = 10
    """perturbed VAE actions per next state over which the critic target is maximized"""
    select_candidates: int = 100
    """perturbed VAE actions per state when acting (collection and evaluation): argmax of Q1"""
    policy_lr: float = 1e-3
    """perturbation model learning rate"""
    q_lr: float = 1e-3
    """critic learning rate"""
    vae_lr: float = 1e-3
    """VAE learning rate"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network soft-update rate (critics and perturbation model)"""
    log_every: int = 1_000
    """offline phase: gradient steps between loss logs and progress lines"""
    offline_eval_every: int = 5_000
    """offline phase: gradient steps between evaluations"""
    save_every_offline: int = 10_000
    """offline phase: gradient steps between checkpoints of the whole training state"""
    eval_every: int = 1
    """online phase: epochs between evaluations"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    save_every: int = 10
    """online phase: epochs between checkpoints of the whole training state"""
    resume: bool = False
    """continue the run saved in checkpoints/{exp_name}__{env_id}__seed{seed}.pt"""
    cuda: bool = torch.cuda.is_available()
    """use CUDA"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    exp_name: str = "bcq-ft"
    """name of the experiment: part of the run name and of the state's and checkpoint's files"""
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
# Networks: the VAE G_omega(s) of the dataset's actions, the perturbation model xi_phi(s, a, Phi)
# and the two critics Q_theta1, Q_theta2 (BCQ, section 4)
# ---------------------------------------------------------------------------------------------
def mlp(in_dim: int, hidden_sizes, out_dim: int) -> nn.Sequential:
    sizes = [in_dim, *hidden_sizes]
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], out_dim))


VAE_LOG_STD_MIN, VAE_LOG_STD_MAX = -4.0, 15.0  # the authors' clamp of the encoder's log-std
LATENT_CLIP = 0.5  # sampled latents are clipped to [-0.5, 0.5] (docs/bcq_finetune.md)


class ConditionalVAE(nn.Module):
    """Conditional VAE of the dataset's actions. Encoder: (s, a) [B, ...] -> mean, log_std [B, L] of
    q(z | s, a), log_std clamped to [-4, 15]; decoder: (s, z) -> a in [-1, 1]^A (tanh output)."""

    def __init__(self, obs_dim: int, action_dim: int, latent_dim: int, hidden_sizes):
        super().__init__()
        self.encoder = mlp(obs_dim + action_dim, hidden_sizes, 2 * latent_dim)
        self.decoder = mlp(obs_dim + latent_dim, hidden_sizes, action_dim)

    def encode(self, obs, actions):
        mean, log_std = self.encoder(torch.cat([obs, actions], -1)).chunk(2, dim=-1)
        return mean, log_std.clamp(VAE_LOG_STD_MIN, VAE_LOG_STD_MAX)

    def decode(self, obs, z):
        return torch.tanh(self.decoder(torch.cat([obs, z], -1)))

    def forward(self, obs, actions, eps):
        """Reconstruction through the reparameterized z = mean + std * eps: recon, mean, log_std."""
        mean, log_std = self.encode(obs, actions)
        return self.decode(obs, mean + log_std.exp() * eps), mean, log_std


def sample_latent(n: int, latent_dim: int, device, generator=None):
    """z ~ N(0, I) clipped to [-0.5, 0.5], for sampling actions from the VAE: [n, latent_dim]."""
    z = torch.randn(n, latent_dim, device=device, generator=generator)
    return z.clamp(-LATENT_CLIP, LATENT_CLIP)


def perturb(actions, raw, phi: float):
    """a + Phi tanh(raw), clipped to the action bounds: within Phi of a in every coordinate, and in
    [-1, 1], whatever the network's raw output."""
    return (actions + phi * torch.tanh(raw)).clamp(-1, 1)


class Perturbation(nn.Module):
    """The perturbation model xi_phi(s, a, Phi): (s, a) [B, ...] -> perturb(a, f(s, a), Phi)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes, phi: float):
        super().__init__()
        self.phi = phi
        self.net = mlp(obs_dim + action_dim, hidden_sizes, action_dim)

    def forward(self, obs, actions):
        return perturb(actions, self.net(torch.cat([obs, actions], -1)), self.phi)


class TwinCritic(nn.Module):
    """Two Q-functions: obs [B, obs_dim], actions [B, A] -> Q1, Q2 [B]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes):
        super().__init__()
        self.q1_net = mlp(obs_dim + action_dim, hidden_sizes, 1)
        self.q2_net = mlp(obs_dim + action_dim, hidden_sizes, 1)

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], -1)
        return self.q1_net(x).squeeze(-1), self.q2_net(x).squeeze(-1)

    def q1(self, obs, actions):
        return self.q1_net(torch.cat([obs, actions], -1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Losses and the BCQ agent (Algorithm 1): VAE, critics, perturbation model, soft target updates
# ---------------------------------------------------------------------------------------------
def vae_loss(recon, actions, mean, log_std):
    """The authors' negative ELBO: MSE(recon, a) + 1/2 KL(N(mean, std^2) || N(0, I)), each term
    averaged over batch and dimensions, KL per latent dim = -1/2 (1 + 2 log_std - mean^2 - std^2).
    recon, actions [B, A]; mean, log_std [B, L] -> the loss, the MSE, the KL."""
    recon_loss = ((recon - actions) ** 2).mean()
    kl = -0.5 * (1 + 2 * log_std - mean**2 - (2 * log_std).exp()).mean()
    return recon_loss + 0.5 * kl, recon_loss, kl


def soft_clipped_target(q1, q2, rewards, terminations, gamma: float, lmbda: float):
    """The critics' target y = r + gamma (1 - d) max_j [lambda min(Q1', Q2') + (1 - lambda)
    max(Q1', Q2')](s', a_j), over the n perturbed VAE actions a_j of each next state s' (BCQ,
    Algorithm 1). q1, q2 [B, n] of the target critics; rewards, terminations [B] -> y [B]."""
    soft_min = lmbda * torch.minimum(q1, q2) + (1 - lmbda) * torch.maximum(q1, q2)
    return rewards + gamma * (1 - terminations) * soft_min.max(1).values


def gradient_step(optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


NETWORKS = ("vae", "actor", "actor_target", "qf", "qf_target")
OPTIMIZERS = ("vae_optimizer", "actor_optimizer", "qf_optimizer")


class BCQ:
    """The VAE, the perturbation model (`actor`) and the two critics, with target copies of the
    latter two; its policy picks, among n perturbed VAE actions, the one of highest Q1."""

    def __init__(
        self, obs_dim, action_dim, hidden_sizes=(400, 300), vae_hidden_sizes=(750, 750),
        latent_dim=None, phi=0.05, lmbda=0.75, gamma=0.99, tau=0.005, policy_lr=1e-3, q_lr=1e-3,
        vae_lr=1e-3, target_candidates=10, device="cpu",
    ):  # fmt: skip
        self.latent_dim = latent_dim or 2 * action_dim
        self.lmbda, self.gamma, self.tau = lmbda, gamma, tau
        self.target_candidates, self.device = target_candidates, device
        self.vae = ConditionalVAE(obs_dim, action_dim, self.latent_dim, vae_hidden_sizes).to(device)
        self.actor = Perturbation(obs_dim, action_dim, hidden_sizes, phi).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.qf = TwinCritic(obs_dim, action_dim, hidden_sizes).to(device)
        self.qf_target = copy.deepcopy(self.qf).requires_grad_(False)
        # fused Adam: one kernel per step (docs/speed.md, "Fused Adam")
        self.vae_optimizer = torch.optim.Adam(self.vae.parameters(), lr=vae_lr, fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=policy_lr, fused=True)
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=q_lr, fused=True)

    def draw_noise(self, batch_size: int) -> dict:
        """All randomness of one update: the VAE's eps [B, L], and the clipped latents of the VAE
        actions in the target (n per next state) [B n, L] and in the actor loss [B, L]."""
        B, L, dev = batch_size, self.latent_dim, self.device
        return {
            "vae": torch.randn(B, L, device=dev),
            "target": sample_latent(B * self.target_candidates, L, dev),
            "actor": sample_latent(B, L, dev),
        }

    def critic_loss(self, obs, actions, rewards, next_obs, terminations, noise):
        """MSE(Q1(s, a), y) + MSE(Q2(s, a), y), y = soft_clipped_target over n VAE actions per next
        state, perturbed by the target perturbation model and valued by the target critics."""
        n = self.target_candidates
        with torch.no_grad():
            next_obs = next_obs.repeat_interleave(n, 0)  # [B n, obs_dim]: row b n + j is state b
            next_actions = self.actor_target(next_obs, self.vae.decode(next_obs, noise["target"]))
            q1, q2 = (q.view(-1, n) for q in self.qf_target(next_obs, next_actions))
            target = soft_clipped_target(q1, q2, rewards, terminations, self.gamma, self.lmbda)
        q1_data, q2_data = self.qf(obs, actions)
        loss = F.mse_loss(q1_data, target) + F.mse_loss(q2_data, target)
        return loss, {"qf_loss": loss, "q_data": q1_data.mean()}

    def actor_loss(self, obs, noise):
        """-E[Q1(s, xi(s, a))] with a ~ G(s) (deterministic policy gradient through Q1). The VAE's
        action and the critic are held fixed: only the perturbation model learns from it."""
        with torch.no_grad():
            sampled = self.vae.decode(obs, noise["actor"])
        self.qf.requires_grad_(False)
        loss = -self.qf.q1(obs, self.actor(obs, sampled)).mean()
        self.qf.requires_grad_(True)
        return loss

    def update(self, batch, noise=None) -> dict:
        """One iteration of Algorithm 1 on a batch [B, ...]: the VAE, the critics, the perturbation
        model (against the updated critics), then the soft updates of both targets."""
        noise = self.draw_noise(batch[0].shape[0]) if noise is None else noise
        obs, actions = batch[:2]
        recon, mean, log_std = self.vae(obs, actions, noise["vae"])
        loss, recon_loss, kl = vae_loss(recon, actions, mean, log_std)
        gradient_step(self.vae_optimizer, loss)
        qf_loss, logs = self.critic_loss(*batch, noise)
        gradient_step(self.qf_optimizer, qf_loss)
        actor_loss = self.actor_loss(obs, noise)
        gradient_step(self.actor_optimizer, actor_loss)
        with torch.no_grad():
            for target, online in ((self.qf_target, self.qf), (self.actor_target, self.actor)):
                torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), self.tau)
        logs |= {"vae_loss": loss, "recon_loss": recon_loss, "kl_loss": kl}
        return {k: v.detach() for k, v in {**logs, "actor_loss": actor_loss}.items()}

    @torch.no_grad()
    def act(self, obs, n_candidates: int, generator=None):
        """BCQ's policy: n perturbed VAE actions per state, the one of highest Q1. obs [B, obs_dim]
        -> [B, A]. Random only through the latents z; there is no other exploration noise."""
        B = obs.shape[0]
        obs = obs.repeat_interleave(n_candidates, 0)  # [B n, obs_dim]
        z = sample_latent(B * n_candidates, self.latent_dim, obs.device, generator)
        candidates = self.actor(obs, self.vae.decode(obs, z))
        best = self.qf.q1(obs, candidates).view(B, n_candidates).argmax(1)
        return candidates.view(B, n_candidates, -1)[torch.arange(B, device=obs.device), best]

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in NETWORKS + OPTIMIZERS}

    def load_state_dict(self, state: dict):
        for name in NETWORKS + OPTIMIZERS:
            getattr(self, name).load_state_dict(state[name])


# ---------------------------------------------------------------------------------------------
# Replay: the dataset and every online transition, sampled uniformly
# ---------------------------------------------------------------------------------------------
class UniformReplay:
    """The offline data and every online transition in one buffer on the training device, sampled
    uniformly; online transitions are never evicted. The offline phase samples the data alone."""

    def __init__(self, data: OfflineData, online_capacity: int, seed=0, device="cpu"):
        self.n_offline, self.n_online, self.device = len(data), 0, device
        self.storage = {}
        for name in FIELDS:
            offline = torch.as_tensor(getattr(data, name))
            size = (self.n_offline + online_capacity, *offline.shape[1:])
            self.storage[name] = torch.zeros(size, device=device)
            self.storage[name][: self.n_offline] = offline.to(device)
        self.rng = np.random.default_rng(seed)

    def add(self, obs, action, reward, next_obs, terminated):
        i = self.n_offline + self.n_online
        for name, value in zip(FIELDS, (obs, action, reward, next_obs, float(terminated))):
            self.storage[name][i] = torch.as_tensor(value, dtype=torch.float32)
        self.n_online += 1

    def sample(self, batch_size: int):
        idx = self.rng.integers(0, self.n_offline + self.n_online, batch_size)
        idx = torch.as_tensor(idx, device=self.device)
        return [self.storage[name][idx] for name in FIELDS]

    def state_dict(self) -> dict:
        end = self.n_offline + self.n_online
        state = {name: self.storage[name][self.n_offline : end].cpu() for name in FIELDS}
        return state | {"rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict):
        self.n_online = len(state["rewards"])
        for name in FIELDS:
            online = state[name].to(self.device)
            self.storage[name][self.n_offline : self.n_offline + self.n_online] = online
        self.rng.bit_generator.state = json.loads(state["rng"])


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agent: BCQ, envs: list, seed: int, device, n_candidates: int) -> np.ndarray:
    """Returns of BCQ's policy, one episode per env, all in lockstep. Its latents come from a
    generator seeded here: an evaluation depends on the weights alone and leaves training's RNG
    untouched."""
    generator = torch.Generator(device=device).manual_seed(seed)
    obs = np.stack([env.reset(seed=seed + j)[0] for j, env in enumerate(envs)])
    returns, active = np.zeros(len(envs)), np.ones(len(envs), bool)
    while active.any():
        x = torch.as_tensor(obs, dtype=torch.float32, device=device)
        actions = agent.act(x, n_candidates, generator).cpu().numpy()
        for j in np.flatnonzero(active):
            action = scale_to_env(actions[j], envs[j].action_space)
            obs[j], reward, terminated, truncated, _ = envs[j].step(action)
            returns[j] += reward
            active[j] = not (terminated or truncated)
    return returns


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


def default_offline_checkpoint(exp_name: str, env_id: str, seed: int) -> str:
    return f"checkpoints/{exp_name}__{env_id.replace('/', '-')}__seed{seed}__offline.pt"


def run_metadata(args: Args, data: OfflineData, latent_dim: int) -> dict:
    """What a checkpoint says about itself: its data, its networks, the settings of its run."""
    return {
        "obs_dim": data.observations.shape[1],
        "action_dim": data.actions.shape[1],
        "hidden_sizes": list(args.hidden_sizes),
        "vae_hidden_sizes": list(args.vae_hidden_sizes),
        "latent_dim": latent_dim,
        "phi": args.phi,
        "dataset_id": data.dataset_id,
        "env_id": data.env_spec.id,
        "args": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()},
    }


# what a checkpoint must share with the run that loads it
MUST_MATCH = ("obs_dim", "action_dim", "hidden_sizes", "vae_hidden_sizes", "latent_dim", "phi")
MUST_MATCH += ("dataset_id", "env_id")
# settings that may change when a run is resumed: they don't change what is computed
NOT_SETTINGS = ("resume", "cuda", "torch_deterministic", "total_timesteps", "eval_every")
NOT_SETTINGS += ("eval_episodes", "save_every", "log_every", "offline_eval_every")
NOT_SETTINGS += ("save_every_offline", "offline_checkpoint")
NOT_SETTINGS += ("track", "wandb_project_name", "wandb_entity", "capture_video")
NOT_SETTINGS += ("video_every",)


def validate_args(args: Args):
    for name, value in vars(args).items():  # counts, sizes and periods
        if type(value) is int and name not in ("seed", "offline_steps") and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.offline_steps < 0:
        raise ValueError(f"--offline-steps must be >= 0, got {args.offline_steps}")
    for name in ("hidden_sizes", "vae_hidden_sizes"):
        if not all(size >= 1 for size in getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("policy_lr", "q_lr", "vae_lr", "tau"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.total_timesteps % args.epoch_length:
        raise ValueError(
            f"--total-timesteps {args.total_timesteps} must be a multiple of "
            f"--epoch-length {args.epoch_length}"
        )
    if not (0 <= args.lmbda <= 1 and 0 <= args.gamma <= 1 and args.phi >= 0):
        raise ValueError(
            f"need 0 <= --lmbda <= 1, 0 <= --gamma <= 1 and --phi >= 0, got {args.lmbda}, "
            f"{args.gamma}, {args.phi}"
        )


def stop_if_not_finite(means: dict, where: str, state_path: str):
    if not all(math.isfinite(v) for v in means.values()):
        raise SystemExit(
            f"error: non-finite loss {where} ({means}); the last good state ({state_path}) is "
            "kept. Try lower learning rates, and --resume from it"
        )


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
    seed, env_tag = args.seed, args.env_id.replace("/", "-")
    state_path = f"checkpoints/{args.exp_name}__{env_tag}__seed{seed}.pt"  # for --resume
    offline_path = args.offline_checkpoint or default_offline_checkpoint(
        args.exp_name, env_tag, seed
    )
    resume = args.resume and os.path.exists(state_path)
    try:
        validate_args(args)
        if os.path.exists(state_path) and not args.resume:
            raise ValueError(
                f"{state_path} exists: pass --resume to continue that run, "
                "or --exp-name to start another"
            )
        if not resume and args.offline_steps == 0 and not os.path.exists(offline_path):
            raise CheckpointError(
                f"--offline-steps 0 starts from an offline checkpoint, and there is none at "
                f"{offline_path}: make it with this command and --offline-steps N > 0 (written "
                "there when the offline phase ends), or pass --offline-checkpoint PATH"
            )
        if not resume and args.offline_steps > 0 and os.path.exists(offline_path):
            raise CheckpointError(
                f"{offline_path} exists: pass --offline-steps 0 to start from it, or "
                "--exp-name / --offline-checkpoint to write another"
            )
        data = load_offline_data(args.env_id, args.dataset_path, args.random_dataset_size)
        obs_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
        metadata = run_metadata(args, data, args.latent_dim or 2 * action_dim)
        expected = {k: metadata[k] for k in MUST_MATCH}
        if resume:
            state = load_checkpoint(state_path)
            check_checkpoint_matches(state["metadata"], expected, state_path)
            check_same_settings(
                state["metadata"]["args"], metadata["args"], state_path, NOT_SETTINGS
            )
        elif args.offline_steps == 0:
            offline = load_checkpoint(offline_path)
            check_checkpoint_matches(offline["metadata"], expected, offline_path)
    except ValueError as e:  # DatasetError and CheckpointError included
        raise SystemExit(f"error: {e}")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.manual_seed(seed)
    np.random.seed(seed)

    agent = BCQ(
        obs_dim, action_dim, args.hidden_sizes, args.vae_hidden_sizes, args.latent_dim, args.phi,
        args.lmbda, args.gamma, args.tau, args.policy_lr, args.q_lr, args.vae_lr,
        args.target_candidates, device,
    )  # fmt: skip
    replay = UniformReplay(data, args.total_timesteps, seed, device)
    offline_step, start_epoch = 0, 0
    run_name = f"{env_tag}__{args.exp_name}__{seed}__{int(time.time())}"
    if resume:
        agent.load_state_dict(state)
        replay.load_state_dict(state["replay"])
        offline_step, start_epoch, run_name = (
            state["offline_step"],
            state["epoch"],
            state["run_name"],
        )
        restore_rng_state(state["rng"])
        if start_epoch >= args.total_timesteps // args.epoch_length:  # leave its logs alone
            print(f"{state_path} is complete ({start_epoch} epochs): nothing to resume")
            raise SystemExit(0)
        print(f"Resuming {state_path} after offline step {offline_step:,}, epoch {start_epoch}")
    elif args.offline_steps == 0:
        agent.load_state_dict(offline)
        steps = offline["metadata"]["args"]["offline_steps"]
        print(f"Starting from {offline_path} ({steps:,} offline steps); no offline phase")

    tracking = start_tracking(args, run_name, state.get("wandb_id") if resume else None)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    print(
        f"{data.dataset_id}: {len(data):,} offline transitions, env {data.env_spec.id}; normalized "
        f"score uses {data.ref_source}; on {device}; logs in runs/{run_name}"
    )
    eval_envs = [make_env(data.env_spec) for _ in range(args.eval_episodes)]
    if args.capture_video:  # the first evaluation episode, rendered
        video_env = make_env(data.env_spec, render_mode="rgb_array", width=240, height=240)
        eval_envs[0] = VideoRecorder(video_env, f"videos/{run_name}")
    env = make_env(data.env_spec)

    def log_evaluation(step: int, prefix: str = ""):
        # videos of the online phase's evaluations
        evaluation, last = (
            step // (args.eval_every * args.epoch_length),
            step == args.total_timesteps,
        )
        if args.capture_video and not prefix and (evaluation % args.video_every == 0 or last):
            eval_envs[0].start()
        returns = evaluate(agent, eval_envs, seed + 10_000, device, args.select_candidates)
        if args.capture_video and eval_envs[0].frames is not None:
            print(f"video: {eval_envs[0].save(writer, step)}")
        writer.add_scalar(f"{prefix}eval/return", returns.mean(), step)
        when = f"offline step {step:,}" if prefix else f"{step:,} online steps"
        line = f"eval after {when}: return {returns.mean():.1f}"
        if data.ref_returns is not None:
            score = normalized_score(returns.mean(), data.ref_returns)
            writer.add_scalar(f"{prefix}eval/normalized_score", score, step)
            line += f" (normalized {score:.1f})"
        if data.minari_ref_returns is not None:  # Minari's scale, beside D4RL's
            minari_score = normalized_score(returns.mean(), data.minari_ref_returns)
            writer.add_scalar(f"{prefix}eval/minari_normalized_score", minari_score, step)
        print(line, flush=True)

    def save_state(offline_step: int, epoch: int, online_env: dict | None = None):
        state = {"offline_step": offline_step, "epoch": epoch, "run_name": run_name}
        state |= {"replay": replay.state_dict(), "rng": rng_state()}
        state["wandb_id"] = tracking.id if tracking else None
        if online_env is not None:
            state["env"] = online_env
        checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata}
        writer.flush()  # the logs up to this state are on disk before the state is
        save_checkpoint(state_path, {**checkpoint, **agent.state_dict(), **state})

    # Offline phase: BCQ on the dataset (the buffer holds no online transition yet); x axis of its
    # logs, under offline/: gradient steps
    sums, window_start, window_first = {}, time.time(), offline_step
    progress = Progress("offline step", args.offline_steps, offline_step)
    for step in range(offline_step + 1, args.offline_steps + 1):
        # TRAIN one BCQ iteration on a uniform batch of the data
        for k, v in agent.update(replay.sample(args.batch_size)).items():
            sums[k] = sums.get(k, 0) + v

        # LOG the means since the last log; a non-finite loss stops the run before it is saved
        last = step == args.offline_steps
        if step % args.log_every == 0 or step % args.save_every_offline == 0 or last:
            means = {k: (v / (step - window_first)).item() for k, v in sums.items()}
            stop_if_not_finite(means, f"at offline step {step}", state_path)
        if step % args.log_every == 0 or last:
            sps = (step - window_first) / (time.time() - window_start)
            for k, v in means.items():
                writer.add_scalar(f"offline/losses/{k}", v, step)
            writer.add_scalar("offline/charts/SPS", sps, step)
            print(
                f"offline step {step:,}/{args.offline_steps:,} | vae {means['vae_loss']:.4f} | "
                f"qf {means['qf_loss']:.3f} | actor {means['actor_loss']:.3f} | "
                f"Q {means['q_data']:.2f} | {rate_text(sps)} SPS",
                flush=True,
            )
            sums, window_start, window_first = {}, time.time(), step

        # EVALUATE (SPS counts training only), SAVE the whole state
        if step % args.offline_eval_every == 0:
            eval_start = time.time()
            log_evaluation(step, prefix="offline/")
            window_start += time.time() - eval_start
        if step % args.save_every_offline == 0 or last:
            save_state(step, 0)
        progress(step, printed=step % args.log_every == 0 or last)
    if start_epoch == 0 and args.offline_steps > 0:  # the offline phase ended: keep its agent
        checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata}
        save_checkpoint(offline_path, {**checkpoint, **agent.state_dict()})
        print(f"Wrote {offline_path}")

    # Online phase (BCQ-ft): x axis of its logs, online environment steps; step 0 is the agent
    # after the offline phase
    if start_epoch == 0:
        # the same RNG state whether the offline phase ran here or was loaded: the same run
        torch.manual_seed(seed)
        replay.rng = np.random.default_rng(seed)
        log_evaluation(0)
    if resume and "env" in state:  # the saved run's episode, exactly where it was
        obs, episode_return = restore_env(env, state["env"])
    else:
        obs, episode_return = env.reset(seed=seed + start_epoch)[0], 0.0
    n_epochs = args.total_timesteps // args.epoch_length

    def act(obs):
        x = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
        return agent.act(x, args.select_candidates)[0].cpu().numpy()

    for epoch in range(start_epoch + 1, n_epochs + 1):
        # COLLECT an epoch with BCQ's own policy, no other exploration noise
        epoch_start, step = time.time(), (epoch - 1) * args.epoch_length
        obs, episode_return, finished = collect(
            env, act, replay, obs, episode_return, args.epoch_length
        )
        for t, episodic_return in finished:
            writer.add_scalar("charts/episodic_return", episodic_return, step + t)
        step += args.epoch_length

        # TRAIN: as many BCQ iterations as new transitions, on uniform batches of data and online
        sums, progress = {}, Progress(f"epoch {epoch}: update", args.epoch_length)
        for update in range(1, args.epoch_length + 1):
            for k, v in agent.update(replay.sample(args.batch_size)).items():
                sums[k] = sums.get(k, 0) + v
            progress(update)

        # LOG the epoch's means; a non-finite loss stops the run before it reaches a checkpoint
        means = {k: (v / args.epoch_length).item() for k, v in sums.items()}
        stop_if_not_finite(means, f"in epoch {epoch}", state_path)
        for k, v in means.items():
            writer.add_scalar(f"losses/{k}", v, step)
        sps = args.epoch_length / (time.time() - epoch_start)
        writer.add_scalar("charts/SPS", sps, step)
        print(
            f"epoch {epoch}/{n_epochs} | vae {means['vae_loss']:.4f} | qf {means['qf_loss']:.3f} | "
            f"actor {means['actor_loss']:.3f} | Q {means['q_data']:.2f} | {rate_text(sps)} SPS",
            flush=True,
        )

        # EVALUATE, SAVE the whole state, replay included
        if epoch % args.eval_every == 0 or epoch == n_epochs:
            log_evaluation(step)
        if epoch % args.save_every == 0 or epoch == n_epochs:
            save_state(args.offline_steps, epoch, env_snapshot(env, obs, episode_return))
    writer.close()
    if tracking:
        tracking.finish()
    print(f"Wrote {state_path}")
