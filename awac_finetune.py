"""AWAC, the offline-to-online baseline of Off2On: one advantage-weighted actor-critic, trained
on the dataset, then fine-tuned online with the same update.

Nair, Gupta, Dalal, Levine, "AWAC: Accelerating Online Reinforcement Learning with Offline
Datasets", https://arxiv.org/abs/2006.09359 (Algorithm 1); the baseline of Lee et al., CoRL 2021,
https://arxiv.org/abs/2107.00591 (appendix D).

    python awac_finetune.py --env-id halfcheetah-medium-v2

Off2On ran the authors' code "without any modification to hyperparameters and architectures";
this follows that code, rlkit (https://github.com/rail-berkeley/rlkit): the MuJoCo launcher
examples/awac/mujoco/awac1.py for the defaults, rlkit/torch/sac/awac_trainer.py (AWACTrainer)
for the losses and the offline phase, rlkit/torch/sac/policies/gaussian_policy.py
(GaussianPolicy) for the policy, and rlkit/core/batch_rl_algorithm.py for the online schedule.
- critics: two Q-functions regressed on r + gamma (1 - d) min_k Qtarget_k(s', a'), a' ~ pi(.|s');
- actor: maximum likelihood of the replayed actions, each weighted by exp(A(s, a) / beta)
  normalized over the batch, with A(s, a) = min_k Q_k(s, a) - min_k Q_k(s, a_pi), a_pi ~ pi(.|s).
Docs: docs/awac_finetune.md; the authors' settings, file by file, and where this differs there.

Shared word for word with other scripts (tests/test_shared_blocks.py checks every copy):
    data [cql_pretrain off2on_finetune fqe_baseline vae_shift_probe bcq_finetune]: D4RL_NAME GYM_IDS
        D4RL_REF_RETURNS RANDOM_DATASET_ID FIELDS DatasetError OfflineData make_env
        episodes_to_transitions load_d4rl_hdf5 load_minari_dataset load_offline_data scale_to_unit
        scale_to_env normalized_score
    checkpoints [cql_pretrain off2on_finetune fqe_baseline vae_shift_probe pixel_off2on
        bcq_finetune]: CHECKPOINT_FORMAT CheckpointError load_checkpoint check_checkpoint_matches
    saving [cql_pretrain off2on_finetune fqe_baseline pixel_off2on bcq_finetune]: save_checkpoint
        rng_state restore_rng_state
    resuming [cql_pretrain off2on_finetune pixel_off2on bcq_finetune]: check_same_settings
    online env [off2on_finetune bcq_finetune]: env_snapshot restore_env collect
    non-finite [bcq_finetune]: stop_if_not_finite
    progress [cql_pretrain off2on_finetune bcq_finetune pixel_off2on fqe_baseline vae_shift_probe]:
        rate_text Progress
    tracking [cql_pretrain off2on_finetune bcq_finetune fqe_baseline pixel_off2on vae_shift_probe]:
        start_tracking
    videos [cql_pretrain off2on_finetune bcq_finetune]: VideoRecorder
"""

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
    offline_steps: int = 50_000
    """gradient steps on the dataset before going online; 0: start from `--offline-checkpoint`"""
    offline_batch_size: int = 128
    """minibatch size of the offline phase"""
    offline_checkpoint: str | None = None
    """the agent after the offline phase [default:
    checkpoints/{exp_name}__{env_id}__seed{seed}__offline.pt]: written, or read with
    `--offline-steps 0`"""
    total_timesteps: int = 250_000
    """online environment steps"""
    epoch_length: int = 1_000
    """environment steps collected per epoch; then as many gradient steps"""
    min_steps_before_training: int = 1_000
    """online steps collected before the first online gradient step (epochs ending by then only
    collect)"""
    batch_size: int = 1024
    """minibatch size of the online phase"""
    beta: float = 2.0
    """advantage temperature: weights exp(A / beta)"""
    policy_lr: float = 3e-4
    """actor learning rate"""
    q_lr: float = 3e-4
    """critic learning rate"""
    policy_weight_decay: float = 1e-4
    """L2 weight decay of the actor's Adam"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network soft-update rate (every step)"""
    reward_scale: float = 1.0
    """rewards are multiplied by this in the Bellman target"""
    policy_hidden_sizes: tuple[int, ...] = (256, 256, 256, 256)
    """hidden sizes of the actor"""
    q_hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden sizes of each critic"""
    log_every: int = 1_000
    """offline steps between loss logs and progress lines"""
    eval_every: int = 1
    """epochs between evaluations"""
    eval_episodes: int = 5
    """deterministic evaluation episodes"""
    save_every: int = 10
    """epochs between checkpoints of the whole training state"""
    save_every_offline: int = 10_000
    """offline steps between checkpoints of the whole training state"""
    resume: bool = False
    """continue the run saved in checkpoints/{exp_name}__{env_id}__seed{seed}.pt"""
    cuda: bool = torch.cuda.is_available()
    """use CUDA"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    exp_name: str = "awac"
    """name of the experiment: part of the run name and of the checkpoints' files"""
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
# Networks: rlkit's Mlp (its initialization included), a Gaussian policy with a tanh mean and a
# state-independent std, and two critics
# ---------------------------------------------------------------------------------------------
def mlp(in_dim: int, hidden_sizes, out_dim: int, last_init: float) -> nn.Sequential:
    """ReLU MLP initialized as rlkit's Mlp: hidden weights U(+-1/sqrt(weight.shape[0])) (rlkit's
    fanin_init reads dim 0, the output width of an nn.Linear), zero biases, last layer
    weights U(+-last_init) and a zero bias."""
    sizes, layers = [in_dim, *hidden_sizes], []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], out_dim))
    with torch.no_grad():
        for layer in layers[:-1:2]:
            bound = 1 / math.sqrt(layer.weight.shape[0])
            layer.weight.uniform_(-bound, bound)
            layer.bias.zero_()
        layers[-1].weight.uniform_(-last_init, last_init)
        layers[-1].bias.zero_()
    return nn.Sequential(*layers)


