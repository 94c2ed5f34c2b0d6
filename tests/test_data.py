"""The data section shared by the state-based scripts (tested through cql_pretrain.py): D4RL-style
names -> Minari datasets / D4RL hdf5 -> flat transitions; and the local random datasets.

Every Minari dataset here is made by the test itself with Minari's own writer in a temporary
MINARI_DATASETS_PATH (conftest.py), from real rollouts whose observations and actions are known.
"""

import os
import subprocess
import sys
import time
import types

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

import cql_pretrain
from cql_pretrain import DatasetError, load_offline_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOPPER_LIMIT = 20  # a time limit != Hopper-v5's default 1000, so the recorded spec is recognisable
MEDIUM_REFS = (-5.0, 123.0)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def rollout(env, seed, policy):
    """One episode with known actions: T+1 observations, T actions."""
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    ep = {
        "observations": [obs],
        "actions": [],
        "rewards": [],
        "terminations": [],
        "truncations": [],
    }
    t = 0
    while True:
        action = np.asarray(policy(t, rng), dtype=np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(
            ("observations", "actions", "rewards", "terminations", "truncations"),
            (obs, action, reward, terminated, truncated),
        ):
            ep[k].append(v)
        t += 1
        if terminated or truncated:
            return {k: np.asarray(v) for k, v in ep.items()}


def write_minari(dataset_id, episodes, env_spec, refs=None):
    buffers = [EpisodeBuffer(id=i, **ep) for i, ep in enumerate(episodes)]
    kwargs = dict(ref_min_score=refs[0], ref_max_score=refs[1]) if refs is not None else {}
    return minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env=env_spec,
        eval_env=env_spec,
        algorithm_name="test",
        author="test",
        author_email="test@example.com",
        code_permalink="tests/test_data.py",
        description="test dataset",
        **kwargs,
    )


def hopper_env():
    return gym.make("Hopper-v5", max_episode_steps=HOPPER_LIMIT)


def medium_episodes():
    """Hopper: falls (terminated), time limit (truncated), falls fast (terminated)."""
    env = hopper_env()
    eps = [
        rollout(env, 1, lambda t, rng: rng.uniform(-1, 1, 3)),
        rollout(env, 2, lambda t, rng: np.zeros(3)),
        rollout(env, 3, lambda t, rng: -np.ones(3)),
    ]
    # the scenario this file relies on
    assert (
        eps[0]["terminations"][-1]
        and not eps[0]["truncations"][-1]
        and len(eps[0]["actions"]) < HOPPER_LIMIT
    )
    assert (
        eps[1]["truncations"][-1]
        and not eps[1]["terminations"].any()
        and len(eps[1]["actions"]) == HOPPER_LIMIT
    )
    assert eps[2]["terminations"][-1] and not eps[2]["truncations"][-1]
    return eps


def expert_episodes():
    env = hopper_env()
    eps = [
        rollout(env, 10, lambda t, rng: 0.05 * rng.uniform(-1, 1, 3)),
        rollout(env, 11, lambda t, rng: np.array([1.0, -1.0, 1.0]) * (1 if t % 10 < 5 else -1)),
    ]
    assert eps[0]["truncations"][-1] and not eps[0]["terminations"].any()
    assert eps[1]["terminations"][-1]
    return eps


def flat(episodes):
    """What the transitions of these episodes must be, built apart from the code under test."""
    return {
        "observations": np.concatenate([ep["observations"][:-1] for ep in episodes]).astype(
            np.float32
        ),
        "next_observations": np.concatenate([ep["observations"][1:] for ep in episodes]).astype(
            np.float32
        ),
        "actions": np.concatenate([ep["actions"] for ep in episodes]).astype(np.float32),
        "rewards": np.concatenate([ep["rewards"] for ep in episodes]).astype(np.float32),
        "terminations": np.concatenate([ep["terminations"] for ep in episodes]).astype(np.float32),
    }


