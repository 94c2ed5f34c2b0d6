"""Sweeps and figures: every run of one of the paper's figures with one command, locally or on
Slurm, then its learning curves, aggregate scores and tables drawn straight from the logs.

Lee, Seo, Lee, Abbeel, Shin, "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021, https://arxiv.org/abs/2107.00591 (Figures 3-5, appendix E).

    python benchmark.py --grid fig3 --seeds 3 --backend local --workers 2
    python benchmark.py --grid fig3 --seeds 5 --backend slurm --slurm-partition gpu
    python benchmark.py --plot runs --out docs/figures

A sweep is a list of jobs, each one invocation of an existing script with its own --exp-name and
--seed, always with --resume: a dataset job per dataset, a CQL pretraining job per (dataset,
seed) that the fine-tuning runs of that seed wait for, then the runs. A finished job leaves a
marker in --sweep-dir and is skipped next time; a failed one is reported with its command and the
tail of its log, and the others go on. The local pool follows CleanRL's
cleanrl_utils/benchmark.py (worker threads, each running one command); Slurm jobs go through
submitit; the aggregate scores are rliable's (Agarwal et al., NeurIPS 2021: IQM and mean with
stratified bootstrap intervals, performance profiles).
Docs: docs/benchmark.md.
"""

import difflib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Literal

import tyro

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    grid: Literal["fig3", "fig4c", "fig4d", "e1", "pixels", "finetune"] = "fig3"
    """which figure's runs: fig3 (the method and the baselines), fig4c (replay), fig4d (ensemble
    size), e1 (appendix E.1 variants), pixels (Figure 5), finetune (what fine-tunes one
    pretrained ensemble: the method, SAC-ft, CQL-ft, uniform replay, one agent; and AWAC)"""
    seeds: int = 5
    """seeds 1..seeds of every run"""
    env_ids: tuple[str, ...] = ()
    """datasets (pixel tasks for `--grid pixels`) instead of the grid's own"""
    methods: tuple[str, ...] = ()
    """only these of the grid's methods, by exp name (`--dry-run` lists them)"""
    extra: str = ""
    """flags for every run, e.g. "--total-timesteps 10000"; a flag a script lacks is left out
    of its runs (said once); the pretraining jobs get the ones fine-tuning passes to it"""
    dataset_dir: str | None = None
    """folder of D4RL .hdf5 files named as D4RL names them (hopper_medium_replay-v2.hdf5): a
    dataset with its file there is read from it (`--dataset-path`); medium-replay needs one"""
    checkpoint: str | None = None
    """start every run that fine-tunes a pretrained ensemble from this checkpoint (e.g. agents
    imported with `cql_pretrain.py --import-rlkit`): no pretraining jobs"""
    track: bool = False
    """pass --track to every training run (Weights & Biases), grouped as the figure is drawn: the
    grid is the W&B group, the method the job type"""
    pretrain_extra: str = ""
    """flags for the cql_pretrain.py jobs only, e.g. "--log-every 100" """
    backend: Literal["local", "slurm", "submitit-local"] = "local"
    """local: a pool of worker processes; slurm: one submitit job per run; submitit-local:
    submitit's local executor (the slurm path without a cluster)"""
    workers: int = 2
    """runs at a time (local and submitit-local)"""
    threads: int = 1
    """OMP_NUM_THREADS and MKL_NUM_THREADS of every run"""
    sweep_dir: str = "sweeps"
    """per-run logs (logs/), finished-run markers (done/), locks, submitit's files"""
    dry_run: bool = False
    """print the commands, jobs that others wait for first, and exit"""
    slurm_partition: str | None = None
    """Slurm partition (the cluster's default if not given)"""
    slurm_account: str | None = None
    """Slurm account to charge, where the cluster asks for one"""
    slurm_time: int = 240
    """minutes per Slurm job; a job at its limit is requeued and continues with --resume"""
    slurm_gpus: int = 1
    """GPUs per Slurm job"""
    slurm_cpus: int = 4
    """CPUs per Slurm job"""
    slurm_mem_gb: int = 32
    """memory per Slurm job"""
    slurm_max_requeues: int = 20
    """how many times a job that hit its time limit is requeued"""
    plot: str | None = None
    """draw figures, tables and aggregate scores from the TensorBoard runs under this folder
    (every grid that has runs there) instead of running a sweep"""
    out: str = "figures"
    """where `--plot` writes {grid}_curves.png/.pdf, fig4a/fig4b, aggregates, tables, data"""
    bootstrap_reps: int = 50_000
    """stratified bootstrap resamples of the aggregate scores' 95% intervals"""
    at_steps: tuple[int, ...] = ()
    """with `--plot`: also tabulate the scores at these online steps, and the dip (the drop of
    the paper's Figure 1, defined in `o2o_metrics`)"""
    reference: tuple[str, ...] = ()
    """with `--plot`: runs of other code drawn (dashed) and tabulated beside the grid's, as
    `LABEL=FILE.csv` with columns `env_steps` and `normalized_score` (e.g. the official code's
    log), cut at the grid's last step"""


# ---------------------------------------------------------------------------------------------
# Grids: the paper's figures as lists of methods (script, exp name, flags) and datasets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    exp_name: str
    label: str  # as in the paper's legends
    script: str
    flags: tuple[str, ...] = ()
    pretrained: bool = False  # starts from the CQL ensemble of cql_pretrain.py


LOCOMOTION = tuple(
    f"{env}-{kind}-v2"
    for env in ("halfcheetah", "hopper", "walker2d")
    for kind in ("random", "medium", "medium-replay", "medium-expert")
)
PIXEL_TASKS = ("pick-place", "grasp-closed-drawer", "grasp-blocked-drawer")
FT = "off2on_finetune.py"
N5 = ("--ensemble-size", "5")
ONE_AGENT_ONLINE = ("--ensemble-size", "1", "--replay", "online-only")


