"""Pixel-based manipulation after COG, rebuilt in MuJoCo: three tasks and their offline data.

Lee, Seo, Lee, Abbeel, Shin, "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021, https://arxiv.org/abs/2107.00591 (section 6.2, appendix D.2).

    python pixel_envs.py   # docs/{task}_256.png, _48.png, _episode.png; env speed; scripted success

The paper's pixel tasks are COG's (Singh et al., CoRL 2020, https://github.com/avisingh599/cog),
built on PyBullet and roboverse, which no longer install; this file rebuilds them in MuJoCo:

    pick-place            (40 steps)  pick the box up and put it in the tray
    grasp-closed-drawer   (50 steps)  open the closed bottom drawer, grasp the box inside, lift it
                                      out
    grasp-blocked-drawer  (80 steps)  the open top drawer blocks the bottom drawer's handle: close
                                      it, open the bottom drawer, grasp the box inside, lift it out

Observations are 48x48 RGB frames (uint8, channel-first [3, 48, 48]) from a fixed camera; the
reward is 1 on the step the task is solved (the episode then terminates), else 0. Offline data:
scripted, randomized attempts (`ScriptedPolicy`), with half of the transitions from uniform-random
actions, stored as a local Minari dataset with lossless frames (`generate_dataset`); pixel_off2on.py
trains on them. Importing this file registers the tasks with Gymnasium.

What differs from COG: a floating parallel-jaw gripper that only translates, moved by position
actuators on three slide joints, instead of a WidowX arm; one 4 cm box instead of mesh objects;
4-D actions `[dx, dy, dz, grip]` in [-1, 1]^4 at 20 Hz instead of 8-D end-effector actions (no
wrist rotation: every grasp is top-down); MuJoCo instead of PyBullet, so frames, dynamics and the
scripted data are not COG's. Docs: docs/pixels.md.
"""

import os

# headless rendering (Mesa's EGL): MuJoCo reads this once, when it is first imported
os.environ.setdefault("MUJOCO_GL", "egl")

import multiprocessing
import time
import warnings
from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np


@dataclass
class Args:
    """Run as a script: the tasks' pictures, an env step's speed, the scripted success rates."""

    pictures_dir: str | None = None
    """write each task's pictures to this folder (`docs` rewrites those of docs/pixels.md)"""
    speed_steps: int = 2_000
    """env steps timed, each rendering its 48x48 frame (0: skip)"""
    success_episodes: int = 100
    """scripted episodes per task for the success rates (0: skip)"""


TASKS = {
    "pick-place": "Off2OnPickPlace-v0",
    "grasp-closed-drawer": "Off2OnGraspClosedDrawer-v0",
    "grasp-blocked-drawer": "Off2OnGraspBlockedDrawer-v0",
}
EPISODE_LENGTH = {"pick-place": 40, "grasp-closed-drawer": 50, "grasp-blocked-drawer": 80}
IMAGE_SIZE = 48  # agent view, pixels per side
VIDEO_SIZE = 256  # env.render() with render_mode="rgb_array"