def assert_matches(data, expected):
    for k, v in expected.items():
        got = getattr(data, k)
        assert got.dtype == np.float32, k
        assert got.shape == v.shape, (k, got.shape, v.shape)
        if k == "actions":  # rescaled from the env's bounds (identity up to rounding for [-1, 1])
            np.testing.assert_allclose(got, v, rtol=0, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(got, v, err_msg=k)


# ---------------------------------------------------------------------------------------
# 1. Minari datasets behind D4RL-style names
# ---------------------------------------------------------------------------------------
def test_d4rl_name_loads_local_minari_dataset():
    eps = medium_episodes()
    spec = hopper_env().spec
    write_minari("mujoco/hopper/medium-v0", eps, spec, refs=MEDIUM_REFS)

    data = load_offline_data("hopper-medium-v2")

    lengths = [len(ep["actions"]) for ep in eps]
    assert len(data) == sum(lengths)
    assert_matches(data, flat(eps))

    starts = np.cumsum([0] + lengths[:-1])
    ends = np.cumsum(lengths) - 1
    for ep, s, e in zip(eps, starts, ends):
        # within an episode s' of t is s of t+1
        np.testing.assert_array_equal(data.next_observations[s:e], data.observations[s + 1 : e + 1])
        # the last transition ends in the episode's own final observation ...
        np.testing.assert_array_equal(
            data.next_observations[e], ep["observations"][-1].astype(np.float32)
        )
        # ... never in the next episode's first one
        if e + 1 < len(data):
            assert not np.array_equal(data.next_observations[e], data.observations[e + 1])

    # d = 1 only where Hopper fell; the time-limit truncation bootstraps (d = 0)
    expected_d = np.zeros(len(data), np.float32)
    expected_d[[ends[0], ends[2]]] = 1
    np.testing.assert_array_equal(data.terminations, expected_d)
    assert data.terminations[ends[1]] == 0

    # the recorded env spec, not a fresh Hopper-v5 with its default time limit
    assert data.env_spec.id == "Hopper-v5"
    assert data.env_spec.max_episode_steps == HOPPER_LIMIT
    assert data.dataset_id == "hopper-medium-v2"

    # a D4RL-style name is scored on D4RL's scale, not on the dataset's own (other) refs
    assert data.ref_returns == pytest.approx(cql_pretrain.D4RL_REF_RETURNS["hopper"])
    assert "D4RL" in data.ref_source
    assert data.minari_ref_returns == MEDIUM_REFS


def test_minari_dataset_without_refs_falls_back_to_d4rl_constants():
    write_minari("mujoco/hopper/medium-v0", medium_episodes(), hopper_env().spec, refs=None)
    assert (
        minari.load_dataset("mujoco/hopper/medium-v0").storage.metadata.get("ref_max_score") is None
    )

    data = load_offline_data("hopper-medium-v2")
    assert data.ref_returns == pytest.approx(cql_pretrain.D4RL_REF_RETURNS["hopper"])
    assert data.ref_returns == pytest.approx((-20.272305, 3234.3))
    assert "D4RL" in data.ref_source
    assert data.minari_ref_returns is None


# ---------------------------------------------------------------------------------------
# 2. medium-expert = medium then expert
# ---------------------------------------------------------------------------------------
def test_medium_expert_concatenates_medium_then_expert():
    spec = hopper_env().spec
    med, exp = medium_episodes(), expert_episodes()
    write_minari("mujoco/hopper/medium-v0", med, spec, refs=MEDIUM_REFS)
    write_minari("mujoco/hopper/expert-v0", exp, spec, refs=MEDIUM_REFS)

    data = load_offline_data("hopper-medium-expert-v2")
    n_med = sum(len(ep["actions"]) for ep in med)
    n_exp = sum(len(ep["actions"]) for ep in exp)
    assert len(data) == n_med + n_exp
    assert_matches(data, flat(med + exp))
    # and not expert first
    assert not np.array_equal(data.observations[:n_exp], flat(exp)["observations"])
    # no transition crosses from the last medium episode into the first expert one
    np.testing.assert_array_equal(
        data.next_observations[n_med - 1], med[-1]["observations"][-1].astype(np.float32)
    )
    assert data.env_spec.max_episode_steps == HOPPER_LIMIT
    assert data.ref_returns == pytest.approx(cql_pretrain.D4RL_REF_RETURNS["hopper"])
    assert data.minari_ref_returns == MEDIUM_REFS  # those of medium, the first part


# ---------------------------------------------------------------------------------------
# 3. A Minari id given directly
# ---------------------------------------------------------------------------------------
def test_minari_id_given_directly():
    exp = expert_episodes()
    write_minari("mujoco/hopper/expert-v0", exp, hopper_env().spec, refs=(1.0, 2.0))

    data = load_offline_data("mujoco/hopper/expert-v0")
    assert len(data) == sum(len(ep["actions"]) for ep in exp)
    assert_matches(data, flat(exp))
    assert data.dataset_id == "mujoco/hopper/expert-v0"
    assert data.env_spec.id == "Hopper-v5" and data.env_spec.max_episode_steps == HOPPER_LIMIT
    assert data.ref_returns == (1.0, 2.0)  # a Minari id keeps Minari's scale
    assert "Minari" in data.ref_source
    assert data.minari_ref_returns == (1.0, 2.0)


def test_minari_id_given_directly_without_refs_uses_d4rl_constants_of_its_env():
    write_minari("mujoco/hopper/expert-v0", expert_episodes(), hopper_env().spec, refs=None)
    data = load_offline_data("mujoco/hopper/expert-v0")
    assert data.ref_returns == pytest.approx(cql_pretrain.D4RL_REF_RETURNS["hopper"])
    assert "D4RL" in data.ref_source


def test_minari_id_of_other_env_rescales_actions_and_has_no_refs():
    """Pendulum's actions lie in [-2, 2]: the loader maps them to [-1, 1]; it has no D4RL refs."""
    env = gym.make("Pendulum-v1", max_episode_steps=15)
    ep = rollout(env, 0, lambda t, rng: [(-2.0, 2.0, 1.0, 0.0, -1.0)[t % 5]])
    write_minari("test/pendulum/tiny-v0", [ep], env.spec, refs=None)

    data = load_offline_data("test/pendulum/tiny-v0")
    assert len(data) == 15
    np.testing.assert_allclose(data.actions[:5, 0], [-1.0, 1.0, 0.5, 0.0, -0.5], atol=1e-6)
    assert data.env_spec.id == "Pendulum-v1"
    assert data.ref_returns is None
    assert data.ref_source.startswith("none")


def test_dict_observations_are_rejected():
    ep = types.SimpleNamespace(
        observations={"a": np.zeros((3, 2))},
        actions=np.zeros((2, 1)),
        rewards=np.zeros(2),
        terminations=np.zeros(2, bool),
    )
    with pytest.raises(DatasetError, match="flat"):
        cql_pretrain.episodes_to_transitions([ep])


# ---------------------------------------------------------------------------------------
# 4. D4RL-format hdf5 files
# ---------------------------------------------------------------------------------------
# 10 rows: episode A = rows 0-3 ends by falling (terminal at 3), B = rows 4-6 ends by the
# time limit (timeout at 6), C = rows 7-9 is cut by the end of the file.
N_ROWS = 10
TERMINALS = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0], bool)
TIMEOUTS = np.array([0, 0, 0, 0, 0, 0, 1, 0, 0, 0], bool)


