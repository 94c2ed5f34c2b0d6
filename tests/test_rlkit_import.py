"""Importing the authors' released CQL agents (rlkit state dicts) and making a dataset by rolling
out a checkpoint's agents. The rlkit files are built here, in the released layout, with small
hidden sizes: one folder `halfcheetah-medium-v0_seed{k}` per agent holding actor_{step}.pt,
critic1_{step}.pt, critic2_{step}.pt."""

import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cql_pretrain import (
    D4RL_REF_RETURNS,
    Actor,
    Critic,
    import_rlkit,
    load_offline_data,
    make_env,
    make_rollout_dataset,
    save_checkpoint,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBS, ACT, HIDDEN = 17, 6, (24, 20)  # HalfCheetah's dims; unequal hidden sizes catch transposes
SEEDS = (0, 4, 8, 12)  # as strings, 12 sorts before 4: the members must follow the numbers


def rlkit_mlp(in_dim, hidden, heads, gen):
    """An rlkit state dict: fc0, fc1, ... then the heads, torch Linear layout [out, in]."""
    sd, sizes = {}, [in_dim, *hidden]
    for j, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        sd[f"fc{j}.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
        sd[f"fc{j}.bias"] = torch.randn(n_out, generator=gen)
    for name, n_out in heads.items():
        sd[f"{name}.weight"] = torch.randn(n_out, sizes[-1], generator=gen) / sizes[-1] ** 0.5
        sd[f"{name}.bias"] = torch.randn(n_out, generator=gen)
    return sd


def write_agents(folder, seeds=SEEDS, hidden=HIDDEN, step=1000):
    """Released layout; returns {seed: {"actor": sd, "critic1": sd, "critic2": sd}}."""
    agents, gen = {}, torch.Generator().manual_seed(0)
    for seed in seeds:
        path = folder / f"halfcheetah-medium-v0_seed{seed}"
        path.mkdir(parents=True)
        agents[seed] = {
            "actor": rlkit_mlp(OBS, hidden, {"last_fc": ACT, "last_fc_log_std": ACT}, gen),
            "critic1": rlkit_mlp(OBS + ACT, hidden, {"last_fc": 1}, gen),
            "critic2": rlkit_mlp(OBS + ACT, hidden, {"last_fc": 1}, gen),
        }
        for part, sd in agents[seed].items():
            torch.save(sd, path / f"{part}_{step}.pt")
    return agents


def rlkit_forward(sd, x, heads):
    """rlkit's Mlp, computed directly: ReLU hidden layers, then each head on the last one."""
    n_hidden = sum(1 for k in sd if k.startswith("fc") and k.endswith(".weight"))
    for j in range(n_hidden):
        x = F.relu(F.linear(x, sd[f"fc{j}.weight"], sd[f"fc{j}.bias"]))
    return [F.linear(x, sd[f"{h}.weight"], sd[f"{h}.bias"]) for h in heads]


@pytest.fixture
def env():
    return make_env(gym.spec("HalfCheetah-v5"))


def test_imported_networks_compute_what_the_rlkit_agents_compute(tmp_path, env):
    agents = write_agents(tmp_path)
    networks, about = import_rlkit(str(tmp_path), len(SEEDS), env)
    assert about["hidden_sizes"] == list(HIDDEN)
    assert about["imported_from"]["agents"] == [f"halfcheetah-medium-v0_seed{s}" for s in SEEDS]
    N = len(SEEDS)
    actor, qf = Actor(OBS, ACT, HIDDEN, N), Critic(OBS, ACT, HIDDEN, N)
    actor.load_state_dict(networks["actor"])
    qf.load_state_dict(networks["qf"])
    torch.manual_seed(1)
    obs = 3 * torch.randn(64, OBS)
    actions = torch.rand(64, ACT) * 2 - 1
    with torch.no_grad():
        mean, log_std = actor(obs.expand(N, -1, -1))  # [N, B, A]
        q = qf(obs.expand(N, -1, -1), actions.expand(N, -1, -1))  # [N, 2, B]
    for i, seed in enumerate(SEEDS):  # member i is the i-th agent by seed number
        ref_mean, ref_log_std = rlkit_forward(
            agents[seed]["actor"], obs, ("last_fc", "last_fc_log_std")
        )
        torch.testing.assert_close(mean[i], ref_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(log_std[i], ref_log_std.clamp(-20, 2), atol=1e-5, rtol=1e-5)
        for k, critic in enumerate(("critic1", "critic2")):
            (ref_q,) = rlkit_forward(
                agents[seed][critic], torch.cat([obs, actions], 1), ["last_fc"]
            )
            torch.testing.assert_close(q[i, k], ref_q[:, 0], atol=1e-5, rtol=1e-5)
    # the targets start as copies of the critics, as in the official launcher
    for key, value in networks["qf"].items():
        torch.testing.assert_close(networks["qf_target"][key], value, rtol=0, atol=0)


def test_first_n_agents_by_seed_number(tmp_path, env):
    agents = write_agents(tmp_path)
    networks, about = import_rlkit(str(tmp_path), 2, env)
    assert about["imported_from"]["agents"] == [f"halfcheetah-medium-v0_seed{s}" for s in (0, 4)]
    torch.testing.assert_close(
        networks["actor"]["net.0.weight"][1], agents[4]["actor"]["fc0.weight"].T
    )


def cli(workdir, *flags, script="cql_pretrain.py"):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(workdir / "minari"), "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *flags],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def import_cli(workdir, folder, out="imported.pt", n=4):
    args = ["--import-rlkit", str(folder), "--env-id", "halfcheetah-medium-v2"]
    return cli(workdir, *args, "--checkpoint-path", out, "--ensemble-size", str(n))


def test_cli_writes_a_checkpoint_that_fine_tuning_takes(tmp_path):
    write_agents(tmp_path / "agents")
    out = import_cli(tmp_path, tmp_path / "agents")
    assert out.returncode == 0, out.stderr
    checkpoint = torch.load(tmp_path / "imported.pt", weights_only=True)
    meta = checkpoint["metadata"]
    assert (meta["ensemble_size"], meta["env_id"], meta["hidden_sizes"]) == (
        4,
        "HalfCheetah-v5",
        [24, 20],
    )
    assert meta["imported_from"]["steps"] == [1000] * 4
    # fine-tuning member 0 alone, on a dataset the agents were not trained on: the env is checked
    data = "--env-id halfcheetah-random-v2 --random-dataset-size 1200".split()
    made = cli(tmp_path, *data, "--dataset-only")
    assert made.returncode == 0, made.stderr
    finetune = "--checkpoint imported.pt --ensemble-size 1 --total-timesteps 100 --epoch-length 50"
    finetune += " --first-epoch-multiplier 1 --batch-size 16 --eval-episodes 1 --auroc-samples 20"
    run = cli(tmp_path, *data, *finetune.split(), "--no-cuda", script="off2on_finetune.py")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "imported from" in run.stdout
    state = torch.load(
        tmp_path / "checkpoints/off2on_finetune__halfcheetah-random-v2__n1__seed1.pt",
        weights_only=True,
    )
    assert state["actor"]["net.0.weight"].shape == (1, OBS, 24)


def test_hopper_env_rejects_halfcheetah_agents(tmp_path):
    write_agents(tmp_path / "agents")
    out = cli(tmp_path, "--import-rlkit", str(tmp_path / "agents"), "--env-id", "hopper-medium-v2",
              "--checkpoint-path", "x.pt", "--ensemble-size", "4")  # fmt: skip
    assert out.returncode != 0 and out.stderr.count("error:") == 1, out.stderr
    assert "Hopper-v5" in out.stderr and not (tmp_path / "x.pt").exists()


def break_missing(folder):
    os.remove(folder / "halfcheetah-medium-v0_seed8" / "critic2_1000.pt")


def break_shape(folder):
    path = folder / "halfcheetah-medium-v0_seed4" / "actor_1000.pt"
    sd = torch.load(path, weights_only=True)
    sd["fc0.weight"] = sd["fc0.weight"][:, :11]  # another environment's observations
    torch.save(sd, path)


def break_not_rlkit(folder):
    torch.save(
        {"weight": torch.zeros(3)}, folder / "halfcheetah-medium-v0_seed0" / "critic1_1000.pt"
    )


def break_not_torch(folder):
    (folder / "halfcheetah-medium-v0_seed12" / "actor_1000.pt").write_text("not a torch file")


def break_too_few(folder):
    os.rename(folder / "halfcheetah-medium-v0_seed12", folder / "notes")


@pytest.mark.parametrize(
    "damage, says",
    [
        (break_missing, "critic2_1000.pt is missing"),
        (break_shape, "needs [(17, 24)"),
        (break_not_rlkit, "is not an rlkit state dict"),
        (break_not_torch, "is not a readable torch file"),
        (break_too_few, "holds 3 agent folders"),
    ],
)
def test_bad_agents_give_one_error_line_and_write_nothing(tmp_path, damage, says):
    write_agents(tmp_path / "agents")
    damage(tmp_path / "agents")
    out = import_cli(tmp_path, tmp_path / "agents")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], out.stderr
    assert not (tmp_path / "imported.pt").exists() and not (tmp_path / "imported.pt.tmp").exists()


def test_rollout_dataset_takes_turns_with_stochastic_actions(tmp_path, env):
    agents = write_agents(tmp_path / "agents", seeds=(0, 4, 8))
    networks, about = import_rlkit(str(tmp_path / "agents"), 3, env)
    meta = {**about, "ensemble_size": 3, "dataset_id": None, "env_id": "HalfCheetah-v5"}
    save_checkpoint(
        str(tmp_path / "agents.pt"), {"format_version": 1, "metadata": meta, **networks}
    )
    size = 2_500  # two whole episodes, then one cut at the size
    dataset = make_rollout_dataset(
        str(tmp_path / "agents.pt"), "halfcheetah-medium-v2", size, seed=3
    )
    episodes = list(dataset.iterate_episodes())
    assert [len(ep.actions) for ep in episodes] == [1000, 1000, 500]
    assert [bool(ep.truncations[-1]) for ep in episodes] == [True, True, True]
    # every action is tanh(mean + std * eps) of member episode % N, eps drawn in order from the seed
    gen = torch.Generator().manual_seed(3)
    for e, ep in enumerate(episodes):
        sd = agents[(0, 4, 8)[e]]["actor"]
        obs = torch.as_tensor(ep.observations[:-1], dtype=torch.float32)
        mean, log_std = rlkit_forward(sd, obs, ("last_fc", "last_fc_log_std"))
        eps = torch.stack([torch.randn(ACT, generator=gen) for _ in range(len(obs))])
        expected = torch.tanh(mean + log_std.clamp(-20, 2).exp() * eps)
        np.testing.assert_allclose(ep.actions, expected.numpy(), atol=1e-5)
        assert ep.rewards.std() > 0
    # loaded by its id, scored on D4RL's scale; made once
    data = load_offline_data(dataset.spec.dataset_id)
    assert len(data) == size and data.ref_returns == D4RL_REF_RETURNS["halfcheetah"]
    again = make_rollout_dataset(str(tmp_path / "agents.pt"), "halfcheetah-medium-v2", size, seed=3)
    assert (
        again.spec.dataset_id
        == dataset.spec.dataset_id
        == "off2on/halfcheetah/rollout-agents-n2500-v0"
    )


def test_rollout_cli_reports_the_returns(tmp_path):
    write_agents(tmp_path / "agents", seeds=(0, 4))
    assert import_cli(tmp_path, tmp_path / "agents", "a.pt", n=2).returncode == 0
    out = cli(
        tmp_path,
        "--rollout-dataset",
        "a.pt",
        "--env-id",
        "halfcheetah-medium-v2",
        "--rollout-steps",
        "1500",
    )
    assert out.returncode == 0, out.stderr
    assert (
        "off2on/halfcheetah/rollout-a-n1500-v0: 1,500 transitions, 2 episodes, return" in out.stdout
    )
    assert "--env-id off2on/halfcheetah/rollout-a-n1500-v0" in out.stdout