LOG_STD_MIN, LOG_STD_MAX = -6.0, 0.0  # the launcher's min_log_std, max_log_std


class GaussianPolicy(nn.Module):
    """pi(.|s) = N(tanh(f(s)), diag(sigma^2)): the mean is squashed, the samples are not, and
    log sigma = LOG_STD_MIN + sigmoid(l) (LOG_STD_MAX - LOG_STD_MIN) with l one learned value per
    action dim (rlkit's GaussianPolicy, std_architecture="values"; l starts at 0, sigma at e^-3).
    obs [B, obs_dim] -> mean, log_std [B, A]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes):
        super().__init__()
        self.net = mlp(obs_dim, hidden_sizes, action_dim, last_init=1e-3)
        self.log_std_logits = nn.Parameter(torch.zeros(action_dim))

    def forward(self, obs):
        mean = torch.tanh(self.net(obs))
        log_std = LOG_STD_MIN + torch.sigmoid(self.log_std_logits) * (LOG_STD_MAX - LOG_STD_MIN)
        return mean, log_std.expand_as(mean)


def gaussian_log_prob(mean, log_std, actions):
    """log pi(a|s) of the diagonal Gaussian, summed over action dims: [B, A] -> [B]."""
    z = (actions - mean) / log_std.exp()
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class TwinCritic(nn.Module):
    """Q_1, Q_2: obs [B, obs_dim], actions [B, A] -> Q [2, B]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes):
        super().__init__()
        self.q1 = mlp(obs_dim + action_dim, hidden_sizes, 1, last_init=3e-3)
        self.q2 = mlp(obs_dim + action_dim, hidden_sizes, 1, last_init=3e-3)

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], -1)
        return torch.stack([self.q1(x), self.q2(x)]).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# AWAC's losses (AWACTrainer with the launcher's settings: alpha 0, no entropy term)
# ---------------------------------------------------------------------------------------------
def advantage(qf: TwinCritic, obs, actions, policy_actions):
    """A(s, a) = min_k Q_k(s, a) - V(s), V(s) = min_k Q_k(s, a_pi) at one a_pi ~ pi(.|s)
    (awr_min_q=True, vf_K=1): [B, ...] -> [B]."""
    return qf(obs, actions).min(0).values - qf(obs, policy_actions).min(0).values


def advantage_weights(adv, beta: float):
    """w = B softmax_batch(A / beta): exp(A / beta) normalized to mean 1 over the batch
    (normalize_over_batch=True), not clipped (clip_score=None). [B] -> [B]."""
    return adv.shape[0] * torch.softmax(adv / beta, dim=0)