def d4rl_arrays():
    rng = np.random.default_rng(0)
    return {
        "observations": rng.normal(size=(N_ROWS, 11)),  # Hopper: 11-dim observations, 3-dim actions
        "actions": rng.uniform(-1, 1, size=(N_ROWS, 3)),
        "rewards": rng.normal(size=N_ROWS),
        "terminals": TERMINALS,
        "timeouts": TIMEOUTS,
        "next_observations": rng.normal(size=(N_ROWS, 11)),
    }


def write_hdf5(path, arrays, keys):
    with h5py.File(path, "w") as f:
        for k in keys:
            f.create_dataset(k, data=arrays[k])
    return str(path)


@pytest.mark.parametrize("env_id", ["hopper-medium-v2", "Hopper-v5"])
def test_hdf5_with_next_observations_keeps_all_rows(tmp_path, env_id):
    a = d4rl_arrays()
    path = write_hdf5(tmp_path / "d.hdf5", a, a.keys())

    data = load_offline_data(env_id, dataset_path=path)
    assert len(data) == N_ROWS
    np.testing.assert_array_equal(data.observations, a["observations"].astype(np.float32))
    np.testing.assert_array_equal(data.next_observations, a["next_observations"].astype(np.float32))
    np.testing.assert_allclose(data.actions, a["actions"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data.rewards, a["rewards"].astype(np.float32))
    np.testing.assert_array_equal(data.terminations, TERMINALS.astype(np.float32))
    assert data.env_spec.id == "Hopper-v5"
    assert data.dataset_id == os.path.abspath(path)
    assert data.ref_returns == pytest.approx(cql_pretrain.D4RL_REF_RETURNS["hopper"])
    assert "D4RL" in data.ref_source


@pytest.mark.parametrize("env_id", ["hopper-medium-v2", "Hopper-v5"])
def test_hdf5_without_next_observations_uses_next_row_and_drops_timeouts(tmp_path, env_id):
    a = d4rl_arrays()
    path = write_hdf5(
        tmp_path / "d.hdf5", a, ["observations", "actions", "rewards", "terminals", "timeouts"]
    )

    data = load_offline_data(env_id, dataset_path=path)
    # row 6 (timeout) and row 9 (last row) have no known s'
    kept = np.array([0, 1, 2, 3, 4, 5, 7, 8])
    assert len(data) == len(kept)
    np.testing.assert_array_equal(data.observations, a["observations"][kept].astype(np.float32))
    np.testing.assert_array_equal(
        data.next_observations, a["observations"][kept + 1].astype(np.float32)
    )
    np.testing.assert_allclose(data.actions, a["actions"][kept], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data.rewards, a["rewards"][kept].astype(np.float32))
    # the terminal row is kept, d = 1
    np.testing.assert_array_equal(data.terminations, [0, 0, 0, 1, 0, 0, 0, 0])
    assert data.env_spec.id == "Hopper-v5"


def test_hdf5_missing_keys(tmp_path):
    a = d4rl_arrays()
    path = write_hdf5(tmp_path / "d.hdf5", a, ["observations", "actions", "rewards"])
    with pytest.raises(DatasetError) as e:
        load_offline_data("hopper-medium-v2", dataset_path=path)
    msg = str(e.value)
    assert "terminals" in msg and "timeouts" in msg
    assert "observations'" not in msg  # names only what is missing


def test_hdf5_nonexistent_path(tmp_path):
    path = str(tmp_path / "nope.hdf5")
    with pytest.raises(DatasetError, match="nope.hdf5"):
        load_offline_data("hopper-medium-v2", dataset_path=path)


def test_hdf5_with_unknown_env_id(tmp_path):
    a = d4rl_arrays()
    path = write_hdf5(tmp_path / "d.hdf5", a, a.keys())
    with pytest.raises(DatasetError, match="foo-bar"):
        load_offline_data("foo-bar", dataset_path=path)


def test_hdf5_action_shape_must_match_env(tmp_path):
    a = d4rl_arrays()  # 3-dim Hopper actions
    path = write_hdf5(tmp_path / "d.hdf5", a, a.keys())
    with pytest.raises(DatasetError, match="shape"):
        load_offline_data("halfcheetah-medium-v2", dataset_path=path)  # HalfCheetah expects 6


# ---------------------------------------------------------------------------------------
# 5. The locally generated uniform-random dataset
# ---------------------------------------------------------------------------------------
RANDOM_SIZE = 2500


def replay_halfcheetah(env, obs, action):
    """HalfCheetah-v5 from observation `obs` (x position left out: the dynamics don't use it)."""
    u = env.unwrapped
    qpos = np.concatenate([[0.0], obs[: u.model.nq - 1]])
    qvel = obs[u.model.nq - 1 :]
    u.set_state(qpos.astype(np.float64), qvel.astype(np.float64))
    next_obs, reward, terminated, _, _ = env.step(action)
    return next_obs, reward, terminated


def random_data(size):
    """cql_pretrain.py makes the dataset; every script loads it with the shared loader."""
    cql_pretrain.make_random_dataset("halfcheetah", size)
    return load_offline_data("halfcheetah-random-v2", random_dataset_size=size)


def test_random_dataset_is_generated_by_the_v5_env():
    data = random_data(RANDOM_SIZE)
    assert len(data) == RANDOM_SIZE
    assert data.env_spec.id == "HalfCheetah-v5"
    assert data.observations.shape == (RANDOM_SIZE, 17) and data.actions.shape == (RANDOM_SIZE, 6)
    assert data.ref_returns == pytest.approx(cql_pretrain.D4RL_REF_RETURNS["halfcheetah"])

    # uniform-random actions in [-1, 1]
    assert data.actions.min() >= -1 and data.actions.max() <= 1
    assert np.all(data.actions.std(0) > 0.5)  # uniform on [-1, 1]: std 0.577
    assert np.abs(data.actions.mean(0)).max() < 0.1
    assert not np.any(data.terminations)  # HalfCheetah never terminates

    # transitions are HalfCheetah-v5 dynamics: replay some in the env
    env = gym.make("HalfCheetah-v5")
    env.reset(seed=0)
    for i in [0, 1, 500, 999, 1000, 1700, RANDOM_SIZE - 1]:
        next_obs, reward, _ = replay_halfcheetah(
            env, data.observations[i].astype(np.float64), data.actions[i]
        )
        np.testing.assert_allclose(
            data.next_observations[i], next_obs, atol=1e-3, rtol=1e-4, err_msg=f"transition {i}"
        )
        assert data.rewards[i] == pytest.approx(reward, abs=1e-3)

    # the dataset is stored as a local Minari dataset
    local = minari.list_local_datasets()
    assert any("halfcheetah" in k and "random" in k for k in local), local


def test_random_dataset_is_stored_and_reused(monkeypatch, capsys):
    first = random_data(RANDOM_SIZE)
    root = os.environ["MINARI_DATASETS_PATH"]
    files = {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, fs in os.walk(root)
        for f in fs
    }
    assert files
    capsys.readouterr()

    def no_regeneration(*args, **kwargs):
        raise AssertionError("the random dataset was generated again")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", no_regeneration)
    second = random_data(RANDOM_SIZE)
    assert "Generating" not in capsys.readouterr().out
    for k in ("observations", "actions", "rewards", "next_observations", "terminations"):
        np.testing.assert_array_equal(getattr(first, k), getattr(second, k))
    files_after = {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, fs in os.walk(root)
        for f in fs
    }
    assert files_after == files


def test_random_dataset_size_is_part_of_its_identity():
    small = random_data(300)
    assert len(small) == 300
    other = random_data(400)
    assert len(other) == 400


def test_random_dataset_is_deterministic(tmp_path, monkeypatch):
    first = random_data(RANDOM_SIZE)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "fresh"))
    second = random_data(RANDOM_SIZE)
    assert os.listdir(tmp_path / "fresh")  # really regenerated there
    for k in ("observations", "actions", "rewards", "next_observations", "terminations"):
        np.testing.assert_array_equal(getattr(first, k), getattr(second, k), err_msg=k)