# ---------------------------------------------------------------------------------------------
# The scene. World frame: the table top is z = 0, x points right and y away from the camera.
# Tray on the left; cabinet on the right with its drawers opening towards the camera (-y).
# The gripper's origin is its pinch point (between the fingertips), so the three slide joints
# hold the pinch point's world position. Fingers close along y.
#
# Handles stick out of the drawer fronts, the bottom one further (6 cm) and further right than the
# top one (2.5 cm, left), so a top-down grasp reaches the bottom handle while the top drawer is
# closed. The top drawer, once open 12 cm, lies over the bottom handle: that is "blocked".
# ---------------------------------------------------------------------------------------------
SCENE_XML = """
<mujoco model="off2on_tabletop">
  <option timestep="0.002" integrator="implicitfast"/>
  <visual>
    <global offwidth="256" offheight="256"/>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.55 0.55 0.55" specular="0 0 0"/>
  </visual>
  <default>
    <geom solref="0.005 1" friction="1 0.005 0.0001"/>
    <default class="cabinet"><geom type="box" rgba="0.55 0.42 0.3 1"/></default>
    <default class="drawer"><geom type="box" rgba="0.78 0.65 0.48 1"/></default>
    <default class="handle"><geom type="box" rgba="0.15 0.15 0.15 1"/></default>
    <default class="tray"><geom type="box" rgba="0.2 0.35 0.75 1"/></default>
    <default class="finger">
      <geom type="box" size="0.012 0.005 0.025" condim="4" rgba="0.2 0.2 0.2 1"/>
    </default>
  </default>

  <worldbody>
    <light pos="0 -0.3 1.2" dir="0 0.25 -1" directional="true" castshadow="false"
           diffuse="0.4 0.4 0.4"/>
    <camera name="agentview" pos="0.05 -0.36 0.6" xyaxes="1 0 0 0 0.876 0.482" fovy="55"/>
    <geom name="table" type="box" pos="0.02 0 -0.02" size="0.6 0.7 0.02" rgba="0.85 0.8 0.72 1"/>

    <body name="tray" pos="-0.14 -0.04 0">
      <geom class="tray" pos="0 0 0.003" size="0.08 0.08 0.003"/>
      <geom class="tray" pos="-0.078 0 0.018" size="0.003 0.08 0.015"/>
      <geom class="tray" pos="0.078 0 0.018" size="0.003 0.08 0.015"/>
      <geom class="tray" pos="0 -0.078 0.018" size="0.08 0.003 0.015"/>
      <geom class="tray" pos="0 0.078 0.018" size="0.08 0.003 0.015"/>
    </body>

    <!-- cabinet: x in [0.06, 0.30], y in [0, 0.20], z in [0, 0.16]; two slots for the drawers -->
    <body name="cabinet" pos="0.18 0 0">
      <geom class="cabinet" pos="-0.115 0.1 0.08" size="0.005 0.1 0.08"/>
      <geom class="cabinet" pos="0.115 0.1 0.08" size="0.005 0.1 0.08"/>
      <geom class="cabinet" pos="0 0.195 0.08" size="0.12 0.005 0.08"/>
      <geom class="cabinet" pos="0 0.1 0.155" size="0.12 0.1 0.005"/>
      <geom class="cabinet" pos="0 0.1 0.0775" size="0.11 0.1 0.0025"/>
      <geom class="cabinet" pos="0 0.1 0.0025" size="0.11 0.1 0.0025"/>

      <!-- a drawer: front plate y in [-0.01, 0], open box behind it; joint value = how far open -->
      <body name="bottom_drawer" pos="0 0 0.005">
        <joint name="bottom_drawer" type="slide" axis="0 -1 0" range="0 0.18" damping="5"
               frictionloss="0.5" solreflimit="0.005 1"/>
        <geom class="drawer" pos="0 -0.005 0.035" size="0.108 0.005 0.034"/>
        <geom class="drawer" pos="0 0.09 0.0035" size="0.104 0.09 0.0025"/>
        <geom class="drawer" pos="-0.101 0.09 0.032" size="0.003 0.09 0.026"/>
        <geom class="drawer" pos="0.101 0.09 0.032" size="0.003 0.09 0.026"/>
        <geom class="drawer" pos="0 0.177 0.032" size="0.104 0.003 0.026"/>
        <geom name="bottom_handle" class="handle" pos="0.06 -0.07 0.035" size="0.035 0.006 0.006"/>
        <geom class="handle" pos="0.03 -0.04 0.035" size="0.004 0.03 0.004"/>
        <geom class="handle" pos="0.09 -0.04 0.035" size="0.004 0.03 0.004"/>
      </body>
      <body name="top_drawer" pos="0 0 0.08">
        <joint name="top_drawer" type="slide" axis="0 -1 0" range="0 0.18" damping="5"
               frictionloss="0.5" solreflimit="0.005 1"/>
        <geom class="drawer" pos="0 -0.005 0.035" size="0.108 0.005 0.034"/>
        <geom class="drawer" pos="0 0.09 0.0035" size="0.104 0.09 0.0025"/>
        <geom class="drawer" pos="-0.101 0.09 0.032" size="0.003 0.09 0.026"/>
        <geom class="drawer" pos="0.101 0.09 0.032" size="0.003 0.09 0.026"/>
        <geom class="drawer" pos="0 0.177 0.032" size="0.104 0.003 0.026"/>
        <geom name="top_handle" class="handle" pos="-0.08 -0.035 0.035" size="0.035 0.006 0.006"/>
        <geom class="handle" pos="-0.11 -0.0225 0.035" size="0.004 0.0125 0.004"/>
        <geom class="handle" pos="-0.05 -0.0225 0.035" size="0.004 0.0125 0.004"/>
      </body>
    </body>

    <body name="box" pos="0 -0.12 0.02">
      <freejoint name="box"/>
      <geom name="box" type="box" size="0.02 0.02 0.02" mass="0.05" condim="4"
            rgba="0.85 0.1 0.1 1"/>
    </body>

    <!-- floating gripper: translation only (three slide joints), so it never tilts; gravity
         compensated; finger joint value = the finger's distance from closed (inner faces) -->
    <body name="hand" pos="0 0 0" gravcomp="1">
      <joint name="hand_x" type="slide" axis="1 0 0" range="-0.3 0.34" damping="100"/>
      <joint name="hand_y" type="slide" axis="0 1 0" range="-0.3 0.2" damping="100"/>
      <joint name="hand_z" type="slide" axis="0 0 1" range="0 0.3" damping="100"/>
      <geom name="palm" type="box" pos="0 0 0.045" size="0.02 0.04 0.01" mass="0.5"
            rgba="0.3 0.65 0.3 1"/>
      <body name="finger_left" gravcomp="1">
        <joint name="finger_left" type="slide" axis="0 1 0" range="0 0.03" damping="15"
               armature="0.01" solreflimit="0.004 1" solimplimit="0.99 0.999 0.001"/>
        <geom name="finger_left" class="finger" pos="0 0.005 0.01"/>
      </body>
      <body name="finger_right" gravcomp="1">
        <joint name="finger_right" type="slide" axis="0 -1 0" range="0 0.03" damping="15"
               armature="0.01" solreflimit="0.004 1" solimplimit="0.99 0.999 0.001"/>
        <geom name="finger_right" class="finger" pos="0 -0.005 0.01"/>
      </body>
    </body>
  </worldbody>

  <!-- the drawers slide inside the static cabinet: no contacts between them and it -->
  <contact>
    <exclude body1="cabinet" body2="bottom_drawer"/>
    <exclude body1="cabinet" body2="top_drawer"/>
    <exclude body1="finger_left" body2="finger_right"/>
  </contact>

  <!-- step() puts the hand's set point up to MAX_MOVE = 4 cm away from where the hand is -->
  <actuator>
    <position name="hand_x" joint="hand_x" kp="5000" ctrlrange="-0.26 0.3" forcerange="-100 100"/>
    <position name="hand_y" joint="hand_y" kp="5000" ctrlrange="-0.26 0.08" forcerange="-100 100"/>
    <position name="hand_z" joint="hand_z" kp="5000" ctrlrange="0.015 0.25" forcerange="-100 100"/>
    <!-- grip in [-1, 1]: +1 squeezes with 5 N per finger, -1 opens -->
    <motor name="finger_left" joint="finger_left" gear="-5" ctrlrange="-1 1"/>
    <motor name="finger_right" joint="finger_right" gear="-5" ctrlrange="-1 1"/>
  </actuator>
</mujoco>
"""