def weighted_log_likelihood_loss(log_prob, weights):
    """The actor loss, -mean_i w_i log pi(a_i|s_i): the weights are constants."""
    return -(weights.detach() * log_prob).mean()


def bellman_target(qf_target: TwinCritic, next_obs, next_actions, rewards, terminations,
                   gamma: float, reward_scale: float):  # fmt: skip
    """y = reward_scale r + gamma (1 - d) min_k Qtarget_k(s', a'), a' ~ pi(.|s') (the trainer's
    target with alpha = 0: no entropy term). [B] -> [B]."""
    next_q = qf_target(next_obs, next_actions).min(0).values
    return reward_scale * rewards + gamma * (1 - terminations) * next_q


OPTIMIZERS = ("policy_optimizer", "qf_optimizer")


class AWAC:
    """The policy, the two critics and their targets, and one update of all of them."""

    def __init__(
        self, obs_dim, action_dim, policy_hidden_sizes=(256,) * 4, q_hidden_sizes=(256, 256),
        beta=2.0, gamma=0.99, tau=0.005, reward_scale=1.0, policy_lr=3e-4, q_lr=3e-4,
        policy_weight_decay=1e-4, device="cpu",
    ):  # fmt: skip
        self.action_dim, self.beta, self.gamma, self.tau = action_dim, beta, gamma, tau
        self.reward_scale = reward_scale
        self.policy = GaussianPolicy(obs_dim, action_dim, policy_hidden_sizes).to(device)
        self.qf = TwinCritic(obs_dim, action_dim, q_hidden_sizes).to(device)
        # initialized on their own, not copied, as the authors' launcher builds them
        self.qf_target = TwinCritic(obs_dim, action_dim, q_hidden_sizes).to(device)
        self.qf_target.requires_grad_(False)
        self.policy_optimizer = torch.optim.Adam(
            self.policy.parameters(), lr=policy_lr, weight_decay=policy_weight_decay, fused=True
        )
        # one Adam for both critics: per-parameter, so the same as the authors' two
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=q_lr, fused=True)

    def draw_noise(self, batch_size: int) -> dict:
        """All randomness of one update: a' ~ pi(.|s') and a_pi ~ pi(.|s)."""
        dev = self.policy.log_std_logits.device
        shape = (batch_size, self.action_dim)
        return {"next": torch.randn(shape, device=dev), "policy": torch.randn(shape, device=dev)}

    def critic_loss(self, obs, actions, rewards, next_obs, terminations, noise):
        """sum_k mean_B (Q_k(s, a) - y)^2, y from bellman_target."""
        with torch.no_grad():
            next_mean, next_log_std = self.policy(next_obs)
            next_actions = next_mean + next_log_std.exp() * noise["next"]
            target = bellman_target(
                self.qf_target, next_obs, next_actions, rewards, terminations, self.gamma,
                self.reward_scale,
            )  # fmt: skip
        q = self.qf(obs, actions)  # [2, B]
        qf_loss = ((q - target) ** 2).mean(-1).sum()
        return qf_loss, {"qf_loss": qf_loss, "q_data": q.mean()}

    def actor_loss(self, obs, actions, noise):
        """-mean_i w_i log pi(a_i|s_i) over the replayed actions, w from advantage_weights."""
        mean, log_std = self.policy(obs)
        with torch.no_grad():  # the critics only weigh the samples: no gradient reaches them
            policy_actions = mean + log_std.exp() * noise["policy"]
            adv = advantage(self.qf, obs, actions, policy_actions)
            weights = advantage_weights(adv, self.beta)
        log_prob = gaussian_log_prob(mean, log_std, actions)
        actor_loss = weighted_log_likelihood_loss(log_prob, weights)
        logs = {"actor_loss": actor_loss, "advantage": adv.mean(), "weight_max": weights.max()}
        return actor_loss, {**logs, "policy_std": log_std.exp().mean()}

    def update(self, batch, noise=None) -> dict:
        """One gradient step on a batch [B, ...]: both losses from the current networks (the
        advantages from the critics before their step, as in the authors' trainer), the critics'
        step, the actor's step, then the targets' soft update."""
        noise = self.draw_noise(batch[0].shape[0]) if noise is None else noise
        qf_loss, logs = self.critic_loss(*batch, noise)
        actor_loss, actor_logs = self.actor_loss(batch[0], batch[1], noise)
        self.qf_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.qf_optimizer.step()
        self.policy_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.policy_optimizer.step()
        with torch.no_grad():
            targets, params = list(self.qf_target.parameters()), list(self.qf.parameters())
            torch._foreach_lerp_(targets, params, self.tau)
        return {k: v.detach() for k, v in {**logs, **actor_logs}.items()}

    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "qf": self.qf.state_dict(),
            "qf_target": self.qf_target.state_dict(),
            **{name: getattr(self, name).state_dict() for name in OPTIMIZERS},
        }

    def load_state_dict(self, state: dict):
        self.policy.load_state_dict(state["policy"])
        self.qf.load_state_dict(state["qf"])
        self.qf_target.load_state_dict(state["qf_target"])
        for name in OPTIMIZERS:  # Adam's moments continue; this run's lr and weight decay stay
            optimizer = getattr(self, name)
            settings = [
                {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
            ]
            optimizer.load_state_dict(state[name])
            for group, own in zip(optimizer.param_groups, settings):
                group.update(own)


# ---------------------------------------------------------------------------------------------
# Replay: the offline data and every online transition in one buffer, sampled uniformly
# ---------------------------------------------------------------------------------------------
class Replay:
    """Offline transitions first, online ones appended (never evicted), on the training device."""

    def __init__(self, data: OfflineData, online_capacity: int, seed=0, device="cpu"):
        self.n_offline, self.n_online = len(data), 0
        size = self.n_offline + online_capacity
        self.storage = {}
        for name in FIELDS:
            offline = torch.as_tensor(getattr(data, name))
            self.storage[name] = torch.zeros(size, *offline.shape[1:], device=device)
            self.storage[name][: self.n_offline] = offline.to(device)
        self.rng, self.device = np.random.default_rng(seed), device

    def add(self, obs, action, reward, next_obs, terminated):
        i = self.n_offline + self.n_online
        for name, value in zip(FIELDS, (obs, action, reward, next_obs, float(terminated))):
            self.storage[name][i] = torch.as_tensor(value, dtype=torch.float32)
        self.n_online += 1

    def sample(self, batch_size: int):
        idx = torch.as_tensor(self.rng.integers(0, self.n_offline + self.n_online, batch_size))
        idx = idx.to(self.device)
        return [self.storage[name][idx] for name in FIELDS]

    def state_dict(self) -> dict:
        end = self.n_offline + self.n_online
        state = {name: self.storage[name][self.n_offline : end].cpu() for name in FIELDS}
        return {**state, "rng": json.dumps(self.rng.bit_generator.state)}

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
def evaluate(policy: GaussianPolicy, envs: list, seed: int, device) -> np.ndarray:
    """Deterministic returns of the policy's mean (the authors' MakeDeterministic): one episode
    per env, all in lockstep."""
    obs = np.stack([env.reset(seed=seed + j)[0] for j, env in enumerate(envs)])
    returns, active = np.zeros(len(envs)), np.ones(len(envs), bool)
    while active.any():
        mean, _ = policy(torch.as_tensor(obs, dtype=torch.float32, device=device))
        actions = mean.cpu().numpy()
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
# Checkpoints, arguments
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


def run_metadata(args: Args, data: OfflineData) -> dict:
    """What a checkpoint says about itself: checked when it is loaded."""
    return {
        "obs_dim": data.observations.shape[1],
        "action_dim": data.actions.shape[1],
        "policy_hidden_sizes": list(args.policy_hidden_sizes),
        "q_hidden_sizes": list(args.q_hidden_sizes),
        "dataset_id": data.dataset_id,
        "env_id": data.env_spec.id,
        "args": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()},
    }


