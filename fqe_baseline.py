"""Off2On, concept experiment: Fitted Q Evaluation of pretrained CQL actors, the non-pessimistic
critics that fine-tuning is compared against.

Lee, Seo, Lee, Abbeel, Shin, "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021, https://arxiv.org/abs/2107.00591 (section 3.3, Figures 1c
and 13, appendix C).

    python fqe_baseline.py --checkpoint checkpoints/cql__halfcheetah-medium-expert-v2__n5__seed1.pt

For each member of a cql_pretrain.py checkpoint, keep its actor pi_i and fit two fresh critics
from random initialization by policy evaluation on the offline data (FQE, Le et al. 2019):

    y_i = r + gamma (1 - d) (min_k Qtarget_ik(s', a') - alpha_i log pi_i(a'|s')),  a' ~ pi_i(.|s')

with alpha_i fixed at the member's value in the checkpoint. There is no CQL term, so the result
is SAC's soft Q-function of the *same* actors without pessimism. The output is a checkpoint in
cql_pretrain.py's format (actors and alpha unchanged, critics and targets replaced,
`critic_source: fqe`), which off2on_finetune.py fine-tunes with `--checkpoint ...__fqe.pt`. The
paper's FQE learning rate and batch size were lost from its text: Adam 3e-4, batch 256.
Docs: docs/concept_experiments.md.

Shared word for word with other scripts (tests/test_shared_blocks.py checks every copy):
    data [cql_pretrain off2on_finetune vae_shift_probe awac_finetune bcq_finetune]: D4RL_NAME
        GYM_IDS D4RL_REF_RETURNS RANDOM_DATASET_ID FIELDS DatasetError OfflineData make_env
        episodes_to_transitions load_d4rl_hdf5 load_minari_dataset load_offline_data scale_to_unit
        scale_to_env normalized_score
    layers [cql_pretrain off2on_finetune vae_shift_probe pixel_off2on]: VectorizedLinear
        vectorized_mlp LOG_STD_MIN
    actor [cql_pretrain off2on_finetune vae_shift_probe]: Actor
    critic [cql_pretrain off2on_finetune]: Critic
    policy [cql_pretrain off2on_finetune vae_shift_probe pixel_off2on]: tanh_gaussian_log_prob
        tanh_gaussian_sample
    checkpoints [cql_pretrain off2on_finetune vae_shift_probe pixel_off2on awac_finetune
        bcq_finetune]: CHECKPOINT_FORMAT CheckpointError load_checkpoint check_checkpoint_matches
    saving [cql_pretrain off2on_finetune pixel_off2on awac_finetune bcq_finetune]: save_checkpoint
        rng_state restore_rng_state
    progress [cql_pretrain off2on_finetune awac_finetune bcq_finetune pixel_off2on vae_shift_probe]:
        rate_text Progress
    tracking [cql_pretrain off2on_finetune awac_finetune bcq_finetune pixel_off2on vae_shift_probe]:
        start_tracking
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
    checkpoint: str = ""
    """the cql_pretrain.py checkpoint whose actors are evaluated (required)"""
    env_id: str | None = None
    """dataset to fit on, named as in cql_pretrain.py [default: the checkpoint's]"""
    dataset_path: str | None = None
    """a D4RL-format .hdf5 file to fit on instead [default: the checkpoint's]"""
    random_dataset_size: int | None = None
    """transitions in the generated `*-random-v2` dataset [default: the checkpoint's]"""
    total_steps: int = 250_000
    """gradient steps"""
    batch_size: int = 256
    """minibatch size per member (each member draws its own)"""
    lr: float = 3e-4
    """critic learning rate (Adam)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network soft-update rate"""
    seed: int = 1
    """seed of the run"""
    log_every: int = 1_000
    """steps between loss / Q logs and progress lines"""
    eval_every: int = 25_000
    """steps between Monte-Carlo checks of Q at start states"""
    mc_episodes: int = 5
    """rollouts per member in each Monte-Carlo check"""
    save_every: int = 25_000
    """steps between saves of the unfinished run to `{output_path}.partial` (a rerun resumes it)"""
    output_path: str | None = None
    """where to write the result [default: `{checkpoint without .pt}__fqe.pt`, next to it]"""
    cuda: bool = torch.cuda.is_available()
    """use CUDA"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    exp_name: str = "fqe"
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


# ---------------------------------------------------------------------------------------------
# Fitted Q Evaluation of N fixed actors, and what it is checked against
# ---------------------------------------------------------------------------------------------
class FQE:
    """Fresh critics fitted to the soft Q-function of each member's fixed actor. The loss is
    summed over members, so each member's gradient (and Adam update) is exactly its own."""

    def __init__(
        self, actor: Actor, log_alpha, obs_dim, action_dim, hidden_sizes, ensemble_size,
        gamma=0.99, tau=0.005, lr=3e-4, device="cpu",
    ):  # fmt: skip
        self.actor = actor.requires_grad_(False)
        self.ensemble_size, self.action_dim = ensemble_size, action_dim
        self.gamma, self.tau = gamma, tau
        self.alpha = log_alpha.exp().to(device)  # [N], fixed
        self.qf = Critic(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target = Critic(obs_dim, action_dim, hidden_sizes, ensemble_size).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=lr)

    def critic_loss(self, obs, actions, rewards, next_obs, terminations, noise):
        """Each member's Bellman MSE, both critics against the member's own target y_i, summed
        over members. Inputs [N, B, ...]; noise [N, B, A] draws a' ~ pi_i(.|s')."""
        with torch.no_grad():
            next_actions, next_log_pi = tanh_gaussian_sample(*self.actor(next_obs), noise)
            next_q = self.qf_target(next_obs, next_actions).min(1).values  # [N, B]
            soft_next_q = next_q - self.alpha[:, None] * next_log_pi
            target = rewards + self.gamma * (1 - terminations) * soft_next_q
        q = self.qf(obs, actions)  # [N, 2, B]
        bellman_loss = ((q - target[:, None]) ** 2).mean(-1)  # [N, 2]
        return bellman_loss.sum(), {"fqe_loss": bellman_loss.mean(), "q_data": q.mean()}

    def update(self, batch) -> dict:
        """One gradient step of every member's critics, then the soft target update.
        batch: (s, a, r, s', d), each [N, B, ...]."""
        obs = batch[0]
        noise = torch.randn(*obs.shape[:2], self.action_dim, device=obs.device)
        loss, logs = self.critic_loss(*batch, noise)
        self.qf_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.qf_optimizer.step()
        with torch.no_grad():
            targets, params = list(self.qf_target.parameters()), list(self.qf.parameters())
            torch._foreach_lerp_(targets, params, self.tau)
        return {k: v.detach() for k, v in logs.items()}

    def state_dict(self) -> dict:
        return {
            "qf": self.qf.state_dict(),
            "qf_target": self.qf_target.state_dict(),
            "qf_optimizer": self.qf_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict):
        self.qf.load_state_dict(state["qf"])
        self.qf_target.load_state_dict(state["qf_target"])
        self.qf_optimizer.load_state_dict(state["qf_optimizer"])


@torch.no_grad()
def q_data_and_random(qf: Critic, obs, actions) -> tuple[float, float]:
    """Mean over members and critics of Q(s, a_data) and of Q(s, a ~ U[-1, 1]): how a critic
    ranks actions the data never took."""
    random_actions = torch.rand_like(actions) * 2 - 1
    return qf(obs, actions).mean().item(), qf(obs, random_actions).mean().item()


@torch.no_grad()
def monte_carlo_check(
    actor: Actor, critics: dict, alpha, envs: list, gamma: float, seed: int, device
) -> dict:
    """Roll out each member's stochastic policy from the env's start states (E envs per member,
    all in lockstep) and compare min_k Q_ik(s_0, a_0) with the discounted soft return that Q
    estimates, G_0 = sum_t gamma^t r_t - alpha_i sum_{t>=1} gamma^t log pi_i(a_t|s_t).
    `critics` maps a name to a Critic. Returns per-member means: {"mc_return": [N], name: [N]}."""
    N, E = alpha.shape[0], len(envs) // alpha.shape[0]
    obs = np.stack([env.reset(seed=seed + j % E)[0] for j, env in enumerate(envs)])
    returns, discount, active = np.zeros(len(envs)), np.ones(len(envs)), np.ones(len(envs), bool)
    alphas, action_space, q_start = alpha.cpu().numpy().repeat(E), envs[0].action_space, {}
    generator = torch.Generator(device=device).manual_seed(seed)
    while active.any():
        x = torch.as_tensor(obs, dtype=torch.float32, device=device).view(N, E, -1)
        mean, log_std = actor(x)
        eps = torch.randn(mean.shape, device=device, generator=generator)
        actions, log_pi = tanh_gaussian_sample(mean, log_std, eps)  # [N, E, A], [N, E]
        if not q_start:  # t = 0
            for name, qf in critics.items():
                q_start[name] = qf(x, actions).min(1).values.mean(1).cpu().numpy()
        else:
            returns -= active * discount * alphas * log_pi.flatten().cpu().numpy()
        actions = actions.flatten(0, 1).cpu().numpy()
        for j in np.flatnonzero(active):
            action = scale_to_env(actions[j], action_space)
            obs[j], reward, terminated, truncated, _ = envs[j].step(action)
            returns[j] += discount[j] * reward
            active[j] = not (terminated or truncated)
        discount *= gamma
    return {"mc_return": returns.reshape(N, E).mean(1), **q_start}


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


def default_output_path(checkpoint: str) -> str:
    return f"{checkpoint[:-3] if checkpoint.endswith('.pt') else checkpoint}__fqe.pt"


def validate_args(args: Args):
    if not args.checkpoint:
        raise ValueError(
            "--checkpoint is required: the cql_pretrain.py checkpoint whose actors FQE evaluates"
        )
    for name in "total_steps batch_size log_every eval_every mc_episodes save_every".split():
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def dataset_of(args: Args, metadata: dict) -> tuple[str, str | None, int]:
    """--env-id / --dataset-path / --random-dataset-size, each defaulting to the checkpoint's."""
    saved = metadata.get("args", {})
    if args.env_id is None and "env_id" not in saved:
        raise CheckpointError(
            f"{args.checkpoint} records no dataset: pass --env-id (and --dataset-path if it was "
            "a file)"
        )
    env_id = args.env_id or saved["env_id"]
    saved_path = None if args.env_id else saved.get("dataset_path")  # not with another --env-id
    dataset_path = args.dataset_path or saved_path
    random_dataset_size = args.random_dataset_size or saved.get("random_dataset_size") or 1_000_000
    return env_id, dataset_path, random_dataset_size


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
    try:
        validate_args(args)
        output_path = args.output_path or default_output_path(args.checkpoint)
        partial_path = f"{output_path}.partial"
        if os.path.exists(output_path):
            raise ValueError(
                f"{output_path} exists: delete it, or pass --output-path to write elsewhere"
            )
        cql = load_checkpoint(args.checkpoint)
        meta = cql["metadata"]
        env_id, dataset_path, random_dataset_size = dataset_of(args, meta)
        data = load_offline_data(env_id, dataset_path, random_dataset_size)
        obs_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
        expected = {"env_id": data.env_spec.id, "obs_dim": obs_dim, "action_dim": action_dim}
        check_checkpoint_matches(meta, expected, args.checkpoint)
    except ValueError as e:  # DatasetError and CheckpointError included
        raise SystemExit(f"error: {e}")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    N, hidden_sizes = meta["ensemble_size"], meta["hidden_sizes"]
    actor = Actor(obs_dim, action_dim, hidden_sizes, N).to(device)
    actor.load_state_dict(cql["actor"])
    cql_qf = Critic(obs_dim, action_dim, hidden_sizes, N).to(device).requires_grad_(False)
    cql_qf.load_state_dict(cql["qf"])
    fqe = FQE(
        actor, cql["log_alpha"], obs_dim, action_dim, hidden_sizes, N, args.gamma, args.tau,
        args.lr, device,
    )  # fmt: skip
    # the output: the CQL checkpoint with its critics replaced
    metadata = {**meta, "dataset_id": data.dataset_id, "critic_source": "fqe"}
    metadata["fqe_args"] = asdict(args)

    start_step, run_name = 0, f"{data.dataset_id.replace('/', '-')}__{args.exp_name}__{args.seed}"
    run_name += f"__{int(time.time())}"
    wandb_id = None
    if os.path.exists(partial_path):  # a rerun continues the unfinished run
        keys = ("dataset_id", "env_id", "obs_dim", "action_dim", "hidden_sizes", "ensemble_size")
        try:
            state = load_checkpoint(partial_path)
            expected = {k: metadata[k] for k in keys}
            check_checkpoint_matches(state["metadata"], expected, partial_path)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
        fqe.load_state_dict(state)
        start_step, run_name = state["global_step"], state["run_name"]
        wandb_id = state.get("wandb_id")
        restore_rng_state(state["rng"])
        print(f"Continuing {partial_path} at step {start_step:,}")

    tracking = start_tracking(args, run_name, wandb_id)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    alphas = np.array2string(fqe.alpha.cpu().numpy(), precision=4)
    print(
        f"FQE of the {N} actors of {args.checkpoint} on {data.dataset_id} ({len(data):,} "
        f"transitions, env {data.env_spec.id}), alpha fixed at {alphas}; {device}; "
        f"logs in runs/{run_name}"
    )
    dataset = [torch.as_tensor(getattr(data, field), device=device) for field in FIELDS]
    mc_envs = [make_env(data.env_spec) for _ in range(N * args.mc_episodes)]

    def save(path, step):
        checkpoint = {"format_version": CHECKPOINT_FORMAT, "metadata": metadata}
        checkpoint |= {"actor": cql["actor"], "log_alpha": cql["log_alpha"], **fqe.state_dict()}
        state = {"global_step": step, "run_name": run_name, "rng": rng_state()}
        state["wandb_id"] = tracking.id if tracking else None
        writer.flush()  # the logs up to this state are on disk before the state is
        save_checkpoint(path, {**checkpoint, **state})

    start_time, last_step = time.time(), start_step
    progress = Progress("FQE step", args.total_steps, start_step)
    for step in range(start_step + 1, args.total_steps + 1):
        # ALGO LOGIC: each member its own minibatch, one FQE step of all N
        idx = torch.randint(len(data), (N, args.batch_size), device=device)
        batch = [x[idx] for x in dataset]
        logs = fqe.update(batch)

        # LOG the loss, and how each critic ranks the data's actions against random ones
        last = step == args.total_steps
        if step % args.log_every == 0 or last:
            logs = {k: v.item() for k, v in logs.items()}
            if not all(math.isfinite(v) for v in logs.values()):
                raise SystemExit(
                    f"error: non-finite FQE loss at step {step} ({logs}); progress up to the "
                    f"last save is in {partial_path}. Try a lower --lr"
                )
            fqe_data, fqe_random = q_data_and_random(fqe.qf, batch[0], batch[1])
            cql_data, cql_random = q_data_and_random(cql_qf, batch[0], batch[1])
            sps = (step - last_step) / (time.time() - start_time)
            start_time, last_step = time.time(), step
            writer.add_scalar("losses/fqe_loss", logs["fqe_loss"], step)
            writer.add_scalar("charts/fqe_q_data", fqe_data, step)
            writer.add_scalar("charts/fqe_q_random", fqe_random, step)
            writer.add_scalar("charts/cql_q_data", cql_data, step)
            writer.add_scalar("charts/cql_q_random", cql_random, step)
            writer.add_scalar("charts/SPS", sps, step)
            print(
                f"step {step:,}/{args.total_steps:,} | fqe loss {logs['fqe_loss']:.4f} | "
                f"Q data/random: FQE {fqe_data:.2f}/{fqe_random:.2f}, "
                f"CQL {cql_data:.2f}/{cql_random:.2f} | {rate_text(sps)} SPS",
                flush=True,
            )

        # MONTE-CARLO CHECK of both critics at start states (SPS counts training only)
        if step % args.eval_every == 0 or last:
            eval_start = time.time()
            critics = {"fqe": fqe.qf, "cql": cql_qf}
            mc = monte_carlo_check(
                actor, critics, fqe.alpha, mc_envs, args.gamma, args.seed + 10_000, device
            )
            for name in critics:
                writer.add_scalar(f"eval/{name}_q_start", mc[name].mean(), step)
                writer.add_scalar(f"eval/{name}_q_vs_mc", (mc[name] - mc["mc_return"]).mean(), step)
            writer.add_scalar("eval/mc_return", mc["mc_return"].mean(), step)
            members = {k: np.array2string(mc[k], precision=1) for k in ("mc_return", "fqe")}
            print(
                f"Monte-Carlo check at step {step:,}: discounted soft return "
                f"{mc['mc_return'].mean():.2f}, Q(s0, a0): FQE {mc['fqe'].mean():.2f}, "
                f"CQL {mc['cql'].mean():.2f} (per member: MC {members['mc_return']}, "
                f"FQE {members['fqe']})",
                flush=True,
            )
            start_time += time.time() - eval_start

        # SAVE the unfinished run; a rerun continues it
        if step % args.save_every == 0 and not last:
            save(partial_path, step)
        progress(step, printed=step % args.log_every == 0 or last)
    save(output_path, args.total_steps)
    if os.path.exists(partial_path):
        os.remove(partial_path)
    writer.close()
    if tracking:
        tracking.finish()
    command = f"python off2on_finetune.py --env-id {env_id} --ensemble-size {N}"
    if dataset_path:
        command += f" --dataset-path {dataset_path}"
    elif (d4rl := D4RL_NAME.match(env_id)) and d4rl.group(2) == "random":
        command += f" --random-dataset-size {random_dataset_size}"
    print(f"Wrote {output_path}: fine-tune from it with `{command} --checkpoint {output_path}`")