MAX_MOVE = 0.04  # metres the gripper set point moves per step at |action| = 1
FRAME_SKIP = 25  # physics steps of 2 ms per env step: 20 Hz
WORKSPACE_LOW = np.array([-0.26, -0.26, 0.015])  # set-point limits of the pinch point
WORKSPACE_HIGH = np.array([0.30, 0.08, 0.25])
TRAY_CENTER = np.array([-0.14, -0.04])
TRAY_INNER_HALF = 0.075  # pick-place succeeds when the box centre is over the tray floor ...
TRAY_MAX_Z = 0.06  # ... and low (resting in the tray or just being put down)
BOX_HALF = 0.02
LIFTED_Z = 0.11  # drawer tasks succeed when the grasped box's centre is above this (its bottom
#                   then clears the bottom drawer's front plate, top at z = 0.074, by 1.6 cm)
DRAWER_FLOOR_Z = 0.011  # top of the bottom drawer's floor (world)
BLOCKING_OPENING = 0.12  # the top drawer starts this far open in grasp-blocked-drawer


class PixelManipEnv(gym.Env):
    """Tabletop task `task` (a key of TASKS) seen through a fixed 48x48 camera.

    obs_mode "pixels" (default) returns uint8 frames [3, 48, 48]; "state" returns a float32 vector
    (gripper position, finger openings, box position and quaternion, drawer openings) and renders
    nothing, for fast tests of the dynamics and the scripted policies."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self, task: str = "pick-place", obs_mode: str = "pixels", render_mode: str | None = None
    ):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: use one of {list(TASKS)}")
        if obs_mode not in ("pixels", "state"):
            raise ValueError(f"obs_mode must be 'pixels' or 'state', got {obs_mode!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task, self.obs_mode, self.render_mode = task, obs_mode, render_mode
        self.model = mujoco.MjModel.from_xml_string(SCENE_XML)
        self.data = mujoco.MjData(self.model)
        self._renderers = {}  # frame size -> mujoco.Renderer, created on first use
        m = self.model
        self._hand_adr = m.joint("hand_x").qposadr[0]  # hand_x, hand_y, hand_z are consecutive
        self._finger_adr = [m.joint(f).qposadr[0] for f in ("finger_left", "finger_right")]
        self._drawer_adr = {d: m.joint(d).qposadr[0] for d in ("bottom_drawer", "top_drawer")}
        self._box_adr = m.joint("box").qposadr[0]
        self._box_geom = m.geom("box").id
        self._finger_geoms = {m.geom("finger_left").id, m.geom("finger_right").id}
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        if obs_mode == "pixels":
            self.observation_space = gym.spaces.Box(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        else:
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (14,), np.float32)

    # --- privileged state, read by the scripted policies and the success checks ---
    def hand_pos(self) -> np.ndarray:
        """World position of the gripper's pinch point."""
        return self.data.qpos[self._hand_adr : self._hand_adr + 3].copy()

    def finger_opening(self) -> float:
        """Distance between the fingers' inner faces (0: closed, 0.06: fully open)."""
        return float(sum(self.data.qpos[a] for a in self._finger_adr))

    def box_pos(self) -> np.ndarray:
        """World position of the box's centre."""
        return self.data.qpos[self._box_adr : self._box_adr + 3].copy()

    def drawer_opening(self, drawer: str) -> float:
        """How far `drawer` ("bottom_drawer" or "top_drawer") is pulled out, metres."""
        return float(self.data.qpos[self._drawer_adr[drawer]])

    def handle_pos(self, drawer: str) -> np.ndarray:
        """World position of the centre of `drawer`'s handle bar."""
        return self.data.geom(drawer.replace("drawer", "handle")).xpos.copy()

    def box_grasped(self) -> bool:
        """Both fingers touch the box."""
        touching = set()
        for c in self.data.contact[: self.data.ncon]:
            if c.geom1 == self._box_geom or c.geom2 == self._box_geom:
                touching.add(c.geom2 if c.geom1 == self._box_geom else c.geom1)
        return self._finger_geoms <= touching

    def success(self) -> bool:
        """COG's success: pick-place, the box is in the tray; drawer tasks, the box (which starts
        in the bottom drawer) is held by the gripper and lifted out of the drawer."""
        box = self.box_pos()
        if self.task == "pick-place":
            over_tray = np.all(np.abs(box[:2] - TRAY_CENTER) < TRAY_INNER_HALF)
            return bool(over_tray and box[2] < TRAY_MAX_Z)
        return bool(box[2] > LIFTED_Z and self.box_grasped())

    # --- gymnasium API ---
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Random initial state from self.np_random: gripper (open) high above the table's middle,
        box position and yaw, and in grasp-blocked-drawer how far the top drawer is open."""
        super().reset(seed=seed)
        rng, m, d = self.np_random, self.model, self.data
        mujoco.mj_resetData(m, d)
        hand = rng.uniform([-0.06, -0.06, 0.15], [0.02, 0.0, 0.2])
        d.qpos[self._hand_adr : self._hand_adr + 3] = hand
        d.ctrl[:3] = hand
        for a in self._finger_adr:
            d.qpos[a] = 0.03  # open
        yaw = rng.uniform(-0.25, 0.25)
        if self.task == "pick-place":
            box = [rng.uniform(-0.04, 0.05), rng.uniform(-0.17, -0.09), BOX_HALF]
        else:  # inside the closed bottom drawer (x of the cabinet's centre is 0.18)
            x, y = 0.18 + rng.uniform(-0.06, 0.02), rng.uniform(0.055, 0.075)
            box = [x, y, DRAWER_FLOOR_Z + BOX_HALF]
        d.qpos[self._box_adr : self._box_adr + 3] = box
        d.qpos[self._box_adr + 3 : self._box_adr + 7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        if self.task == "grasp-blocked-drawer":
            d.qpos[self._drawer_adr["top_drawer"]] = BLOCKING_OPENING + rng.uniform(-0.01, 0.01)
        mujoco.mj_forward(m, d)
        return self._observation(), {"success": False}

    def step(self, action):
        """Move the gripper's set point by MAX_MOVE * action[:3], squeeze with action[3], simulate
        50 ms."""
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        d = self.data
        d.ctrl[:3] = np.clip(self.hand_pos() + MAX_MOVE * action[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        d.ctrl[3:5] = action[3]
        mujoco.mj_step(self.model, d, nstep=FRAME_SKIP)
        success = self.success()
        return self._observation(), float(success), success, False, {"success": success}

    def _observation(self) -> np.ndarray:
        if self.obs_mode == "state":
            qpos, box = self.data.qpos, slice(self._box_adr, self._box_adr + 7)
            drawers = [self.drawer_opening("bottom_drawer"), self.drawer_opening("top_drawer")]
            parts = [self.hand_pos(), qpos[self._finger_adr], qpos[box], drawers]
            return np.concatenate(parts).astype(np.float32)
        return self.render_frame(IMAGE_SIZE).transpose(2, 0, 1).copy()  # [3, 48, 48]

    def render_frame(self, size: int) -> np.ndarray:
        """The agent camera's view, [size, size, 3] uint8 (size <= 256)."""
        renderer = self._renderers.get(size)
        if renderer is None:
            try:
                renderer = self._renderers[size] = mujoco.Renderer(self.model, size, size)
            except Exception as e:
                gl = os.environ.get("MUJOCO_GL")
                raise RuntimeError(
                    f"no OpenGL context for rendering (MUJOCO_GL={gl!r}): set MUJOCO_GL=egl before "
                    "anything imports mujoco, and install the Debian packages libegl1 libegl-mesa0 "
                    "libgl1-mesa-dri libopengl0"
                ) from e
        renderer.update_scene(self.data, camera="agentview")
        return renderer.render()

    def render(self):
        if self.render_mode == "rgb_array":
            return self.render_frame(VIDEO_SIZE)
        return None

    def close(self):
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()