def test_a_missing_random_dataset_names_the_command_that_makes_it():
    with pytest.raises(DatasetError) as e:
        load_offline_data("halfcheetah-random-v2", random_dataset_size=123)
    msg = str(e.value)
    assert "off2on/halfcheetah/random-n123-v0" in msg and "\n" not in msg
    command = "python cql_pretrain.py --env-id halfcheetah-random-v2 --random-dataset-size 123"
    assert f"`{command} --dataset-only`" in msg
    assert not minari.list_local_datasets()  # nothing was generated on the way


def test_make_env_is_gym_make_without_the_deprecated_attribute(tmp_path, monkeypatch):
    """HalfCheetah compiled without `settotalmass`, its masses scaled afterwards: the same model
    (every array of it), the same spec, the same trajectory bit for bit, and MuJoCo's deprecation
    warning is gone (it is printed by MuJoCo's C code, so a child process is watched)."""
    monkeypatch.chdir(tmp_path)  # where MuJoCo writes its MUJOCO_LOG.TXT
    spec = gym.spec("HalfCheetah-v5")
    ours, theirs = cql_pretrain.make_env(spec), gym.make(spec)
    assert ours.spec == theirs.spec and "xml_file" not in ours.spec.kwargs
    m1, m2 = ours.unwrapped.model, theirs.unwrapped.model
    arrays = [k for k in dir(m1) if isinstance(getattr(m1, k, None), np.ndarray)]
    assert "body_mass" in arrays and m1.body_mass.sum() == pytest.approx(14.0)
    for k in arrays:
        np.testing.assert_array_equal(getattr(m1, k), getattr(m2, k), err_msg=k)
    rng = np.random.default_rng(0)
    (o1, _), (o2, _) = ours.reset(seed=3), theirs.reset(seed=3)
    for _ in range(300):
        np.testing.assert_array_equal(o1, o2)
        action = rng.uniform(-1, 1, 6)
        o1, r1, *_ = ours.step(action)
        o2, r2, *_ = theirs.step(action)
        assert r1 == r2
    hopper = cql_pretrain.make_env(gym.spec("Hopper-v5"))  # other envs: plain gym.make
    assert hopper.spec == gym.make("Hopper-v5").spec

    code = (
        "import gymnasium as gym, cql_pretrain; cql_pretrain.make_env(gym.spec('HalfCheetah-v5'))"
    )
    (tmp_path / "child").mkdir()
    run = dict(cwd=tmp_path / "child", env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
    quiet = subprocess.run([sys.executable, "-c", code], text=True, **run)
    assert not (tmp_path / "child" / "MUJOCO_LOG.TXT").exists()
    code = "import gymnasium as gym; gym.make('HalfCheetah-v5')"
    warned = subprocess.run([sys.executable, "-c", code], text=True, **run)
    assert quiet.returncode == 0 and warned.returncode == 0, quiet.stderr + warned.stderr
    assert "settotalmass" in warned.stdout + warned.stderr  # the warning this avoids, still there
    assert "settotalmass" not in quiet.stdout + quiet.stderr


# ---------------------------------------------------------------------------------------
# 6. Clear errors
# ---------------------------------------------------------------------------------------
def test_medium_replay_asks_for_dataset_path():
    with pytest.raises(DatasetError) as e:
        load_offline_data("hopper-medium-replay-v2")
    assert "--dataset-path" in str(e.value)
    assert "medium_replay" in str(e.value)


def test_unknown_env_id_lists_what_is_expected():
    with pytest.raises(DatasetError) as e:
        load_offline_data("foo-bar")
    msg = str(e.value)
    assert "foo-bar" in msg
    assert "halfcheetah" in msg and "medium-expert" in msg  # the D4RL-style names
    assert "mujoco/hopper/expert-v0" in msg  # a Minari id
    assert "--dataset-path" in msg


@pytest.mark.parametrize(
    "env_id,dataset_id",
    [
        ("hopper-medium-v2", "mujoco/hopper/medium-v0"),
        ("walker2d-medium-expert-v2", "mujoco/walker2d/medium-v0"),
        ("mujoco/hopper/expert-v0", "mujoco/hopper/expert-v0"),
    ],
)
def test_missing_minari_dataset_fails_fast_and_says_how_to_provide_it(
    monkeypatch, env_id, dataset_id
):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE is read when huggingface_hub is imported: hold it whoever imported it first
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.time()
    with pytest.raises(DatasetError) as e:
        load_offline_data(env_id)
    assert time.time() - t0 < 15
    msg = str(e.value)
    assert dataset_id in msg
    assert f"minari download {dataset_id}" in msg
    assert "MINARI_DATASETS_PATH" in msg and os.environ["MINARI_DATASETS_PATH"] in msg
    assert "--dataset-path" in msg
    assert "\n" not in msg


def test_cli_missing_dataset_is_one_error_line(tmp_path):
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "cql_pretrain.py"),
            "--env-id",
            "hopper-medium-v2",
            "--total-steps",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    lines = p.stderr.strip().splitlines()
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, p.stderr
    assert lines[-1] == error_lines[0]
    assert "mujoco/hopper/medium-v0" in error_lines[0] and "--dataset-path" in error_lines[0]
    assert not (tmp_path / "checkpoints").exists()


