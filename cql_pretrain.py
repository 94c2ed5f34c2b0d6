"""Off2On, offline phase: an ensemble of N independent CQL agents, vectorized in one process.

Lee, Seo, Lee, Abbeel, Shin, "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021, https://arxiv.org/abs/2107.00591 (section 4.2, eq. 3).

    python cql_pretrain.py --env-id halfcheetah-medium-v2 --ensemble-size 5

Each agent is a SAC agent (tanh-Gaussian actor, two critics, learned temperature) trained with
CQL(H), as in the original CQL code (https://github.com/aviralkumar2907/CQL), whose loss and
defaults this follows. The authors of Off2On released no pretraining code, only five CQL agents
for halfcheetah-medium (https://github.com/shlee94/Off2OnRL), whose networks these match. The
checkpoint written here is what off2on_finetune.py fine-tunes. Docs: docs/cql_pretrain.md; the
method, its equations and where we differ from the paper: docs/algorithm.md.

Shared word for word with other scripts (tests/test_shared_blocks.py checks every copy):
    data [off2on_finetune fqe_baseline vae_shift_probe awac_finetune bcq_finetune]: D4RL_NAME
        GYM_IDS D4RL_REF_RETURNS RANDOM_DATASET_ID FIELDS DatasetError OfflineData make_env
        episodes_to_transitions load_d4rl_hdf5 load_minari_dataset load_offline_data scale_to_unit
        scale_to_env normalized_score
    layers [off2on_finetune fqe_baseline vae_shift_probe pixel_off2on]: VectorizedLinear
        vectorized_mlp LOG_STD_MIN
    actor [off2on_finetune fqe_baseline vae_shift_probe]: Actor
    critic [off2on_finetune fqe_baseline]: Critic
    policy [off2on_finetune fqe_baseline vae_shift_probe pixel_off2on]: tanh_gaussian_log_prob
        tanh_gaussian_sample
    merged policy [off2on_finetune vae_shift_probe pixel_off2on]: ensemble_gaussian
    CQL term [off2on_finetune pixel_off2on]: cql_proposals cql_gap
    CQL term, state-based [off2on_finetune]: q_data_and_proposals
    checkpoints [off2on_finetune fqe_baseline vae_shift_probe pixel_off2on awac_finetune
        bcq_finetune]: CHECKPOINT_FORMAT CheckpointError load_checkpoint check_checkpoint_matches
    saving [off2on_finetune fqe_baseline pixel_off2on awac_finetune bcq_finetune]: save_checkpoint
        rng_state restore_rng_state
    resuming [off2on_finetune pixel_off2on awac_finetune bcq_finetune]: check_same_settings
    checkpoint path [off2on_finetune vae_shift_probe]: default_checkpoint_path
    progress [off2on_finetune awac_finetune bcq_finetune pixel_off2on fqe_baseline vae_shift_probe]:
        rate_text Progress
    tracking [off2on_finetune awac_finetune bcq_finetune fqe_baseline pixel_off2on vae_shift_probe]:
        start_tracking
    videos [off2on_finetune awac_finetune bcq_finetune]: VideoRecorder
"""

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
    """a D4RL-format .hdf5 file to train on instead of a Minari dataset"""
    random_dataset_size: int = 1_000_000
    """transitions in the locally generated uniform-random dataset (`*-random-v2`)"""
    dataset_only: bool = False
    """make (or check) the dataset, print its size, and exit"""
    rollout_dataset: str | None = None
    """instead, make a dataset by rolling out this checkpoint's agents (stochastic actions, taking
    turns by episode) in `--env-id`'s environment, `--rollout-steps` steps, and exit"""
    rollout_steps: int = 1_000_000
    """transitions in a `--rollout-dataset`"""
    import_rlkit: str | None = None
    """instead, convert the authors' released agents (a folder of `..._seed<k>/` sub-folders with
    rlkit's actor_<step>.pt, critic1_<step>.pt, critic2_<step>.pt) into a checkpoint for
    `--env-id` at `--checkpoint-path`, and exit"""
    ensemble_size: int = 5
    """number of independent CQL agents N"""
    seed: int = 1
    """seed of the run"""
    total_steps: int = 1_000_000
    """gradient steps per agent"""
    batch_size: int = 256
    """minibatch size per agent"""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden sizes of actor and critics (the paper: 256 256 256 for halfcheetah-medium-expert)"""
    cql_alpha: float = 5.0
    """weight of the CQL regularizer (eq. 3)"""
    cql_n_actions: int = 10
    """M: actions of each kind (uniform, pi(.|s), pi(.|s')) in the CQL logsumexp estimate"""
    bc_steps: int = 40_000
    """initial steps in which the actor does behaviour cloning instead of maximizing Q"""
    deterministic_backup: bool = True
    """leave the entropy term out of the offline Bellman target, as the original CQL code does"""
    policy_lr: float = 1e-4
    """actor learning rate"""
    q_lr: float = 3e-4
    """critic learning rate"""
    alpha_lr: float = 1e-4
    """entropy temperature learning rate"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network soft-update rate"""
    log_every: int = 1_000
    """steps between loss logs and progress lines"""
    eval_every: int = 10_000
    """steps between evaluations of the ensemble and of each member"""
    eval_episodes: int = 5
    """deterministic episodes per policy and evaluation"""
    save_every: int = 10_000
    """steps between (atomic) checkpoints of the whole training state"""
    checkpoint_path: str | None = None
    """where to write the checkpoint [default: checkpoints/cql__{env_id}__n{N}__seed{seed}.pt]"""
    resume: bool = False
    """continue from the checkpoint at `--checkpoint-path` if it exists"""
    cuda: bool = torch.cuda.is_available()
    """use CUDA"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    exp_name: str = "cql_pretrain"
    """name of the experiment, part of the run name"""
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
# Losses (eq. 3 for the critics, eq. 2 for the actor) and the update of all N agents
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


class CQLEnsemble:
    """N CQL agents trained side by side. Every loss is summed over members, so each member's
    gradient (and, Adam being elementwise, each member's update) is exactly its own."""

    def __init__(
        self,
        obs_dim,
        action_dim,
        hidden_sizes=(256, 256),
        ensemble_size=5,
        cql_alpha=5.0,
        cql_n_actions=10,
        gamma=0.99,
        tau=0.005,
        policy_lr=1e-4,
        q_lr=3e-4,
        alpha_lr=1e-4,
        deterministic_backup=True,
        device="cpu",
    ):
        self.obs_dim, self.action_dim, self.ensemble_size = obs_dim, action_dim, ensemble_size
        self.cql_alpha, self.cql_n_actions = cql_alpha, cql_n_actions
        self.gamma, self.tau = gamma, tau
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
            next_pi = self.actor(next_obs)  # mean, log_std at s'
            next_actions, next_log_pi = tanh_gaussian_sample(*next_pi, noise["target"])
            next_q = self.qf_target(next_obs, next_actions).min(1).values  # [N, B]
            if not self.deterministic_backup:
                next_q = next_q - self.log_alpha.exp()[:, None] * next_log_pi
            target = rewards + self.gamma * (1 - terminations) * next_q
            proposals, log_density = cql_proposals(mean, log_std, *next_pi, noise)
        q = q_data_and_proposals(self.qf, obs, actions, proposals)
        q_data = q[:, :, 0]  # [N, 2, B]
        bellman_loss = ((q_data - target[:, None]) ** 2).mean(-1)  # [N, 2]: MSE, as CQL's code
        cql_loss = cql_gap(q, log_density)  # [N, 2]
        loss = (bellman_loss + self.cql_alpha * cql_loss).sum()
        logs = {"qf_loss": bellman_loss.mean(), "cql_loss": cql_loss.mean()}
        return loss, {**logs, "q_data": q_data.mean()}

    def actor_loss(self, obs, actions, mean, log_std, noise, behaviour_cloning: bool):
        """E[alpha log pi(a|s) - min_k Q_k(s, a)] (eq. 2), or for the first bc_steps
        E[alpha log pi(a|s) - log pi(a_data|s)]; plus the temperature loss. Summed over members."""
        pi_actions, log_pi = tanh_gaussian_sample(mean, log_std, noise["actor"])  # [N, B, (A)]
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
        the updated critics, then the targets. batch: (s, a, r, s', d), each [N, B, ...]."""
        obs, actions, rewards, next_obs, terminations = batch
        noise = self.draw_noise(obs.shape[1]) if noise is None else noise
        mean, log_std = self.actor(obs)
        qf_loss, logs = self.critic_loss(*batch, mean.detach(), log_std.detach(), noise)
        self.qf_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.qf_optimizer.step()

        self.qf.requires_grad_(False)  # the actor loss only trains the actors
        losses = self.actor_loss(obs, actions, mean, log_std, noise, behaviour_cloning)
        actor_loss, alpha_loss, actor_logs = losses
        self.qf.requires_grad_(True)
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


def record_dataset(dataset_id: str, env, size: int, act, seed: int, **about):
    """Roll out `act(obs, episode) -> env action` for `size` steps and store the episodes as a
    local Minari dataset (the last one cut at `size`, as a truncation). No reference scores are
    stored: load_offline_data scores the locomotion envs with D4RL's."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers, steps, start_time = [], 0, time.time()
    while steps < size:
        obs, _ = env.reset(seed=seed + len(buffers))
        ep = {
            "observations": [obs],
            "actions": [],
            "rewards": [],
            "terminations": [],
            "truncations": [],
        }
        done = False
        while not done:
            action = act(obs, len(buffers))
            obs, reward, terminated, truncated, _ = env.step(action)
            steps += 1
            truncated = truncated or steps == size
            for k, v in zip(ep, (obs, action, reward, terminated, truncated)):
                ep[k].append(v)
            done = terminated or truncated
            if steps % 100_000 == 0:
                rate = steps / (time.time() - start_time)
                print(f"  {steps:,}/{size:,} steps ({rate:,.0f} steps/s)", flush=True)
        buffers.append(EpisodeBuffer(id=len(buffers), **{k: np.asarray(v) for k, v in ep.items()}))
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=env, eval_env=env.spec, author="off2on", author_email="none",
        code_permalink="cql_pretrain.py", **about,
    )  # fmt: skip


def existing_dataset(dataset_id: str):
    """The local Minari dataset, or None if it is missing or was left half-written (deleted)."""
    import minari

    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        return None
    except Exception as e:  # a generation interrupted while writing: make it again
        print(f"{dataset_id} is unreadable ({type(e).__name__}): generating it again", flush=True)
        minari.delete_dataset(dataset_id)


def make_random_dataset(env_name: str, size: int, seed: int = 0):
    """Roll out a uniform-random policy for `size` steps in the v5 env and store it as a local
    Minari dataset, once: it stands in for D4RL's random-v2 files, which can't be downloaded."""
    dataset_id = RANDOM_DATASET_ID.format(env_name=env_name, size=size)
    if (dataset := existing_dataset(dataset_id)) is not None:
        return dataset
    env = make_env(gym.spec(GYM_IDS[env_name]))
    env.action_space.seed(seed)
    print(
        f"Generating {dataset_id}: {size:,} uniform-random steps in {env.spec.id} ...", flush=True
    )
    return record_dataset(
        dataset_id, env, size, lambda obs, episode: env.action_space.sample(), seed,
        algorithm_name="uniform-random policy",
        description=f"{size} steps of a uniform-random policy in {env.spec.id} "
        f"(stands in for D4RL's {env_name}-random-v2)",
    )  # fmt: skip


ROLLOUT_DATASET_ID = "off2on/{env_name}/rollout-{name}-n{size}-v0"  # made by cql_pretrain.py


def env_spec_of(env_id: str):
    """The environment of a D4RL-style name or a Gymnasium id, without reading any dataset."""
    if name := D4RL_NAME.match(env_id):
        return gym.spec(GYM_IDS[name.group(1)])
    try:
        return gym.spec(env_id)
    except gym.error.Error:
        msg = f"--env-id {env_id} is neither a D4RL-style name nor a Gymnasium env id"
        raise DatasetError(msg) from None


def make_rollout_dataset(checkpoint_path: str, env_id: str, size: int, seed: int = 0):
    """Roll out a pretrained checkpoint's agents for `size` steps, stochastic actions, member
    `episode % N` acting in each episode, and store it as a local Minari dataset, once. D4RL
    made its medium sets the same way from one partly trained policy; this stands in for them
    where they can't be downloaded (docs/cql_pretrain.md, "Rollout datasets")."""
    checkpoint = load_checkpoint(checkpoint_path)
    meta = checkpoint["metadata"]
    env_spec = env_spec_of(env_id)
    env_name = next((k for k, v in GYM_IDS.items() if v.startswith(env_spec.name)), None)
    stem = re.sub(r"[^a-z0-9]+", "-", os.path.basename(checkpoint_path).lower()[: -len(".pt")])
    dataset_id = ROLLOUT_DATASET_ID.format(
        env_name=env_name or env_spec.name.lower(), name=stem.strip("-"), size=size
    )
    if (dataset := existing_dataset(dataset_id)) is not None:
        return dataset
    env = make_env(env_spec)
    dims = {"obs_dim": env.observation_space.shape[0], "action_dim": env.action_space.shape[0]}
    check_checkpoint_matches(meta, dims, checkpoint_path)
    N = meta["ensemble_size"]
    actor = Actor(dims["obs_dim"], dims["action_dim"], meta["hidden_sizes"], N)
    actor.load_state_dict(checkpoint["actor"])
    generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def act(obs, episode):
        i = episode % N
        mean, log_std = actor(torch.as_tensor(obs, dtype=torch.float32).expand(N, 1, -1))
        eps = torch.randn(mean.shape[-1], generator=generator)
        action = tanh_gaussian_sample(mean[i, 0], log_std[i, 0], eps)[0].numpy()
        return scale_to_env(action, env.action_space)

    print(
        f"Generating {dataset_id}: {size:,} steps of the {N} agents of {checkpoint_path} "
        f"(stochastic, taking turns by episode) in {env.spec.id} ...",
        flush=True,
    )
    return record_dataset(
        dataset_id, env, size, act, seed, algorithm_name=f"rollouts of {checkpoint_path}",
        description=f"{size} steps of stochastic rollouts of the {N} agents of "
        f"{checkpoint_path} in {env.spec.id}, taking turns by episode (stands in for a "
        f"D4RL dataset that can't be downloaded here)",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Evaluation and checkpoints
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(actor: Actor, envs: list, seed: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic returns of each member and of the merged policy, all envs in lockstep.
    `envs` holds (N + 1) * E envs: E for each member, then E for the merged policy.
    Returns member returns [N, E] and merged-policy returns [E]."""
    N = actor.net[0].weight.shape[0]
    E = len(envs) // (N + 1)
    obs = np.stack([env.reset(seed=seed + j % E)[0] for j, env in enumerate(envs)])
    returns, active = np.zeros(len(envs)), np.ones(len(envs), bool)
    while active.any():
        x = torch.as_tensor(obs, dtype=torch.float32, device=device).view(N + 1, E, -1)
        mean, log_std = actor(torch.cat([x[:-1], x[-1:].expand(N, -1, -1)], 1))  # [N, 2E, A]
        merged_mean, _ = ensemble_gaussian(mean[:, E:], log_std[:, E:])
        actions = torch.tanh(torch.cat([mean[:, :E].flatten(0, 1), merged_mean])).cpu().numpy()
        for j in np.flatnonzero(active):
            action = scale_to_env(actions[j], envs[j].action_space)
            obs[j], reward, terminated, truncated, _ = envs[j].step(action)
            returns[j] += reward
            active[j] = not (terminated or truncated)
    returns = returns.reshape(N + 1, E)
    return returns[:-1], returns[-1]


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


def default_checkpoint_path(env_id: str, ensemble_size: int, seed: int) -> str:
    return f"checkpoints/cql__{env_id.replace('/', '-')}__n{ensemble_size}__seed{seed}.pt"


RLKIT_AGENT_DIR = re.compile(r"(?:^|_)seed(\d+)$")  # the authors': halfcheetah-medium-v0_seed4
RLKIT_KEYS = {  # rlkit's Linear layers fc0, fc1, ... then the heads, concatenated in this order
    "actor": ("last_fc", "last_fc_log_std"),
    "critic1": ("last_fc",),
    "critic2": ("last_fc",),
}


def rlkit_to_vectorized(state_dicts: list[tuple[dict, str]], heads, sizes, env_id) -> dict:
    """rlkit MLPs (`fc{j}` then `heads`; torch Linear weights [out, in]), one state dict per
    member (with its file's name) -> the state dict of one vectorized_mlp: weight [N, in, out]
    = W^T, bias [N, 1, out]. Several heads become one last layer, their outputs side by side.
    Every member must have the layer sizes `sizes` = [in, *hidden, out]."""
    names = [f"fc{j}" for j in range(len(sizes) - 2)]
    keys = sorted(f"{n}.{p}" for n in (*names, *heads) for p in ("weight", "bias"))
    layers = []
    for sd, path in state_dicts:
        if sorted(sd) != keys:
            raise CheckpointError(
                f"{path} is not an rlkit state dict of this kind: it has {sorted(sd)[:8]}, "
                f"expected {keys}"
            )
        head = [torch.cat([sd[f"{h}.{p}"] for h in heads]) for p in ("weight", "bias")]
        member = [(sd[f"{n}.weight"], sd[f"{n}.bias"]) for n in names] + [tuple(head)]
        shapes = [(w.shape[1], *b.shape) if w.dim() == 2 else w.shape for w, b in member]
        if shapes != (expected := list(zip(sizes[:-1], sizes[1:]))):
            raise CheckpointError(
                f"{path} has layers (in, out) {shapes}, but {env_id} with hidden sizes "
                f"{sizes[1:-1]} needs {expected}"
            )
        layers.append(member)
    state = {}
    for j, layer in enumerate(zip(*layers)):  # layer j of every member; ReLUs sit in between
        state[f"net.{2 * j}.weight"] = torch.stack([w.T for w, _ in layer]).float()
        state[f"net.{2 * j}.bias"] = torch.stack([b[None] for _, b in layer]).float()
    return state


def import_rlkit(folder: str, ensemble_size: int, env) -> tuple[dict, dict]:
    """The authors' released CQL agents (https://github.com/shlee94/Off2OnRL, folder
    rlkit/data/cql/): one sub-folder per agent, `..._seed{k}`, holding rlkit state dicts
    actor_{step}.pt, critic1_{step}.pt, critic2_{step}.pt. The first N agents in increasing seed
    order become members 0..N-1, as the official launcher builds its ensemble (seeds 4i + seed);
    target critics start as copies of the critics, as there. Returns the checkpoint's networks
    and what to add to its metadata."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"--import-rlkit {folder} is not a folder")
    agents = sorted(
        (int(m.group(1)), d)
        for d in os.listdir(folder)
        if (m := RLKIT_AGENT_DIR.search(d)) and os.path.isdir(os.path.join(folder, d))
    )
    if len(agents) < ensemble_size:
        raise CheckpointError(
            f"--import-rlkit {folder} holds {len(agents)} agent folders (named ..._seed<k>), "
            f"fewer than --ensemble-size {ensemble_size}"
        )
    parts, steps = {part: [] for part in RLKIT_KEYS}, []
    for _, name in agents[:ensemble_size]:
        path = os.path.join(folder, name)
        saved = [re.fullmatch(r"actor_(\d+)\.pt", f) for f in os.listdir(path)]
        if not (saved := [int(m.group(1)) for m in saved if m]):
            raise CheckpointError(f"{path} holds no actor_<step>.pt")
        steps.append(max(saved))
        for part in RLKIT_KEYS:
            file = os.path.join(path, f"{part}_{steps[-1]}.pt")
            if not os.path.isfile(file):
                raise CheckpointError(f"{file} is missing: each agent needs {list(RLKIT_KEYS)}")
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{file} is not a readable torch file ({type(e).__name__})")
            if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
                raise CheckpointError(f"{file} is not a state dict (a dict of tensors)")
            parts[part].append((sd, file))
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    first = parts["actor"][0][0]  # its hidden sizes, which every network must share
    hidden_sizes = [
        first[f"fc{j}.weight"].shape[0] for j in range(len(first)) if f"fc{j}.weight" in first
    ]
    sizes = [obs_dim, *hidden_sizes, 2 * action_dim]
    actor = rlkit_to_vectorized(parts["actor"], RLKIT_KEYS["actor"], sizes, env.spec.id)
    # member 2i + k of our Critic is critic k + 1 of agent i
    critics = [c for pair in zip(parts["critic1"], parts["critic2"]) for c in pair]
    sizes = [obs_dim + action_dim, *hidden_sizes, 1]
    qf = rlkit_to_vectorized(critics, RLKIT_KEYS["critic1"], sizes, env.spec.id)
    log_alpha = torch.zeros(ensemble_size)  # not released; fine-tuning restarts alpha at 1
    qf_target = {k: v.clone() for k, v in qf.items()}
    networks = {"actor": actor, "qf": qf, "qf_target": qf_target, "log_alpha": log_alpha}
    about = {
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "hidden_sizes": hidden_sizes,
        "imported_from": {
            "folder": os.path.abspath(folder),
            "agents": [name for _, name in agents[:ensemble_size]],
            "steps": steps,
        },
    }
    return networks, about


# settings that may change when a run is resumed: they don't change what is computed
NOT_SETTINGS = ("resume", "cuda", "torch_deterministic", "total_steps", "log_every", "eval_every")
NOT_SETTINGS += ("eval_episodes", "save_every", "exp_name", "checkpoint_path", "dataset_only")
NOT_SETTINGS += ("rollout_dataset", "rollout_steps", "import_rlkit")
NOT_SETTINGS += ("track", "wandb_project_name", "wandb_entity", "capture_video")
NOT_SETTINGS += ("video_every",)


def validate_args(args: Args):
    for name, value in vars(args).items():  # counts, sizes and periods
        if type(value) is int and name not in ("seed", "bc_steps") and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.hidden_sizes or min(args.hidden_sizes) < 1:
        raise ValueError(f"--hidden-sizes must be positive integers, got {args.hidden_sizes}")


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
    N, seed = args.ensemble_size, args.seed
    checkpoint_path = args.checkpoint_path or default_checkpoint_path(args.env_id, N, seed)
    saved_args = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()}
    try:
        validate_args(args)
        if args.rollout_dataset:
            dataset = make_rollout_dataset(args.rollout_dataset, args.env_id, args.rollout_steps)
            returns = [ep.rewards.sum() for ep in dataset.iterate_episodes()]
            print(
                f"{dataset.spec.dataset_id}: {dataset.total_steps:,} transitions, "
                f"{len(returns)} episodes, return {np.mean(returns):.1f} +- {np.std(returns):.1f}"
                f" (min {np.min(returns):.1f}, max {np.max(returns):.1f}); fine-tune on it with "
                f"--env-id {dataset.spec.dataset_id}"
            )
            raise SystemExit(0)
        if os.path.exists(checkpoint_path) and not (args.resume or args.dataset_only):
            raise ValueError(
                f"{checkpoint_path} exists: pass --resume to continue it, "
                "or --checkpoint-path to write elsewhere"
            )
        if args.import_rlkit:
            env = make_env(env_spec_of(args.env_id))
            networks, about = import_rlkit(args.import_rlkit, N, env)
            metadata = {  # no dataset: fine-tuning checks the environment instead
                **about, "ensemble_size": N, "dataset_id": None, "env_id": env.spec.id,
                "critic_source": "cql", "args": saved_args,
            }  # fmt: skip
            checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata, **networks}
            save_checkpoint(checkpoint_path, checkpoint)
            agents = ", ".join(about["imported_from"]["agents"])
            print(f"Wrote {checkpoint_path}: members 0-{N - 1} from {agents} ({env.spec.id})")
            raise SystemExit(0)
        name = D4RL_NAME.match(args.env_id)
        if name and name.group(2) == "random" and args.dataset_path is None:
            make_random_dataset(name.group(1), args.random_dataset_size)
        data = load_offline_data(args.env_id, args.dataset_path, args.random_dataset_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.dataset_only:
        print(f"{data.dataset_id}: {len(data):,} transitions, env {data.env_spec.id}")
        raise SystemExit(0)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.manual_seed(seed)
    np.random.seed(seed)
    obs_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    metadata = {  # what a checkpoint says about itself (docs/cql_pretrain.md, "Checkpoints")
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "hidden_sizes": list(args.hidden_sizes),
        "ensemble_size": N,
        "dataset_id": data.dataset_id,
        "env_id": data.env_spec.id,
        "critic_source": "cql",
        "args": saved_args,
    }
    agents = CQLEnsemble(
        obs_dim, action_dim, args.hidden_sizes, N, args.cql_alpha, args.cql_n_actions, args.gamma,
        args.tau, args.policy_lr, args.q_lr, args.alpha_lr, args.deterministic_backup, device,
    )  # fmt: skip

    start_step, run_name = 0, f"{args.env_id.replace('/', '-')}__{args.exp_name}__{seed}"
    run_name += f"__{int(time.time())}"
    wandb_id = None
    if os.path.exists(checkpoint_path):  # --resume
        keys = ("dataset_id", "env_id", "obs_dim", "action_dim", "hidden_sizes", "ensemble_size")
        try:
            checkpoint = load_checkpoint(checkpoint_path)
            saved = checkpoint["metadata"]
            check_checkpoint_matches(saved, {k: metadata[k] for k in keys}, checkpoint_path)
            check_same_settings(saved["args"], metadata["args"], checkpoint_path, NOT_SETTINGS)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
        agents.load_state_dict(checkpoint)
        start_step, run_name = checkpoint["global_step"], checkpoint["run_name"]
        wandb_id = checkpoint.get("wandb_id")
        restore_rng_state(checkpoint["rng"])
        if start_step >= args.total_steps:  # leave its logs alone
            print(f"{checkpoint_path} is complete ({start_step:,} steps): nothing to resume")
            raise SystemExit(0)
        print(f"Resuming {checkpoint_path} at step {start_step:,}")

    tracking = start_tracking(args, run_name, wandb_id)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    print(
        f"{data.dataset_id}: {len(data):,} transitions, env {data.env_spec.id}; normalized score "
        f"uses {data.ref_source}; {N} agents on {device}; logs in runs/{run_name}"
    )
    dataset = [torch.as_tensor(getattr(data, field), device=device) for field in FIELDS]
    eval_envs = [make_env(data.env_spec) for _ in range((N + 1) * args.eval_episodes)]
    video = N * args.eval_episodes  # the merged policy's first evaluation episode, rendered
    if args.capture_video:
        video_env = make_env(data.env_spec, render_mode="rgb_array", width=240, height=240)
        eval_envs[video] = VideoRecorder(video_env, f"videos/{run_name}")

    start_time, last_step = time.time(), start_step
    progress = Progress("CQL step", args.total_steps, start_step)
    for step in range(start_step + 1, args.total_steps + 1):
        # ALGO LOGIC: each agent its own minibatch, one gradient step of all N
        idx = torch.randint(len(data), (N, args.batch_size), device=device)
        logs = agents.update([x[idx] for x in dataset], behaviour_cloning=step <= args.bc_steps)

        # LOG, and stop on a non-finite loss before it reaches a checkpoint
        last = step == args.total_steps
        if step % args.log_every == 0 or step % args.save_every == 0 or last:
            logs = {k: v.item() for k, v in logs.items()}
            if not all(math.isfinite(v) for v in logs.values()):
                raise SystemExit(
                    f"error: non-finite loss at step {step} ({logs}); the last good checkpoint "
                    f"({checkpoint_path}) is kept. Try a lower --q-lr, --policy-lr or "
                    "--cql-alpha, and --resume from it"
                )
        if step % args.log_every == 0 or last:
            sps = (step - last_step) / (time.time() - start_time)
            start_time, last_step = time.time(), step
            for k, v in logs.items():
                writer.add_scalar(f"losses/{k}", v, step)
            writer.add_scalar("charts/SPS", sps, step)
            print(
                f"step {step:,}/{args.total_steps:,} | qf {logs['qf_loss']:.3f} | "
                f"cql {logs['cql_loss']:.3f} | actor {logs['actor_loss']:.3f} | "
                f"alpha {logs['alpha']:.4f} | Q {logs['q_data']:.2f} | {rate_text(sps)} SPS",
                flush=True,
            )

        # EVALUATE each member and the merged policy (SPS counts training only)
        if step % args.eval_every == 0 or last:
            eval_start = time.time()
            earlier = step // args.eval_every - 1  # evaluations before this one
            if args.capture_video and (earlier % args.video_every == 0 or last):
                eval_envs[video].start()
            member_returns, merged_returns = evaluate(
                agents.actor, eval_envs, seed + 10_000, device
            )
            if args.capture_video and eval_envs[video].frames is not None:
                print(f"video: {eval_envs[video].save(writer, step)}")
            writer.add_scalar("eval/return", merged_returns.mean(), step)
            for i, r in enumerate(member_returns.mean(1)):
                writer.add_scalar(f"eval/member{i}_return", r, step)
            line = f"eval step {step:,}: ensemble return {merged_returns.mean():.1f}"
            if data.ref_returns is not None:
                member_scores = normalized_score(member_returns.mean(1), data.ref_returns)
                score = normalized_score(merged_returns.mean(), data.ref_returns)
                writer.add_scalar("eval/normalized_score", score, step)
                for i, s in enumerate(member_scores):
                    writer.add_scalar(f"eval/member{i}_normalized_score", s, step)
                members = np.array2string(member_scores, precision=1)
                line += f" (normalized {score:.1f}); members {members}"
            if data.minari_ref_returns is not None:  # Minari's scale, beside D4RL's
                minari_score = normalized_score(merged_returns.mean(), data.minari_ref_returns)
                writer.add_scalar("eval/minari_normalized_score", minari_score, step)
            print(line, flush=True)
            start_time += time.time() - eval_start

        # SAVE the whole training state, atomically
        if step % args.save_every == 0 or last:
            state = {"global_step": step, "run_name": run_name, "rng": rng_state()}
            state["wandb_id"] = tracking.id if tracking else None
            checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata}
            writer.flush()  # the logs up to this state are on disk before the state is
            save_checkpoint(checkpoint_path, {**checkpoint, **agents.state_dict(), **state})
        progress(step, printed=step % args.log_every == 0 or last)
    writer.close()
    if tracking:
        tracking.finish()
    print(f"Wrote {checkpoint_path}")