# settings that may change when a run is resumed: they don't change what is computed
NOT_SETTINGS = ("resume", "cuda", "torch_deterministic", "total_timesteps", "eval_every")
NOT_SETTINGS += ("eval_episodes", "save_every", "save_every_offline", "log_every")
NOT_SETTINGS += ("track", "wandb_project_name", "wandb_entity", "capture_video")
NOT_SETTINGS += ("video_every",)


def validate_args(args: Args):
    for name, value in vars(args).items():  # counts, sizes and periods
        may_be_zero = ("offline_steps", "min_steps_before_training")
        if type(value) is int and name != "seed" and value < (0 if name in may_be_zero else 1):
            least = 0 if name in may_be_zero else 1
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if args.total_timesteps % args.epoch_length:
        raise ValueError(
            f"--total-timesteps {args.total_timesteps} must be a multiple of "
            f"--epoch-length {args.epoch_length}"
        )
    for name in ("beta", "policy_lr", "q_lr", "reward_scale"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not (0 < args.tau <= 1 and 0 <= args.gamma <= 1):
        raise ValueError(f"need 0 < --tau <= 1 and 0 <= --gamma <= 1, got {args.tau}, {args.gamma}")
    if args.policy_weight_decay < 0:
        raise ValueError(f"--policy-weight-decay must be >= 0, got {args.policy_weight_decay}")
    if min(args.policy_hidden_sizes + args.q_hidden_sizes, default=1) < 1:
        raise ValueError("hidden sizes must be >= 1")


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
    default_offline_path = f"checkpoints/{args.exp_name}__{env_tag}__seed{seed}__offline.pt"
    offline_path = args.offline_checkpoint or default_offline_path
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
                f"--offline-steps 0 starts from the agent after the offline phase, but there is "
                f"no {offline_path}: make it with a run with --offline-steps > 0 (it writes it "
                "there), or pass --offline-checkpoint"
            )
        if not resume and args.offline_steps > 0 and os.path.exists(offline_path):
            raise ValueError(
                f"{offline_path} exists: pass --offline-steps 0 to fine-tune from it, or "
                "--offline-checkpoint / --exp-name to make another"
            )
        data = load_offline_data(args.env_id, args.dataset_path, args.random_dataset_size)
        metadata = run_metadata(args, data)
        expected = {k: metadata[k] for k in ("dataset_id", "obs_dim", "action_dim")}
        expected.update({k: metadata[k] for k in ("policy_hidden_sizes", "q_hidden_sizes")})
        if resume:
            state = load_checkpoint(state_path)
            check_same_settings(
                state["metadata"]["args"], metadata["args"], state_path, NOT_SETTINGS
            )
        elif args.offline_steps == 0:
            state = load_checkpoint(offline_path)
            check_checkpoint_matches(state["metadata"], expected, offline_path)
    except ValueError as e:  # DatasetError and CheckpointError included
        raise SystemExit(f"error: {e}")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.manual_seed(seed)
    np.random.seed(seed)

    obs_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    agent = AWAC(
        obs_dim, action_dim, args.policy_hidden_sizes, args.q_hidden_sizes, args.beta,
        args.gamma, args.tau, args.reward_scale, args.policy_lr, args.q_lr,
        args.policy_weight_decay, device,
    )  # fmt: skip
    replay = Replay(data, args.total_timesteps, seed, device)
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
        print(f"Resuming {state_path} after {offline_step:,} offline steps, epoch {start_epoch}")
    elif args.offline_steps == 0:
        agent.load_state_dict(state)
        print(f"Starting from {offline_path} (offline phase skipped)")

    tracking = start_tracking(args, run_name, state.get("wandb_id") if resume else None)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    print(
        f"{data.dataset_id}: {len(data):,} offline transitions, env {data.env_spec.id}; "
        f"normalized score uses {data.ref_source}; logs in runs/{run_name}"
    )

    def save_state(epoch: int, online_env: dict | None = None):
        state = {"offline_step": offline_step, "epoch": epoch, "run_name": run_name}
        state.update(replay=replay.state_dict(), rng=rng_state())
        state["wandb_id"] = tracking.id if tracking else None
        if online_env is not None:
            state["env"] = online_env
        checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata}
        writer.flush()  # the logs up to this state are on disk before the state is
        save_checkpoint(state_path, {**checkpoint, **agent.state_dict(), **state})

    # OFFLINE PHASE: the same update on the dataset alone (the trainer's pretrain_q_with_bc_data)
    start_time, last_step = time.time(), offline_step
    progress = Progress("offline step", args.offline_steps, offline_step)
    while offline_step < args.offline_steps:
        logs = agent.update(replay.sample(args.offline_batch_size))
        offline_step += 1
        last = offline_step == args.offline_steps
        if (
            offline_step % args.log_every == 0
            or offline_step % args.save_every_offline == 0
            or last
        ):
            logs = {k: v.item() for k, v in logs.items()}
            stop_if_not_finite(logs, f"at offline step {offline_step}", state_path)
        if offline_step % args.log_every == 0 or last:
            sps = (offline_step - last_step) / (time.time() - start_time)
            start_time, last_step = time.time(), offline_step
            for k, v in logs.items():
                writer.add_scalar(f"offline/losses/{k}", v, offline_step)
            writer.add_scalar("offline/charts/SPS", sps, offline_step)
            print(
                f"offline step {offline_step:,}/{args.offline_steps:,} | qf {logs['qf_loss']:.3f}"
                f" | actor {logs['actor_loss']:.3f} | Q {logs['q_data']:.2f} | "
                f"advantage {logs['advantage']:.3f} | max weight {logs['weight_max']:.1f} | "
                f"{rate_text(sps)} SPS",
                flush=True,
            )
        if offline_step % args.save_every_offline == 0 or last:
            save_state(epoch=0)
        if last:  # the agent after the offline phase, for runs with --offline-steps 0
            checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata}
            save_checkpoint(offline_path, {**checkpoint, **agent.state_dict()})
            print(f"Wrote {offline_path}")
        progress(offline_step, printed=offline_step % args.log_every == 0 or last)

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
        returns = evaluate(agent.policy, eval_envs, seed + 10_000, device)
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
        log_evaluation(0)  # the agent after the offline phase, before any online step
    if resume and "env" in state:  # the saved run's episode, exactly where it was
        obs, episode_return = restore_env(env, state["env"])
    else:
        obs, episode_return = env.reset(seed=seed + start_epoch)[0], 0.0
    n_epochs = args.total_timesteps // args.epoch_length

    def act(obs):
        mean, log_std = agent.policy(torch.as_tensor(obs, dtype=torch.float32, device=device))
        return (mean + log_std.exp() * torch.randn_like(mean)).cpu().numpy()

    for epoch in range(start_epoch + 1, n_epochs + 1):
        # COLLECT an epoch with the stochastic policy; the replay keeps its unclipped actions
        epoch_start, step = time.time(), (epoch - 1) * args.epoch_length
        obs, episode_return, finished = collect(
            env, act, replay, obs, episode_return, args.epoch_length
        )
        for t, episodic_return in finished:
            writer.add_scalar("charts/episodic_return", episodic_return, step + t)
        step += args.epoch_length

        # TRAIN: as many gradient steps as new transitions, once min_steps_before_training are in
        n_updates = args.epoch_length if step > args.min_steps_before_training else 0
        sums, progress = {}, Progress(f"epoch {epoch}: update", n_updates)
        for update in range(1, n_updates + 1):
            logs = agent.update(replay.sample(args.batch_size))
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v
            progress(update)

        # LOG the epoch's means; a non-finite loss stops the run before it reaches a checkpoint
        means = {k: (v / n_updates).item() for k, v in sums.items()}
        stop_if_not_finite(means, f"in epoch {epoch}", state_path)
        for k, v in means.items():
            writer.add_scalar(f"losses/{k}", v, step)
        sps = args.epoch_length / (time.time() - epoch_start)
        writer.add_scalar("charts/SPS", sps, step)
        line = f"epoch {epoch}/{n_epochs} | "
        if means:
            line += f"qf {means['qf_loss']:.3f} | actor {means['actor_loss']:.3f} | "
            line += f"advantage {means['advantage']:.3f} | std {means['policy_std']:.3f} | "
        else:
            line += f"collecting ({step:,}/{args.min_steps_before_training:,} before training) | "
        print(f"{line}{rate_text(sps)} SPS", flush=True)

        # EVALUATE the deterministic policy, SAVE the whole state
        if epoch % args.eval_every == 0 or epoch == n_epochs:
            log_evaluation(step)
        if epoch % args.save_every == 0 or epoch == n_epochs:
            save_state(epoch, env_snapshot(env, obs, episode_return))
    writer.close()
    if tracking:
        tracking.finish()
    print(f"Wrote {state_path}")
