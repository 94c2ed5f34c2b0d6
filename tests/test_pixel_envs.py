"""pixel_envs.py: the three COG-style tasks, their scripted policies and the offline dataset."""

import importlib
import os
import subprocess
import sys
import warnings

import gymnasium as gym
import minari
import mujoco
import numpy as np
import pytest

from conftest import require_rendering

require_rendering()  # one line saying why, before pixel_envs imports MuJoCo
pytestmark = pytest.mark.pixels

import pixel_envs  # noqa: E402
from pixel_envs import EPISODE_LENGTH, TASKS, PixelManipEnv, ScriptedPolicy, generate_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_box(env, pos):
    """Teleport the box (upright) to `pos` and recompute the derived state."""
    adr = env._box_adr
    env.data.qpos[adr : adr + 7] = [*pos, 1.0, 0.0, 0.0, 0.0]
    env.data.qvel[:] = 0.0
    mujoco.mj_forward(env.model, env.data)


def test_task_names_and_registration():
    assert set(TASKS) == {"pick-place", "grasp-closed-drawer", "grasp-blocked-drawer"}
    limits = {TASKS[t]: gym.spec(TASKS[t]).max_episode_steps for t in TASKS}
    expected = {"Off2OnPickPlace-v0": 40, "Off2OnGraspClosedDrawer-v0": 50}
    assert limits == {**expected, "Off2OnGraspBlockedDrawer-v0": 80}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium warns when an id is registered over
        importlib.reload(pixel_envs)  # a second import registers nothing new
    env = gym.make("Off2OnPickPlace-v0")
    assert env.unwrapped.task == "pick-place"
    env.close()


@pytest.mark.parametrize("task", list(TASKS))
def test_scripted_policy_succeeds(task):
    """>= 90% success within the episode length at the default noise (50 episodes, fixed seed)."""
    env = gym.make(TASKS[task], obs_mode="state")  # same dynamics, no rendering
    policy = ScriptedPolicy(task, seed=123)
    successes, lengths = 0, []
    for episode in range(50):
        env.reset(seed=1000 + episode)
        policy.reset()
        terminated = truncated = False
        steps = 0
        while not (terminated or truncated):
            _, reward, terminated, truncated, info = env.step(policy.act(env))
            steps += 1
            assert reward == float(info["success"]) == float(terminated)
        successes += terminated
        lengths.append(steps)
    env.close()
    assert successes >= 45, f"{task}: {successes}/50 scripted successes"
    assert max(lengths) <= EPISODE_LENGTH[task]


@pytest.mark.parametrize("task", list(TASKS))
def test_observation_is_a_48x48_uint8_frame(task):
    env = gym.make(TASKS[task], render_mode="rgb_array")
    obs, info = env.reset(seed=0)
    assert env.observation_space == gym.spaces.Box(0, 255, (3, 48, 48), np.uint8)
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    assert obs.shape == (3, 48, 48) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    assert info == {"success": False}
    assert obs.std() > 20  # a picture, not a blank frame
    video = env.render()
    assert video.shape == (256, 256, 3) and video.dtype == np.uint8
    env.close()
    env = gym.make(TASKS[task])
    env.reset(seed=0)
    assert env.render() is None  # no render_mode: nothing to render


def test_frames_show_the_scene():
    """At the start of pick-place, the agent's 48x48 view shows the box (red), the tray (blue)
    and the gripper (green)."""
    env = gym.make(TASKS["pick-place"])
    frame = env.reset(seed=0)[0].astype(int)
    r, g, b = frame
    assert np.sum((r > 150) & (g < 60) & (b < 60)) >= 3  # box
    assert np.sum((b > 150) & (r < 100)) >= 30  # tray
    assert np.sum((g > 120) & (r < 120) & (b < 120)) >= 5  # gripper
    env.close()


@pytest.mark.parametrize("task", list(TASKS))
def test_rendering_is_deterministic(task):
    actions = np.random.default_rng(0).uniform(-1, 1, size=(10, 4)).astype(np.float32)

    def rollout(seed):
        env = gym.make(TASKS[task])
        frames = [env.reset(seed=seed)[0]]
        frames += [env.step(a)[0] for a in actions]
        env.close()
        return np.stack(frames)

    first, again, other = rollout(7), rollout(7), rollout(8)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], other[0])  # another seed: another initial scene
    assert not np.array_equal(first[0], first[-1])  # the gripper moved