def variant(exp_name: str, label: str, *flags: str) -> Method:
    """The method (5 pretrained agents, off2on_finetune.py) with other flags: the ablations."""
    return Method(exp_name, label, FT, (*N5, *flags), True)


GRIDS = {
    "fig3": (
        variant("off2on_finetune", "Ours"),
        Method("sac", "SAC", FT, (*ONE_AGENT_ONLINE, "--from-scratch")),
        Method("sac-ft", "SAC-ft", FT, ONE_AGENT_ONLINE, True),
        Method("cql-ft", "CQL-ft", FT, (*ONE_AGENT_ONLINE, "--finetune-loss", "cql"), True),
        Method("awac", "AWAC", "awac_finetune.py"),
        Method("bcq-ft", "BCQ-ft", "bcq_finetune.py"),
    ),
    "fig4c": (
        variant("off2on_finetune", "Balanced"),
        variant("uniform", "Uniform", "--replay", "uniform"),
        variant("online", "Online only", "--replay", "online-only"),
    ),
    "fig4d": (  # members 0..N-1 of the 5-agent checkpoint
        Method("n1", "N=1", FT, ("--ensemble-size", "1"), True),
        Method("n2", "N=2", FT, ("--ensemble-size", "2"), True),
        variant("off2on_finetune", "N=5"),
    ),
    "e1": (
        variant("off2on_finetune", "No reg (ours)"),
        variant("cql-reg", "CQL Reg", "--finetune-loss", "cql"),
        variant("ratio-replay", "d_on / d_replay", "--ratio-target", "replay"),
    ),
    "finetune": (  # one pretrained ensemble (--checkpoint), fine-tuned five ways; AWAC beside
        variant("off2on_finetune", "Ours"),
        Method("sac-ft", "SAC-ft", FT, ONE_AGENT_ONLINE, True),
        Method("cql-ft", "CQL-ft", FT, (*ONE_AGENT_ONLINE, "--finetune-loss", "cql"), True),
        variant("uniform", "Uniform replay", "--replay", "uniform"),
        Method("n1", "N=1", FT, ("--ensemble-size", "1"), True),
        Method("awac", "AWAC", "awac_finetune.py"),
    ),
    "pixels": (  # pixel_off2on.py pretrains by itself (see make_jobs)
        Method("pixel_off2on", "Ours", "pixel_off2on.py", N5),
        Method(
            "cql-ft", "CQL-ft", "pixel_off2on.py", (*ONE_AGENT_ONLINE, "--finetune-loss", "cql")
        ),
    ),
}
GRID_ENVS = {g: LOCOMOTION for g in ("fig3", "fig4c", "fig4d", "e1", "finetune")}
GRID_ENVS["pixels"] = PIXEL_TASKS
SCORE_TAG = {"pixels": "eval/success_rate"}  # every other grid: eval/normalized_score
# what off2on_finetune.py passes to cql_pretrain.py when it pretrains by itself (its pretrain())
PASSED_TO_PRETRAINING = """random-dataset-size dataset-path batch-size hidden-sizes cql-alpha
    cql-n-actions bc-steps gamma tau eval-episodes cuda no-cuda torch-deterministic
    no-torch-deterministic"""
PRETRAIN_FLAGS = {f"--{f}": f"--{f}" for f in PASSED_TO_PRETRAINING.split()}
PRETRAIN_FLAGS["--offline-steps"] = "--total-steps"


# ---------------------------------------------------------------------------------------------
# Jobs: one script invocation each, with the jobs it waits for
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    name: str  # {env_tag}__{exp_name}__{seed}: its log and marker files
    argv: tuple[str, ...]  # script (relative to this folder) and its flags
    deps: tuple[str, ...] = ()  # names of jobs that must succeed first
    rename: tuple[str, str] | None = None  # (partial, final) file, renamed after exit 0
    wandb: tuple[str, str] | None = None  # with --track: its W&B (group, job type)


def flag_groups(flags: list[str]) -> list[list[str]]:
    """["--a", "1", "2", "--b=3", "--c"] -> [["--a", "1", "2"], ["--b", "3"], ["--c"]]."""
    groups = []
    for token in flags:
        if token.startswith("--"):
            groups.append(token.split("=", 1))
        elif groups:
            groups[-1].append(token)
        else:
            raise ValueError(f"extra flags must start with a --flag, got {token!r}")
    return groups


def script_flags(script: str) -> set[str]:
    """The flags of a script's `class Args`, read from its source (importing it would load
    torch): `--name` for each field, and `--no-name` for booleans."""
    source = open(os.path.join(REPO, script)).read()
    block = source.split("class Args:", 1)[1].split("\n\n\n", 1)[0]
    flags = set()
    for name, annotation in re.findall(r"^    (\w+): ([^=\n]+)", block, re.M):
        flags.add(f"--{name.replace('_', '-')}")
        if annotation.strip() == "bool":
            flags.add(f"--no-{name.replace('_', '-')}")
    return flags


def pass_flags(groups: list[list[str]], accepted: set[str], rename=None) -> list[str]:
    """The groups whose flag is accepted, flattened; `rename` maps flags to other names."""
    rename = rename or {}
    return [t for g in groups if g[0] in accepted for t in [rename.get(g[0], g[0]), *g[1:]]]