def _register_envs():
    """Register the three tasks with Gymnasium, with their time limits (a re-import registers
    nothing twice)."""
    for task, env_id in TASKS.items():
        if env_id not in gym.registry:
            gym.register(
                env_id,
                entry_point="pixel_envs:PixelManipEnv",
                max_episode_steps=EPISODE_LENGTH[task],
                kwargs={"task": task},
            )


_register_envs()


# ---------------------------------------------------------------------------------------------
# Scripted policies, COG style: a fixed sequence of phases with randomized targets and durations,
# plus Gaussian noise on every action. They read the simulator state (privileged information).
# Each script is a generator of noise-free actions; a phase steers the pinch point to a target.
# ---------------------------------------------------------------------------------------------
OPEN, CLOSE = -1.0, 1.0


def _move_to(env, target, grip, tol=0.008, max_steps=15, until=None):
    """Steer the pinch point to `target` holding `grip`, until within `tol` (per axis), `until()`
    is true, or `max_steps` steps have passed."""
    target = np.asarray(target, dtype=np.float64)
    for _ in range(max_steps):
        error = target - env.hand_pos()
        if np.max(np.abs(error)) < tol or (until is not None and until()):
            return
        yield np.append(np.clip(error / MAX_MOVE, -1.0, 1.0), grip)