def test_scripts_log_d4rl_and_minari_scores_of_a_dataset_whose_refs_differ(tmp_path):
    """hopper-medium-v2 from a Minari dataset with refs (-5, 123): eval/normalized_score is on
    D4RL's scale, eval/minari_normalized_score on the dataset's, both from the same eval/return."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_minari("mujoco/hopper/medium-v0", medium_episodes(), hopper_env().spec, refs=MEDIUM_REFS)
    tiny = "--ensemble-size 1 --hidden-sizes 8 8 --batch-size 4 --eval-episodes 1 --no-cuda"
    commands = {
        "cql_pretrain": f"cql_pretrain.py --total-steps 2 --bc-steps 1 --cql-n-actions 2 "
        f"--eval-every 2 --log-every 1 --save-every 2 --checkpoint-path cql.pt {tiny}",
        "off2on_finetune": f"off2on_finetune.py --checkpoint cql.pt --total-timesteps 10 "
        f"--epoch-length 10 --first-epoch-multiplier 1 --auroc-every 100 {tiny}",
    }
    for exp_name, command in commands.items():
        p = subprocess.run(
            [sys.executable, *f"{REPO}/{command} --env-id hopper-medium-v2".split()],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        (run_dir,) = (tmp_path / "runs").glob(f"hopper-medium-v2__{exp_name}__1__*")
        events = EventAccumulator(str(run_dir))
        events.Reload()
        returns = np.array([e.value for e in events.Scalars("eval/return")])
        d4rl = [e.value for e in events.Scalars("eval/normalized_score")]
        own = [e.value for e in events.Scalars("eval/minari_normalized_score")]
        assert len(returns) >= 1
        d4rl_refs = cql_pretrain.D4RL_REF_RETURNS["hopper"]
        np.testing.assert_allclose(
            d4rl, 100 * (returns - d4rl_refs[0]) / (d4rl_refs[1] - d4rl_refs[0]), rtol=1e-5
        )
        np.testing.assert_allclose(own, 100 * (returns + 5.0) / 128.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# 7. Scores and action scaling
# ---------------------------------------------------------------------------------------
def test_normalized_score():
    assert cql_pretrain.normalized_score(50.0, (0.0, 200.0)) == pytest.approx(25.0)
    np.testing.assert_allclose(
        cql_pretrain.normalized_score([-100.0, 0.0, 100.0, 300.0], (-100.0, 100.0)),
        [0.0, 50.0, 100.0, 200.0],
    )
    hopper = cql_pretrain.D4RL_REF_RETURNS["hopper"]
    assert cql_pretrain.normalized_score(-20.272305, hopper) == pytest.approx(0.0, abs=1e-9)
    assert cql_pretrain.normalized_score(3234.3, hopper) == pytest.approx(100.0)
    # 100 * (1000 + 20.272305) / (3234.3 + 20.272305) = 31.34847...
    assert cql_pretrain.normalized_score(1000.0, hopper) == pytest.approx(31.3485, abs=1e-3)


def test_scale_to_unit_and_back():
    space = gym.spaces.Box(
        low=np.array([0.0, -2.0], np.float32), high=np.array([2.0, 2.0], np.float32)
    )
    a = np.array([[0.0, -2.0], [2.0, 2.0], [1.0, 0.0], [0.5, 1.0], [3.0, -5.0]], np.float32)
    u = cql_pretrain.scale_to_unit(a, space)
    assert u.dtype == np.float32
    np.testing.assert_allclose(u, [[-1, -1], [1, 1], [0, 0], [-0.5, 0.5], [1, -1]], atol=1e-6)
    np.testing.assert_allclose(cql_pretrain.scale_to_env(u[:4], space), a[:4], atol=1e-6)