def make_jobs(args: Args, notes: list[str] | None = None) -> list[Job]:
    """Every job of the sweep, the ones others wait for before them. `notes` collects flags of
    --extra left out of a script's runs."""
    notes = [] if notes is None else notes
    methods = GRIDS[args.grid]
    known = [m.exp_name for m in methods]
    if unknown := [m for m in args.methods if m not in known]:
        raise ValueError(f"--methods {' '.join(unknown)}: not in grid {args.grid} ({known})")
    methods = [m for m in methods if not args.methods or m.exp_name in args.methods]
    if args.seeds < 1 or args.workers < 1 or args.threads < 1:
        raise ValueError("--seeds, --workers and --threads must be >= 1")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint} does not exist")
    extra = all_extra = flag_groups(shlex.split(args.extra))
    pretrain_extra = shlex.split(args.pretrain_extra)
    flags_of = {s: script_flags(s) for s in {m.script for m in methods} | {"cql_pretrain.py"}}
    scripts = sorted({m.script for m in methods})
    everywhere = set().union(*(flags_of[s] for s in scripts))
    if unknown := [g[0] for g in extra if g[0] not in everywhere | set(PRETRAIN_FLAGS)]:
        close = difflib.get_close_matches(unknown[0], everywhere, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(
            f"--extra {' '.join(unknown)}: no script of this sweep ({', '.join(scripts)}) has "
            f"it{hint}; `python SCRIPT --help` lists their flags"
        )
    for script in scripts:
        if left := [g[0] for g in extra if g[0] not in flags_of[script]]:
            notes.append(f"{script} has no {' '.join(left)}")
    data_flags = {"--random-dataset-size", "--dataset-path"}
    pixels, jobs = args.grid == "pixels", []
    for env_id in args.env_ids or GRID_ENVS[args.grid]:
        tag, local = env_id.replace("/", "-"), []
        if args.dataset_dir and (name := re.match(r"^(\w+)-(.+)-(v\d+)$", env_id)):
            file = f"{name[1]}_{name[2].replace('-', '_')}-{name[3]}.hdf5"  # D4RL's file name
            path = os.path.join(args.dataset_dir, file)
            local = [["--dataset-path", path]] if os.path.exists(path) else []
        extra = local + all_extra
        if pixels:  # pixel_off2on.py makes its dataset when missing; here once per task
            sizes = {g[0]: g[-1] for g in extra}
            code = "import sys, pixel_off2on as p; "
            code += "p.load_pixel_data(sys.argv[1], *map(int, sys.argv[2:]))"
            argv = ("-c", code, env_id, sizes.get("--dataset-size", "200000"))
            data = Job(f"{tag}__dataset", (*argv, sizes.get("--dataset-workers", "1")))
        else:  # cql_pretrain.py makes a *-random-v2 dataset, or downloads it from Minari
            argv = ("cql_pretrain.py", "--env-id", env_id, "--dataset-only")
            data = Job(f"{tag}__dataset", (*argv, *pass_flags(extra, data_flags)))
        jobs.append(data)
        for seed in range(1, args.seeds + 1):
            base = ("--seed", str(seed), "--resume")
            pretrain, given = None, ("--checkpoint", args.checkpoint) if args.checkpoint else ()
            if any(m.pretrained for m in methods) and not given:
                final = f"checkpoints/cql__{tag}__n5__seed{seed}.pt"
                argv = ("cql_pretrain.py", "--env-id", env_id, "--ensemble-size", "5", *base)
                argv += ("--checkpoint-path", f"{final}.partial")
                argv += (*pass_flags(extra, set(PRETRAIN_FLAGS), PRETRAIN_FLAGS), *pretrain_extra)
                rename = (f"{final}.partial", final)
                pretrain = Job(f"{tag}__cql_pretrain__{seed}", argv, (data.name,), rename)
                jobs.append(pretrain)
            provider = None  # pixels: the method's own run pretrains; the others of its seed wait
            for m in methods:
                env_flag = "--task" if m.script == "pixel_off2on.py" else "--env-id"
                argv = (m.script, env_flag, env_id, "--exp-name", m.exp_name, *base, *m.flags)
                argv += (*(given if m.pretrained else ()), *pass_flags(extra, flags_of[m.script]))
                deps = (pretrain.name,) if m.pretrained and pretrain else (data.name,)
                if pixels and provider:
                    deps = (provider,)
                job = Job(f"{tag}__{m.exp_name}__{seed}", argv, deps)
                provider = provider or (job.name if pixels else None)
                jobs.append(job)
    if args.track:  # every training job, in W&B's group of the grid, its method as the job type
        for i, job in enumerate(jobs):
            if not job.name.endswith("__dataset"):
                method = job.name.split("__")[-2]
                jobs[i] = replace(job, argv=(*job.argv, "--track"), wandb=(args.grid, method))
    return jobs


def command(job: Job) -> list[str]:
    """The job's command line: this Python, the script by its full path (runs, checkpoints and
    datasets land where benchmark.py is run, as when the scripts are run by hand)."""
    if job.argv[0] == "-c":
        return [sys.executable, *job.argv]
    return [sys.executable, os.path.join(REPO, job.argv[0]), *job.argv[1:]]


# ---------------------------------------------------------------------------------------------
# Running a job: the same function on every backend (in a thread locally, in a submitit job)
# ---------------------------------------------------------------------------------------------
BUSY = 75  # the job's lock is held: it is running in another sweep


def marker_path(sweep_dir: str, job: Job) -> str:
    return os.path.join(sweep_dir, "done", f"{job.name}.json")


def log_path(sweep_dir: str, job: Job) -> str:
    return os.path.join(sweep_dir, "logs", f"{job.name}.log")


def is_done(sweep_dir: str, job: Job, cwd: str = ".") -> bool:
    """Finished before: a marker written after exit 0 with the same command, or (pretraining)
    the checkpoint the fine-tuning runs look for."""
    if job.rename and os.path.exists(os.path.join(cwd, job.rename[1])):
        return True
    try:
        marker = json.load(open(os.path.join(cwd, marker_path(sweep_dir, job))))
        return marker["argv"] == list(job.argv)
    except (OSError, ValueError, KeyError):
        return False


class RunJob:
    """Runs one job: its log appended to (never overwritten), one thread per process, and after
    exit 0 the partial file renamed and the marker written. A callable with `checkpoint` is
    what submitit requeues when the job reaches its time limit; the command has --resume."""

    def __init__(self, job: Job, cwd: str, sweep_dir: str, threads: int):
        self.job, self.cwd, self.sweep_dir, self.threads = job, cwd, sweep_dir, threads

    def __call__(self) -> int:
        job, sweep_dir = self.job, os.path.join(self.cwd, self.sweep_dir)
        for sub in ("logs", "done", "locks"):
            os.makedirs(os.path.join(sweep_dir, sub), exist_ok=True)
        with open(os.path.join(sweep_dir, "locks", f"{job.name}.lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
            except BlockingIOError:
                return BUSY
            if is_done(self.sweep_dir, job, self.cwd):  # a copy submitted twice, the first done
                return 0
            return self.run(sweep_dir)

    def run(self, sweep_dir: str) -> int:
        job = self.job
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        env["MKL_NUM_THREADS"] = str(self.threads)
        if job.wandb:
            env["WANDB_RUN_GROUP"], env["WANDB_JOB_TYPE"] = job.wandb
        with open(log_path(sweep_dir, job), "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command(job))}\n")
            log.flush()
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
            returncode = subprocess.run(
                command(job), cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT
            ).returncode
        if returncode == 0:
            if job.rename and os.path.exists(os.path.join(self.cwd, job.rename[0])):
                os.replace(*(os.path.join(self.cwd, p) for p in job.rename))
            with open(marker_path(sweep_dir, job), "w") as f:
                json.dump({"argv": list(job.argv), "finished": time.time()}, f)
        return returncode

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def log_tail(sweep_dir: str, job: Job, lines: int = 15) -> str:
    try:
        return "".join(open(log_path(sweep_dir, job)).readlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------
# The sweep: jobs start when the jobs they wait for have succeeded (the launcher keeps the
# dependencies on every backend, so the submitit-local path is the Slurm path)
# ---------------------------------------------------------------------------------------------
def make_executor(args: Args):
    """A thread pool (local), or a submitit executor whose jobs are futures alike."""
    if args.backend == "local":
        from concurrent.futures import ThreadPoolExecutor

        return ThreadPoolExecutor(args.workers)
    import submitit

    folder = os.path.join(args.sweep_dir, "submitit", "%j")
    if args.backend == "submitit-local":
        executor = submitit.AutoExecutor(folder, cluster="local")
        executor.update_parameters(timeout_min=args.slurm_time, cpus_per_task=args.threads)
        return executor
    executor = submitit.AutoExecutor(
        folder, cluster="slurm", slurm_max_num_timeout=args.slurm_max_requeues
    )
    executor.update_parameters(
        timeout_min=args.slurm_time, slurm_partition=args.slurm_partition,
        slurm_account=args.slurm_account, gpus_per_node=args.slurm_gpus,
        cpus_per_task=args.slurm_cpus, mem_gb=args.slurm_mem_gb, name="off2on",
    )  # fmt: skip
    sacct = subprocess.run(["sacct", "--noheader", "-j", "1"], capture_output=True, text=True)
    if sacct.returncode != 0:
        reason = (sacct.stderr + sacct.stdout).strip().splitlines() or ["?"]
        print(f"note: sacct fails on this cluster ({reason[-1]}): job states come from squeue")
        submitit.slurm.slurm.SlurmJob.watcher = squeue_watcher_class()(delay_s=60)
    return executor


def squeue_watcher_class():
    """submitit reads job states with sacct, which fails where a cluster keeps no accounting (as
    many small ones don't): it would warn at every poll and never see a job that died without its
    result. This reads them from squeue instead: a job that has left the queue has ended."""
    import getpass

    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWatcher(SlurmInfoWatcher):
        def _make_command(self):
            if not self._registered - self._finished:
                return None
            return ["squeue", "--noheader", "--format=%i|%T|%N", f"--user={getpass.getuser()}"]

        def read_info(self, string) -> dict:
            string = string.decode() if isinstance(string, bytes) else string
            info = {}
            for line in string.splitlines():
                job_id, state, nodes = line.split("|")
                info[job_id] = {"JobID": job_id, "State": state, "NodeList": nodes}
            for job_id in self._registered - self._finished - info.keys():
                info[job_id] = {"JobID": job_id, "State": "LEFT_QUEUE", "NodeList": ""}
            return info

    return SqueueWatcher


def run_sweep(args: Args, jobs: list[Job]) -> dict[str, list[str]]:
    """Runs the jobs not done yet; returns the names of the done, skipped, failed and blocked
    (a job they wait for failed) jobs, printing a line per finished job and every failure."""
    result = {"skipped": [], "done": [], "failed": [], "blocked": []}
    ok = {j.name for j in jobs if is_done(args.sweep_dir, j)}  # finished, before or now
    result["skipped"] = [j.name for j in jobs if j.name in ok]
    pending = [j for j in jobs if j.name not in ok]
    limit = args.workers if args.backend != "slurm" else len(pending) or 1
    executor, running, total, finished = make_executor(args), {}, len(pending), 0
    print(f"{len(jobs)} jobs: {len(ok)} finished before (skipped), {total} to run", flush=True)
    try:
        while pending or running:
            for job in list(pending):
                if any(d in result["failed"] or d in result["blocked"] for d in job.deps):
                    pending.remove(job)
                    result["blocked"].append(job.name)
                    finished += 1
                    print(f"[{finished}/{total}] blocked {job.name}: a job it waits for failed")
                elif all(d in ok for d in job.deps) and len(running) < limit:
                    pending.remove(job)
                    runner = RunJob(job, os.getcwd(), args.sweep_dir, args.threads)
                    running[job.name] = (job, executor.submit(runner), time.time())
                    if args.backend == "slurm":
                        print(f"submitted {job.name}: Slurm job {running[job.name][1].job_id}")
            for name, (job, future, start) in list(running.items()):
                if not future.done():
                    continue
                del running[name]
                finished += 1
                try:
                    returncode = future.result()
                except Exception as e:  # the submitit job itself failed (killed, out of memory)
                    returncode, reason = -1, f"{type(e).__name__}: {str(e)[-500:]}"
                minutes = (time.time() - start) / 60
                if returncode == 0:
                    ok.add(name)
                    result["done"].append(name)
                    print(f"[{finished}/{total}] done {name} ({minutes:.1f} min)", flush=True)
                    continue
                result["failed"].append(name)
                if returncode == BUSY:
                    reason = "its lock is held: it runs in another sweep"
                elif returncode != -1:
                    reason = f"exit code {returncode}"
                print(
                    f"[{finished}/{total}] FAILED {name}: {reason}\n  command: "
                    f"{shlex.join(['python', *job.argv])}\n  log {log_path(args.sweep_dir, job)}, "
                    f"last lines:\n{log_tail(args.sweep_dir, job)}",
                    flush=True,
                )
            time.sleep(0.1 if args.backend == "local" else 1.0)
    finally:
        if args.backend == "local":
            executor.shutdown(wait=True, cancel_futures=True)
    return result


def summary(result: dict[str, list[str]]) -> str:
    line = ", ".join(f"{len(v)} {k}" for k, v in result.items())
    lines = [f"summary: {line}"]
    lines += [f"  failed: {name}" for name in result["failed"]]
    lines += [f"  blocked: {name}" for name in result["blocked"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading the logs: runs/{env_tag}__{exp_name}__{seed}__{time}/events.* (TensorBoard's reader)
# ---------------------------------------------------------------------------------------------
def read_scalars(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar tag of a run as (steps, values) sorted by step. A resumed run appends a new
    event file to the same folder and may log a step again: the later file's value wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for name in sorted(f for f in os.listdir(run_dir) if "tfevents" in f):
        acc = EventAccumulator(os.path.join(run_dir, name), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values = merged.setdefault(tag, {})
            for event in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
                values[event.step] = event.value
    return {t: (sorted(v), [v[s] for s in sorted(v)]) for t, v in merged.items()}


RUN_NAME = re.compile(r"^(.+)__(.+)__(\d+)__(\d+)$")


def read_runs(runs_dir: str) -> dict[tuple[str, str, int], dict]:
    """{(env_tag, exp_name, seed): scalars} of every run under runs_dir; of two runs with the
    same key (a run started again from scratch), the newer."""
    runs, started = {}, {}
    for name in sorted(os.listdir(runs_dir)):
        match = RUN_NAME.match(name)
        if not match or not os.path.isdir(os.path.join(runs_dir, name)):
            continue
        key, start = (match.group(1), match.group(2), int(match.group(3))), int(match.group(4))
        if started.get(key, -1) < start:
            started[key] = start
            runs[key] = read_scalars(os.path.join(runs_dir, name))
    return runs


# ---------------------------------------------------------------------------------------------
# Numbers: curves, final scores, aggregates (what the figures and tables show)
# ---------------------------------------------------------------------------------------------
def seed_curves(runs: dict, env: str, exp: str, tag: str):
    """(steps, values [n_seeds, n_steps]) of one method on one dataset, at the steps every seed
    has logged; None if no run has the tag."""
    import numpy as np

    runs = [s for (e, x, _), s in sorted(runs.items()) if (e, x) == (env, exp) and tag in s]
    curves = [dict(zip(*s[tag])) for s in runs]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return np.array(steps), np.array([[c[s] for s in steps] for c in curves])


DIP_FRACTION = 0.1  # the dip is looked for in the first 10% of a run's online steps,
DIP_MIN_EVALS = 5  # and in at least its first 5 evaluations after step 0
METRICS = {  # o2o_metrics' keys: the columns of {grid}_table.md
    "offline": "offline", "dip": "dip", "final": "final", "online_mean": "online mean",
    "gain": "gain",
}  # fmt: skip
AGGREGATED = {"final": "final score", "online_mean": "online mean"}  # what rliable aggregates


def o2o_metrics(steps, scores) -> dict[str, float | None]:
    """The offline-to-online metrics of one run's curve: `scores` evaluated at `steps`, online
    env steps, where step 0 is the pretrained policy before any online step.

    - offline: the score at step 0.
    - dip: the lowest score among the evaluations in the first 10% of the online steps (steps up
      to 10% of the curve's last step), but at least the first 5 evaluations after step 0 (all of
      them if the curve has fewer), minus the offline score; 0 if none of them is below it. So
      never positive: the drop right after the switch to online data (the paper's Figure 1).
    - final: the score at the last step.
    - online_mean: the mean of the scores after step 0, an area under the curve (the area over
      the online steps divided by their number, for evenly spaced evaluations).
    - gain: final minus offline.

    A metric is None where the curve has nothing to compute it from: offline, dip and gain
    without a step-0 evaluation; dip, final, online_mean and gain without one after step 0.
    """
    curve = dict(zip((int(s) for s in steps), (float(v) for v in scores)))
    online = sorted(s for s in curve if s > 0)
    out = dict.fromkeys(METRICS)
    out["offline"] = offline = curve.get(0)
    if not online:
        return out
    out["final"] = curve[online[-1]]
    out["online_mean"] = sum(curve[s] for s in online) / len(online)
    if offline is not None:
        early = sum(s <= DIP_FRACTION * online[-1] for s in online)
        lowest = min(curve[s] for s in online[: max(early, DIP_MIN_EVALS)])
        out["dip"] = min(0.0, lowest - offline)
        out["gain"] = out["final"] - offline
    return out


def run_metrics(runs: dict, envs: list[str], exp: str, tag: str) -> dict[str, dict[int, dict]]:
    """{env: {seed: o2o_metrics of the run's `tag` curve}} of one method, each seed on its own
    curve (a seed still running has fewer steps)."""
    metrics = {}
    for (env, x, seed), scalars in sorted(runs.items()):
        if x == exp and env in envs and tag in scalars:
            metrics.setdefault(env, {})[seed] = o2o_metrics(*scalars[tag])
    return metrics


def metric_scores(metrics: dict, key: str) -> dict[str, dict[int, float]]:
    """{env: {seed: value}} of one metric of run_metrics, without the seeds where it is None."""
    out = {
        env: {s: m[key] for s, m in seeds.items() if m[key] is not None}
        for env, seeds in metrics.items()
    }
    return {env: seeds for env, seeds in out.items() if seeds}


def last_step(runs: dict, env: str, exps, tag: str) -> int | None:
    """The last step any run of these methods has logged on `env` (None: no run)."""
    ends = [s[tag][0][-1] for (e, x, _), s in runs.items() if e == env and x in exps and tag in s]
    return max(ends, default=None)


def reference_metrics(reference: tuple, last: int | None) -> dict[str, float | None]:
    """o2o_metrics of a reference (label, steps, scores) cut at `last`, the last step of the
    grid's runs on its dataset: its final score, online mean and dip window then cover the steps
    that theirs do, not the reference's longer run."""
    _, steps, scores = reference
    keep = steps <= (float("inf") if last is None else last)
    return o2o_metrics(steps[keep], scores[keep])


def read_reference(spec: str) -> tuple:
    """`LABEL=FILE.csv` -> (label, env_steps, normalized_score); lines starting with # are
    comments."""
    import csv

    import numpy as np

    label, sep, path = spec.partition("=")
    if not sep or not os.path.isfile(path):
        raise ValueError(f"--reference {spec}: expected LABEL=FILE.csv with an existing file")
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    try:
        columns = [[float(r[c]) for r in rows] for c in ("env_steps", "normalized_score")]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"--reference {path}: needs numbers in columns env_steps and normalized_score"
        ) from None
    return label, *map(np.array, columns)


def step_table(runs, envs, methods, tag, at_steps, references=()) -> str:
    """The score at each of `at_steps` (mean +- std over the seeds that reached it, and their
    number) and the dip of o2o_metrics (over the seeds with a step 0 and a step after it)."""
    import numpy as np

    def cell(values):
        values = np.asarray(values)
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{values.mean():.1f} ± {values.std():.1f} ({len(values)})" if len(values) else ""

    head = " | ".join(f"{s:,}" for s in at_steps)
    lines = [f"| dataset | method | {head} | dip |", "|---|---|" + "---|" * (len(at_steps) + 1)]
    for env in envs:
        rows = []  # (label, [(the seed's {step: score}, its dip)])
        for exp, label in methods:
            curves = [
                s[tag] for (e, x, _), s in sorted(runs.items()) if (e, x) == (env, exp) and tag in s
            ]
            rows.append((label, [(dict(zip(*c)), o2o_metrics(*c)["dip"]) for c in curves]))
        last = last_step(runs, env, dict(methods), tag)
        for ref in references:
            curve = dict(zip(ref[1].astype(int).tolist(), ref[2].tolist()))
            rows.append((ref[0], [(curve, reference_metrics(ref, last)["dip"])]))
        for label, seeds in rows:
            if not seeds:
                continue
            cells = [cell([d[s] for d, _ in seeds if s in d]) for s in at_steps]
            dips = cell([dip for _, dip in seeds if dip is not None])
            lines.append(f"| {env} | {label} | " + " | ".join([*cells, dips]) + " |")
    return "\n".join(lines)


def iqm(scores):
    """Interquartile mean of all runs and tasks together (rliable's aggregate_iqm): the mean of
    the middle 50% of the scores, the lowest and highest quarter trimmed."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(scores))


def aggregates(score_matrices: dict, reps: int, seed: int = 0) -> dict[str, dict]:
    """IQM and mean over runs and datasets of each method's [n_runs, n_datasets] scores of one
    metric (the final scores, the online means), with 95% stratified bootstrap intervals
    (rliable)."""
    import numpy as np
    from rliable import library as rly
    from rliable import metrics

    def both(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])

    np.random.seed(seed)  # rliable's bootstrap draws from numpy's global generator
    points, intervals = rly.get_interval_estimates(score_matrices, both, reps=reps)
    return {
        m: {
            "iqm": float(points[m][0]), "iqm_ci": intervals[m][:, 0].tolist(),
            "mean": float(points[m][1]), "mean_ci": intervals[m][:, 1].tolist(),
        }
        for m in score_matrices
    }  # fmt: skip


def score_matrix(scores: dict[str, dict[int, float]], envs: list[str]):
    """[n_seeds, n_datasets] from {env: {seed: score}}, over the seeds every dataset has."""
    import numpy as np

    seeds = sorted(set.intersection(*(set(scores.get(e, {})) for e in envs)))
    return np.array([[scores[e][s] for e in envs] for s in seeds]).reshape(len(seeds), len(envs))


# ---------------------------------------------------------------------------------------------
# Figures and tables
# ---------------------------------------------------------------------------------------------
def env_order(env: str):
    """Figure 3's layout: a row per environment, random, medium, medium-replay, medium-expert."""
    kinds = ["random", "medium", "medium-replay", "medium-expert", "expert"]
    match = re.match(r"^(\w+)-(.+)-v\d$", env)
    if match and match.group(2) in kinds:
        return (match.group(1), kinds.index(match.group(2)), env)
    return (env, 0, env)


def plot_curves(runs, envs, methods, tag, ylabel, path, references=()):
    """One panel per dataset, one line per method: the mean over seeds, shaded +- one standard
    deviation (the paper's Figure 3); `references` (label, steps, scores) dashed, up to the
    panel's last step. Returns the numbers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    cols = min(4, len(envs))
    rows = -(-len(envs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, env in zip(axes.flat, envs):
        for i, (exp, label) in enumerate(methods):  # a method keeps its colour in every panel
            if (curve := seed_curves(runs, env, exp, tag)) is None:
                continue
            steps, values = curve
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, label=label, color=f"C{i}")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=f"C{i}")
            drawn.setdefault(env, {})[exp] = {
                "steps": steps.tolist(), "mean": mean.tolist(), "std": std.tolist(),
                "n_seeds": len(values),
            }  # fmt: skip
        last = max((max(c["steps"]) for c in drawn.get(env, {}).values()), default=0)
        for j, (label, steps, scores) in enumerate(references):
            keep = steps <= last
            ax.plot(steps[keep], scores[keep], "--", label=label, color=f"C{len(methods) + j}")
        ax.set_title(env)
        ax.set_xlabel("online environment steps")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(envs) :]:
        ax.axis("off")
    handles = {}  # every method once, whichever panels it is in
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(
        handles.values(), handles, loc="lower center", ncol=len(handles), bbox_to_anchor=(0.5, 0)
    )
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.04, 1, 1))
    save_figure(fig, path)
    return drawn


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(f"{path}.{ext}", dpi=150, bbox_inches="tight")
    plt.close(fig)


def plot_aggregates(aggs: dict, matrices: dict, labels: dict, path: str):
    """A row per aggregated metric (AGGREGATED: final score, online mean): its IQM and mean with
    their 95% intervals, and its performance profile, the share of runs scoring above tau for
    each tau. `aggs` and `matrices` are keyed by metric, then by method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from rliable import library as rly

    names = list(aggs["final"])  # a method keeps its colour in every panel
    height = 0.5 * len(names) + 2.5
    fig, rows = plt.subplots(len(aggs), 3, figsize=(13, height * len(aggs)), squeeze=False)
    for axes, (metric, agg) in zip(rows, aggs.items()):
        title = AGGREGATED[metric]
        for ax, key in zip(axes[:2], ("iqm", "mean")):
            for i, m in enumerate(names):
                low, high = agg[m][f"{key}_ci"]
                ax.barh(i, high - low, left=low, height=0.6, alpha=0.6, color=f"C{i}")
                ax.plot([agg[m][key]] * 2, [i - 0.3, i + 0.3], color="k")
            ax.set_yticks(range(len(names)), [labels[m] for m in names])
            ax.set_title(f"{'IQM' if key == 'iqm' else 'Mean'} of the {title}")
            ax.grid(axis="x", alpha=0.3)
        scores = matrices[metric]
        every = np.concatenate([v.ravel() for v in scores.values()])
        taus = np.linspace(min(0.0, every.min()), max(every.max(), 1e-6), 101)
        profiles, intervals = rly.create_performance_profile(scores, taus)
        for i, m in enumerate(names):
            axes[2].plot(taus, profiles[m], label=labels[m], color=f"C{i}")
            axes[2].fill_between(taus, *intervals[m], alpha=0.2, color=f"C{i}")
        axes[2].set_xlabel(f"{title} tau")
        axes[2].set_ylabel("fraction of runs with score > tau")
        axes[2].legend()
        axes[2].grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def markdown_table(metrics: dict, envs: list[str], methods: list, references=()) -> str:
    """The metrics of o2o_metrics per dataset and method (`metrics`: {exp: {env: {seed: the
    seed's metrics}}}), each mean +- standard deviation over the seeds that have it (numpy's
    std, ddof=0) and their number; then a row per reference, (label, {env: its metrics})."""
    import numpy as np

    def cell(values):
        values = np.array([v for v in values if v is not None])
        return f"{values.mean():.1f} ± {values.std():.1f} ({len(values)})" if len(values) else ""

    lines = ["| dataset | method | " + " | ".join(METRICS.values()) + " |"]
    lines.append("|---|---|" + "---|" * len(METRICS))
    for env in envs:
        rows = [(label, list(metrics.get(x, {}).get(env, {}).values())) for x, label in methods]
        rows += [(label, [of_env[env]]) for label, of_env in references if env in of_env]
        for label, seeds in rows:
            if seeds:
                cells = [cell([m[key] for m in seeds]) for key in METRICS]
                lines.append(f"| {env} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_envs(args: Args, grid: str, found: set) -> list[str]:
    """The datasets (pixel tasks for pixels) that have runs of the grid, in Figure 3's order."""
    methods = {m.exp_name for m in GRIDS[grid]}
    envs = [e.replace("/", "-") for e in args.env_ids] or {e for e, x in found if x in methods}
    return sorted((e for e in envs if (e in PIXEL_TASKS) == (grid == "pixels")), key=env_order)


def aggregate_table(aggs: dict, matrices: dict, labels: dict) -> str:
    """IQM and mean with their intervals of each aggregated metric, a row per method."""
    head = [f"{title}: {key} [95% CI]" for title in AGGREGATED.values() for key in ("IQM", "mean")]
    lines = ["| method | " + " | ".join(head) + " | runs x datasets |"]
    lines.append("|---|" + "---|" * (len(head) + 1))
    for x in aggs["final"]:
        cells = []
        for metric in AGGREGATED:
            a = aggs[metric][x]
            for key in ("iqm", "mean"):
                low, high = a[f"{key}_ci"]
                cells.append(f"{a[key]:.1f} [{low:.1f}, {high:.1f}]")
        shape = " x ".join(map(str, matrices["final"][x].shape))
        lines.append(f"| {labels[x]} | " + " | ".join(cells) + f" | {shape} |")
    return "\n".join(lines)


def plot_all(args: Args) -> dict:
    """Every grid with runs under args.plot: curves, table, aggregates; plus Figure 4a/4b.
    Writes {out}/{grid}_curves, _aggregate (.png, .pdf), _table.md, and data.json (every
    number drawn)."""
    runs = read_runs(args.plot)
    references = [read_reference(spec) for spec in args.reference]
    os.makedirs(args.out, exist_ok=True)
    found, data = {(env, exp) for env, exp, _ in runs}, {}
    for grid, grid_methods in GRIDS.items():
        envs = grid_envs(args, grid, found)
        methods = [(m.exp_name, m.label) for m in grid_methods]
        methods = [(x, label) for x, label in methods if not args.methods or x in args.methods]
        methods = [(x, label) for x, label in methods if any((e, x) in found for e in envs)]
        if not envs or not methods:
            continue
        tag, labels = SCORE_TAG.get(grid, "eval/normalized_score"), dict(methods)
        ylabel = "success rate" if grid == "pixels" else "normalized score"
        path = os.path.join(args.out, grid)
        curves = plot_curves(runs, envs, methods, tag, ylabel, f"{path}_curves", references)
        metrics = {x: run_metrics(runs, envs, x, tag) for x in labels}
        last = {env: last_step(runs, env, labels, tag) for env in envs}
        refs = [(r[0], {env: reference_metrics(r, last[env]) for env in envs}) for r in references]
        table = markdown_table(metrics, envs, methods, refs)
        data[grid] = {
            "envs": envs, "curves": curves, "metrics": metrics, "reference_metrics": dict(refs),
            "final_scores": {x: metric_scores(metrics[x], "final") for x in labels},
            "table": table,
        }  # fmt: skip
        text = (
            f"{tag}, mean ± std over seeds (seeds). offline: at step 0; dip: the lowest score "
            "in the first 10% of the online steps (at least the first 5 evaluations) minus "
            "offline, 0 if never below it; final: at the last step; online mean: the mean after "
            f"step 0; gain: final minus offline\n\n{table}\n"
        )
        if args.at_steps:
            at = step_table(runs, envs, methods, tag, args.at_steps, references)
            data[grid]["at_steps"] = at
            text += f"\n{tag} at these online steps, and the dip: mean ± std (seeds)\n\n{at}\n"
        matrices = {}
        for metric in AGGREGATED:
            of_metric = {x: score_matrix(metric_scores(metrics[x], metric), envs) for x in labels}
            matrices[metric] = {x: m for x, m in of_metric.items() if len(m)}
        if matrices["final"]:
            aggs = {k: aggregates(m, args.bootstrap_reps) for k, m in matrices.items()}
            data[grid]["aggregates"] = aggs
            plot_aggregates(aggs, matrices, labels, f"{path}_aggregate")
            text += (
                "\nIQM and mean over runs and datasets, 95% stratified bootstrap intervals\n\n"
                f"{aggregate_table(aggs, matrices, labels)}\n"
            )
        with open(f"{path}_table.md", "w") as f:
            f.write(text)
        print(f"{grid}: {len(envs)} datasets, {len(methods)} methods -> {path}_*", flush=True)
    ours = [("off2on_finetune", "Ours (N=5)"), ("n2", "N=2"), ("n1", "N=1")]
    envs = grid_envs(args, "fig4d", found)
    for name, tag, ylabel in (
        ("fig4a_offline_fraction", "charts/offline_fraction", "offline share of RL batches"),
        ("fig4b_q_auroc", "charts/q_auroc_ensemble", "AUROC of Q, real vs random actions"),
    ):
        methods = [
            (x, label)
            for x, label in ours
            if any(y == x and tag in s for (_, y, _), s in runs.items())
        ]
        if envs and methods:
            data[name] = plot_curves(runs, envs, methods, tag, ylabel, os.path.join(args.out, name))
    with open(os.path.join(args.out, "data.json"), "w") as f:
        json.dump(data, f, indent=1)
    return data


def join_flag_values(argv: list[str]) -> list[str]:
    """`--extra "--total-timesteps 10000"` as `--extra=...`: a value that starts with -- would
    read as a flag."""
    out = []
    for token in argv:
        if out and out[-1] in ("--extra", "--pretrain-extra"):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


if __name__ == "__main__":
    args = tyro.cli(Args, args=join_flag_values(sys.argv[1:]))
    if args.plot is not None:
        if not os.path.isdir(args.plot):
            raise SystemExit(f"error: --plot {args.plot}: no such folder (TensorBoard runs)")
        try:
            drawn = plot_all(args)
        except ValueError as e:  # a bad --reference
            raise SystemExit(f"error: {e}")
        if not drawn:
            raise SystemExit(f"error: no run of any grid's methods under {args.plot}")
        raise SystemExit(0)
    notes = []
    try:
        jobs = make_jobs(args, notes)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    for note in notes:
        print(f"note: {note}: left out of its runs")
    if args.backend == "slurm" and not shutil.which("sbatch"):
        missing = (
            "--backend slurm: no Slurm on this machine (`sbatch` is not on PATH); run from a "
            "Slurm login node, or use --backend local or submitit-local here"
        )
        if not args.dry_run:
            raise SystemExit(f"error: {missing}")
        print(f"warning: {missing}")
    if args.dry_run:
        for job in jobs:
            after = f"  # after {', '.join(job.deps)}" if job.deps else ""
            print(f"{shlex.join(['python', *job.argv])}{after}")
        raise SystemExit(0)
    result = run_sweep(args, jobs)
    print(summary(result))
    raise SystemExit(1 if result["failed"] or result["blocked"] else 0)