def _hold(grip, steps):
    """Keep still for `steps` steps while opening or closing the fingers."""
    for _ in range(steps):
        yield np.array([0.0, 0.0, 0.0, grip])


def _grasp_box_and_lift(env, rng, lift_z, approach_dz=0.06):
    """Open above the box, come down around it, close, lift to `lift_z`."""
    box = env.box_pos()
    above = box + [0.0, 0.0, approach_dz + rng.uniform(-0.01, 0.01)]
    yield from _move_to(env, above, OPEN, tol=0.01)
    box = env.box_pos()
    yield from _move_to(env, box + [0.0, 0.0, rng.uniform(-0.004, 0.004)], OPEN, tol=0.01)
    yield from _hold(CLOSE, int(rng.integers(2, 4)))
    hand = env.hand_pos()
    yield from _move_to(env, [hand[0], hand[1], lift_z], CLOSE)


def pick_place_script(env, rng):
    """Grasp the box, lift it, carry it over a random point of the tray, lower it, let go."""
    lift_z = rng.uniform(0.08, 0.12)
    yield from _grasp_box_and_lift(env, rng, lift_z)
    place = TRAY_CENTER + rng.uniform(-0.03, 0.03, size=2)
    yield from _move_to(env, [place[0], place[1], lift_z], CLOSE, tol=0.015)
    yield from _move_to(env, [place[0], place[1], rng.uniform(0.04, 0.05)], CLOSE)
    yield from _hold(OPEN, 3)