def test_reset_states_per_task():
    closed = PixelManipEnv("grasp-closed-drawer", obs_mode="state")
    blocked = PixelManipEnv("grasp-blocked-drawer", obs_mode="state")
    pick = PixelManipEnv("pick-place", obs_mode="state")
    for seed in range(5):
        for env in (closed, blocked, pick):
            env.reset(seed=seed)
            assert env.drawer_opening("bottom_drawer") == 0.0
            assert not env.success()
        assert closed.drawer_opening("top_drawer") == 0.0
        assert blocked.drawer_opening("top_drawer") > 0.1  # open, over the bottom handle
        for env in (closed, blocked):  # the box starts inside the (closed) bottom drawer
            x, y, z = env.box_pos()
            assert 0.08 < x < 0.28 and 0.0 < y < 0.18 and z < 0.05
        assert pick.box_pos()[1] < -0.05  # on the table, in front of the cabinet


def test_blocked_drawer_needs_the_top_drawer_closed():
    """Going for the bottom handle while the top drawer is open does not open the bottom drawer."""
    env = PixelManipEnv("grasp-blocked-drawer", obs_mode="state")
    rng = np.random.default_rng(0)
    for seed in range(3):
        env.reset(seed=seed)
        for action in pixel_envs._open_bottom_drawer(env, rng):
            env.step(action)
        assert env.drawer_opening("bottom_drawer") < 0.02
    closed = PixelManipEnv("grasp-closed-drawer", obs_mode="state")  # the same script works there
    closed.reset(seed=0)
    for action in pixel_envs._open_bottom_drawer(closed, rng):
        closed.step(action)
    assert closed.drawer_opening("bottom_drawer") > 0.14


def test_success_definitions():
    pick = PixelManipEnv("pick-place", obs_mode="state")
    pick.reset(seed=0)
    set_box(pick, [*pixel_envs.TRAY_CENTER, 0.026])  # resting in the tray
    assert pick.success()
    set_box(pick, [*pixel_envs.TRAY_CENTER, 0.15])  # high above the tray
    assert not pick.success()
    set_box(pick, [0.0, -0.15, 0.02])  # on the table
    assert not pick.success()
    obs, reward, terminated, truncated, info = pick.step(np.zeros(4))
    assert (reward, terminated, info["success"]) == (0.0, False, False)

    drawer = PixelManipEnv("grasp-closed-drawer", obs_mode="state")
    drawer.reset(seed=0)
    set_box(drawer, [0.0, -0.15, 0.2])  # lifted, but nobody holds it
    assert not drawer.success()


@pytest.mark.parametrize("task", list(TASKS))
def test_random_actions_truncate_at_episode_length(task):
    env = gym.make(TASKS[task])
    env.action_space.seed(0)
    env.reset(seed=0)
    for step in range(1, 200):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            break
    assert (step, terminated, truncated, reward) == (EPISODE_LENGTH[task], False, True, 0.0)
    env.close()


@pytest.mark.parametrize("task", list(TASKS))
def test_random_actions_are_stable(task):
    env = PixelManipEnv(task, obs_mode="state")
    rng = np.random.default_rng(1)
    for episode in range(6):
        env.reset(seed=episode)
        for step in range(80):
            if episode % 2:
                action = rng.uniform(-1, 1, 4)
            else:  # bang-bang
                action = rng.choice([-1.0, 1.0], size=4)
            obs, *_ = env.step(action)
            assert np.all(np.isfinite(obs)) and np.all(np.isfinite(env.data.qvel))
            assert np.all(env.hand_pos() > pixel_envs.WORKSPACE_LOW - 0.02)
            assert np.all(env.hand_pos() < pixel_envs.WORKSPACE_HIGH + 0.02)
            assert -0.005 < env.box_pos()[2] < 0.4
            for drawer in ("bottom_drawer", "top_drawer"):
                assert -0.005 < env.drawer_opening(drawer) < 0.185
            assert -0.003 < env.finger_opening() < 0.065


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        PixelManipEnv("pick")
    with pytest.raises(ValueError, match="obs_mode"):
        PixelManipEnv("pick-place", obs_mode="rgb")
    with pytest.raises(ValueError, match="unknown task"):
        ScriptedPolicy("open-drawer")