def _open_bottom_drawer(env, rng):
    """Grasp the bottom drawer's handle bar from above, pull the drawer open, let go, back off up.
    The gripper comes down from above the top handle's height, so it never hits that handle."""
    handle = env.handle_pos("bottom_drawer")
    yield from _move_to(env, handle + [0.0, 0.0, rng.uniform(0.1, 0.12)], OPEN, tol=0.012)
    handle = env.handle_pos("bottom_drawer")
    yield from _move_to(env, handle + [rng.uniform(-0.01, 0.01), 0.0, 0.0], OPEN, tol=0.01)
    yield from _hold(CLOSE, int(rng.integers(2, 4)))
    yield from _move_to(env, handle - [0.0, rng.uniform(0.16, 0.175), 0.0], CLOSE)
    yield from _hold(OPEN, 2)
    hand = env.hand_pos()
    yield from _move_to(env, [hand[0], hand[1], 0.12], OPEN, tol=0.015)


def _close_top_drawer(env, rng):
    """Push the open top drawer shut with the closed gripper against its front plate, back off."""
    front_y = -0.01 - env.drawer_opening("top_drawer")
    x, z = 0.20 + rng.uniform(-0.02, 0.02), 0.095 + rng.uniform(-0.003, 0.003)
    yield from _move_to(env, [x, front_y - 0.07, 0.185], CLOSE, tol=0.015)  # over, in front of it
    yield from _move_to(env, [x, front_y - 0.07, z], CLOSE, tol=0.01)

    def shut():
        return env.drawer_opening("top_drawer") < 0.004

    yield from _move_to(env, [x, 0.0, z], CLOSE, until=shut)  # push until the drawer is shut
    yield from _move_to(env, [x, -0.08, z], CLOSE, tol=0.015)


def grasp_closed_drawer_script(env, rng):
    """Open the bottom drawer, then grasp the box inside and lift it out."""
    yield from _open_bottom_drawer(env, rng)
    yield from _grasp_box_and_lift(env, rng, rng.uniform(0.15, 0.18), approach_dz=0.08)


def grasp_blocked_drawer_script(env, rng):
    """Close the top drawer (it covers the bottom handle), open the bottom drawer, grasp the box."""
    yield from _close_top_drawer(env, rng)
    yield from _open_bottom_drawer(env, rng)
    yield from _grasp_box_and_lift(env, rng, rng.uniform(0.15, 0.18), approach_dz=0.08)


SCRIPTS = {
    "pick-place": pick_place_script,
    "grasp-closed-drawer": grasp_closed_drawer_script,
    "grasp-blocked-drawer": grasp_blocked_drawer_script,
}


class ScriptedPolicy:
    """Noisy scripted policy for `task`: `act(env)` reads the state of `env` (the gymnasium env or
    its unwrapped PixelManipEnv) and returns an action; call `reset()` at every episode start."""

    def __init__(self, task: str, noise: float = 0.1, seed: int | None = None):
        if task not in SCRIPTS:
            raise ValueError(f"unknown task {task!r}: use one of {list(SCRIPTS)}")
        self.task, self.noise = task, noise
        self.rng = np.random.default_rng(seed)
        self._plan = None
        self._grip = OPEN

    def reset(self):
        self._plan, self._grip = None, OPEN

    def act(self, env) -> np.ndarray:
        env = env.unwrapped
        if self._plan is None:
            self._plan = SCRIPTS[self.task](env, self.rng)
        action = next(self._plan, None)
        if action is None:  # script done, yet the episode goes on: try again from the current state
            self._plan = SCRIPTS[self.task](env, self.rng)
            action = next(self._plan, np.array([0.0, 0.0, 0.0, self._grip]))
        self._grip = action[3]
        action = action + self.rng.normal(0.0, self.noise, size=4)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Offline dataset: half scripted rollouts, half uniform-random rollouts (paper appendix D.2),
# stored as a local Minari dataset with lossless frames.
# ---------------------------------------------------------------------------------------------
SHARD_SIZE = 5_000  # transitions per unit of work; the data depend on it, not on the worker count


def _collect_shard(task: str, policy: str, n_steps: int, seed: int) -> list:
    """Roll out `policy` ("scripted" or "random") in a fresh `task` env for exactly `n_steps`
    transitions; the last episode is cut (truncated) if the budget ends inside it."""
    from minari.data_collector import EpisodeBuffer

    env = gym.make(TASKS[task])
    rng = np.random.default_rng(seed)
    scripted = ScriptedPolicy(task, seed=int(rng.integers(2**63))) if policy == "scripted" else None
    episodes, steps = [], 0
    while steps < n_steps:
        episode_seed = int(rng.integers(2**31))
        obs, _ = env.reset(seed=episode_seed)
        if scripted is not None:
            scripted.reset()
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        terminated = truncated = False
        while not (terminated or truncated):
            if scripted is not None:
                action = scripted.act(env)
            else:
                action = rng.uniform(-1.0, 1.0, size=4).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            steps += 1
            truncated = truncated or steps == n_steps
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated and not terminated)
        episode = EpisodeBuffer(
            seed=episode_seed, observations=np.stack(observations), actions=np.stack(actions),
            rewards=np.array(rewards), terminations=np.array(terminations),
            truncations=np.array(truncations),
        )  # fmt: skip
        episodes.append(episode)
    env.close()
    return episodes


def _collect_shard_args(args):
    return _collect_shard(*args)