def test_generate_dataset(monkeypatch):
    dataset_id = generate_dataset("grasp-closed-drawer", size=400, seed=0)
    assert dataset_id == "off2on/grasp-closed-drawer/mixed-n400-v0"
    assert os.environ["MINARI_DATASETS_PATH"] in str(minari.storage.get_dataset_path(dataset_id))
    data = minari.load_dataset(dataset_id)
    assert data.total_steps == 400
    assert data.storage.metadata["jpeg_encoding"] is False
    assert data.spec.env_spec.id == "Off2OnGraspClosedDrawer-v0"
    metadata = list(data.storage.get_episode_metadata(range(data.total_episodes)))
    policies = [m["policy"] for m in metadata]
    assert policies == sorted(policies, reverse=True)  # scripted episodes first, then random ones
    lengths = [len(ep) for ep in data.iterate_episodes()]
    steps = {p: sum(n for n, q in zip(lengths, policies) if q == p) for p in ("scripted", "random")}
    assert steps == {"scripted": 200, "random": 200}

    episodes = list(data.iterate_episodes())
    for ep in episodes:
        assert ep.observations.shape == (len(ep) + 1, 3, 48, 48)
        assert ep.observations.dtype == np.uint8
        assert ep.actions.shape == (len(ep), 4) and np.all(np.abs(ep.actions) <= 1)
        # reward 1 only on success
        np.testing.assert_array_equal(ep.rewards, ep.terminations.astype(float))
        assert not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
        assert ep.terminations[-1] or ep.truncations[-1]
    scripted = [ep for ep, p in zip(episodes, policies) if p == "scripted"]
    # the last one may be cut short
    assert sum(ep.terminations[-1] for ep in scripted) >= len(scripted) - 2
    random_episodes = [ep for ep, p in zip(episodes[:-1], policies) if p == "random"]
    assert all(len(ep) == 50 for ep in random_episodes)  # the time limit

    # the stored frames are exact: replaying an episode's actions from its seed re-renders them
    env = gym.make(TASKS["grasp-closed-drawer"])
    for i in (0, policies.index("random")):
        frames = [env.reset(seed=metadata[i]["seed"])[0]]
        frames += [env.step(a)[0] for a in episodes[i].actions]
        np.testing.assert_array_equal(np.stack(frames), episodes[i].observations)
    env.close()

    # another seed, another id
    assert generate_dataset("pick-place", size=10, seed=1) == "off2on/pick-place/mixed-n10-seed1-v0"

    # a second call reuses the dataset; a same-named dataset of another size is refused
    monkeypatch.setattr(pixel_envs, "_collect_shard", lambda *a: pytest.fail("regenerated"))
    assert generate_dataset("grasp-closed-drawer", size=400, seed=0) == dataset_id
    with pytest.raises(ValueError, match="minari delete"):
        generate_dataset("grasp-closed-drawer", size=300, dataset_id=dataset_id)


def test_generate_dataset_is_the_same_with_workers(monkeypatch):
    monkeypatch.setattr(pixel_envs, "SHARD_SIZE", 20)  # 4 units of work, episodes cut between them
    one = generate_dataset("pick-place", size=60, seed=3, dataset_id="test/pick-place/one-v0")
    two = "test/pick-place/two-v0"
    two = generate_dataset("pick-place", size=60, seed=3, workers=2, dataset_id=two)
    one, two = minari.load_dataset(one), minari.load_dataset(two)
    assert one.total_episodes == two.total_episodes
    for a, b in zip(one.iterate_episodes(), two.iterate_episodes()):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)


def test_help_prints_the_options_and_writes_nothing(tmp_path):
    docs = os.path.join(ROOT, "docs")
    pictures = {f: os.stat(os.path.join(docs, f)).st_mtime_ns for f in os.listdir(docs)}
    script = os.path.join(ROOT, "pixel_envs.py")
    run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=120)
    helped = subprocess.run([sys.executable, script, "--help"], **run)
    assert helped.returncode == 0 and "--pictures-dir" in helped.stdout
    quiet = subprocess.run(
        [sys.executable, script, "--speed-steps", "0", "--success-episodes", "0"], **run
    )
    assert quiet.returncode == 0, quiet.stderr
    assert {f: os.stat(os.path.join(docs, f)).st_mtime_ns for f in os.listdir(docs)} == pictures
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written where it ran
    asked = subprocess.run(
        [
            sys.executable,
            script,
            "--pictures-dir",
            "pics",
            "--speed-steps",
            "0",
            "--success-episodes",
            "0",
        ],
        **run,
    )
    assert asked.returncode == 0, asked.stderr
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == sorted(
        f"{task}_{kind}.png" for task in TASKS for kind in ("256", "48", "episode")
    )