def generate_dataset(
    task: str, size: int = 200_000, seed: int = 0, workers: int = 1, dataset_id: str | None = None
) -> str:
    """Collect `size` transitions for `task` (size // 2 from the noisy scripted policy, the rest
    from uniform-random actions) and store them as the local Minari dataset `dataset_id`
    [default: off2on/{task}/mixed-n{size}-v0, or ...-n{size}-seed{seed}-v0 for seed != 0] with
    lossless frames (in $MINARI_DATASETS_PATH, default ~/.minari/datasets); return its id. If the
    dataset already exists locally, return its id at once.

    Episodes: scripted ones first, then random ones. Each holds observations [T+1, 3, 48, 48]
    uint8, actions [T, 4], rewards, terminations (success) and truncations (time limit, or the
    end of a unit of work); its metadata hold the reset seed and "policy" ("scripted"/"random").
    `workers` > 1 collects in that many processes; the data are the same for any worker count."""
    import minari

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {list(TASKS)}")
    if size < 2:
        raise ValueError(f"size must be at least 2 (half scripted, half random), got {size}")
    dataset_id = dataset_id or f"off2on/{task}/mixed-n{size}{f'-seed{seed}' if seed else ''}-v0"
    try:
        existing = minari.load_dataset(dataset_id)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if existing.total_steps != size:
            raise ValueError(
                f"{dataset_id} exists locally with {existing.total_steps} of {size} transitions "
                f"(an interrupted run?): delete it with `minari delete {dataset_id}` and rerun"
            )
        return dataset_id

    jobs = []
    for policy, n in (("scripted", size // 2), ("random", size - size // 2)):
        jobs += [(task, policy, min(SHARD_SIZE, n - start)) for start in range(0, n, SHARD_SIZE)]
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(len(jobs))]
    jobs = [job + (job_seed,) for job, job_seed in zip(jobs, seeds)]

    description = (
        f"Off2On {task}: {size // 2} transitions of noisy scripted rollouts, "
        f"then {size - size // 2} of uniform-random actions (pixel_envs.py)."
    )
    print(f"{dataset_id}: collecting {size:,} transitions with {workers} worker(s)", flush=True)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    results = pool.imap(_collect_shard_args, jobs) if pool else map(_collect_shard_args, jobs)
    dataset, done, next_report, start_time = None, 0, 0.1, time.time()
    try:
        for (_, policy, n_steps, _), episodes in zip(jobs, results):
            if dataset is None:
                with warnings.catch_warnings():  # minari nags about author and code links
                    warnings.simplefilter("ignore", UserWarning)
                    dataset = minari.create_dataset_from_buffers(
                        dataset_id, episodes, env=TASKS[task], ref_min_score=0.0,
                        ref_max_score=1.0, jpeg_encoding=False, description=description,
                        algorithm_name=f"scripted+random ({task})",
                    )  # fmt: skip
            else:
                dataset.update_dataset_from_buffer(episodes)
            new = range(dataset.total_episodes - len(episodes), dataset.total_episodes)
            dataset.storage.update_episode_metadata([{"policy": policy}] * len(episodes), new)
            done += n_steps
            if done >= next_report * size or done == size:
                rate = done / (time.time() - start_time)
                progress = f"{done:,}/{size:,} transitions ({100 * done / size:.0f}%)"
                print(f"{dataset_id}: {progress}, {rate:,.0f} transitions/s", flush=True)
                next_report = np.floor(10 * done / size) / 10 + 0.1
    finally:
        if pool:
            pool.terminate()
    return dataset_id


if __name__ == "__main__":
    import tyro
    from PIL import Image

    args = tyro.cli(Args)
    # PICTURES of each task for docs/pixels.md: the first frame at 256x256 and as the agent sees
    # it (48x48), and six frames of a scripted episode
    docs = args.pictures_dir
    if docs:
        os.makedirs(docs, exist_ok=True)
    for task in TASKS if docs else ():
        env = PixelManipEnv(task)
        obs, _ = env.reset(seed=0)
        Image.fromarray(env.render_frame(VIDEO_SIZE)).save(os.path.join(docs, f"{task}_256.png"))
        Image.fromarray(obs.transpose(1, 2, 0)).save(os.path.join(docs, f"{task}_48.png"))
        policy, frames = ScriptedPolicy(task, seed=0), [env.render_frame(VIDEO_SIZE)]
        for _ in range(EPISODE_LENGTH[task]):
            _, _, terminated, _, _ = env.step(policy.act(env))
            frames.append(env.render_frame(VIDEO_SIZE))
            if terminated:
                break
        picks = np.linspace(0, len(frames) - 1, 6).round().astype(int)
        strip = np.concatenate([frames[i][::2, ::2] for i in picks], axis=1)
        Image.fromarray(strip).save(os.path.join(docs, f"{task}_episode.png"))
        env.close()
        print(f"{task}: pictures written to {docs}/")

    # SPEED of an env step that renders its 48x48 frame
    env, rng = gym.make(TASKS["pick-place"]), np.random.default_rng(0)
    env.reset(seed=0)
    start = time.time()
    for step in range(args.speed_steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, size=4))
        if terminated or truncated:
            env.reset()
    if args.speed_steps:
        rate = args.speed_steps / (time.time() - start)
        print(f"env steps/s with a 48x48 frame each step (random actions): {rate:,.0f}")
    env.close()

    # SCRIPTED SUCCESS at the default noise, on the state (no rendering needed)
    n = args.success_episodes
    for task in TASKS if n else ():
        env, policy = PixelManipEnv(task, obs_mode="state"), ScriptedPolicy(task, seed=0)
        successes = 0
        for episode in range(n):
            env.reset(seed=episode)
            policy.reset()
            for _ in range(EPISODE_LENGTH[task]):
                if env.step(policy.act(env))[2]:
                    successes += 1
                    break
        rate = f"{successes / n:.0%} over {n} episodes (noise {policy.noise})"
        print(f"{task}: scripted success {rate}")
