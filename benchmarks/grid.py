"""Multi-seed, multi-env runner: (script, env id, seed) cells run by a local worker pool or as a Slurm job array, each
resumed by the scripts themselves (layout, rules, commands: benchmarks/README.md)."""

import itertools
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import tyro

from benchmarks.common import (REPO_ROOT, RESULTS_DIR, RUN_NAME_RE, describe_machine, git_state, machine_info,
                               read_json, read_summary, run_name_for, script_path, write_atomic)

GRID_ROOT = RESULTS_DIR / "grids"
# flags the grid sets per cell; in the extra flags they would make cells collide or break resumption
RESERVED_FLAGS = ("--env-id", "--seed", "--run-name", "--resume", "--play", "--track", "--no-track", "--wandb-group",
                  "--wandb-project-name", "--wandb-entity")
SIGNAL_EXITS = (130, 143)  # the scripts' exit codes after SIGINT / SIGTERM: checkpointed, resumable
DONE_REASONS = ("completed", "goal reached")  # summary.json stop reasons of a finished run
SKIP_DONE, SKIP_FAILED, RESUME, START = "skip: done", "skip: failed too often", "resume", "start"
SKIP_DIVERGED = "skip: non-finite loss"  # its resume would replay the same updates into the same NaN


@dataclass(frozen=True)
class GridSpec:
    """What a grid runs, saved in its grid.json; the command line's Args add how to run it."""

    name: str  # the grid's name: its folder, the run names' suffix and the W&B group
    scripts: tuple[str, ...] = ()  # scripts of a new grid (paths relative to the repository root)
    env_ids: tuple[str, ...] = ()  # env ids of a new grid
    seeds: tuple[int, ...] = ()  # seeds of a new grid
    extra: tyro.conf.Positional[tuple[str, ...]] = ()  # flags given to every cell of a new grid, after --
    track: bool = False  # log every cell to W&B (--track), grouped as --wandb-group NAME
    wandb_project_name: str = "cleanRL"  # the W&B project
    wandb_entity: Optional[str] = None  # the W&B entity


def validate_spec(spec: GridSpec) -> list[str]:
    """Problems with a spec, as messages ([] when none)."""
    problems = []
    if not RUN_NAME_RE.fullmatch(spec.name) or ".." in spec.name or "__" in spec.name:
        problems.append(f"--name {spec.name!r} must be a plain name (letters, digits, . _ = + -, no '__')")
    for key in ("scripts", "env_ids", "seeds"):
        if not (values := getattr(spec, key)) or len(set(values)) < len(values):
            problems.append(f"--{key.replace('_', '-')} " + ("has duplicates" if values else "is empty"))
    problems += [f"{s} does not exist" for s in spec.scripts if not script_path(s).is_file()]
    return problems + [f"{f.split('=', 1)[0]} is set by the grid per cell; remove it from the flags after --"
                       for f in spec.extra if f.split("=", 1)[0] in RESERVED_FLAGS]


@dataclass(frozen=True)
class Cell:
    index: int  # position in the grid (scripts outermost, seeds innermost): stable for a given spec
    script: str
    env_id: str
    seed: int
    run_name: str


def expand_grid(spec: GridSpec) -> list[Cell]:
    return [Cell(i, script, env_id, seed, run_name_for(env_id, script, seed, spec.name))
            for i, (script, env_id, seed) in enumerate(itertools.product(spec.scripts, spec.env_ids, spec.seeds))]


@dataclass(frozen=True)
class GridPaths:
    root: Path  # the grid folder, the scripts' working directory

    @property
    def spec(self) -> Path:
        return self.root / "grid.json"

    def run_dir(self, cell: Cell) -> Path:
        return self.root / "runs" / cell.run_name

    def checkpoint(self, cell: Cell) -> Path:
        return self.run_dir(cell) / "checkpoint.pt"

    def log(self, cell: Cell) -> Path:
        return self.root / "logs" / f"{cell.run_name}.log"

    def state(self, cell: Cell) -> Path:  # attempts, failures, wall seconds over attempts, commit, machine
        return self.root / "state" / f"{cell.run_name}.json"

    def done(self, cell: Cell) -> bool:
        return read_summary(self.run_dir(cell)).get("stop_reason") in DONE_REASONS


def load_or_create_spec(paths: GridPaths, given: Optional[GridSpec]) -> GridSpec:
    """The saved spec, which a given one must equal (a grid never changes under its name), or the given one, saved."""
    if paths.spec.exists():
        saved = GridSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in read_json(paths.spec).items()})
        if given is not None and given != saved:
            diff = {k: (v, getattr(given, k)) for k, v in asdict(saved).items() if getattr(given, k) != v}
            raise SystemExit(f"grid {saved.name!r} exists with another spec (saved, given): {diff}; "
                             "use another --name, or give only --name to resume it")
        return saved
    if given is None:
        raise SystemExit(f"no grid at {paths.root}: give --scripts, --env-ids and --seeds to create it")
    if problems := validate_spec(given):
        raise SystemExit("bad grid: " + "; ".join(problems))
    write_atomic(paths.spec, asdict(given))
    return given


def plan_cell(done: bool, has_checkpoint: bool, failures: int, max_attempts: int, diverged: bool = False) -> str:
    if done:
        return SKIP_DONE
    if diverged:
        return SKIP_DIVERGED
    return SKIP_FAILED if failures >= max_attempts else RESUME if has_checkpoint else START


def plan(paths: GridPaths, cell: Cell, max_attempts: int) -> str:
    diverged = read_summary(paths.run_dir(cell)).get("stop_reason", "").startswith("non-finite")
    return plan_cell(paths.done(cell), paths.checkpoint(cell).exists(),
                     read_json(paths.state(cell)).get("failures", 0), max_attempts, diverged)


def classify_exit(returncode: int) -> str:
    """'done' (0); 'interrupted' (the scripts' exit after SIGINT/SIGTERM, or death by one of those: resumable, not a
    failure); else 'failed', SIGKILL included (an out-of-memory kill looks the same)."""
    if returncode == 0:
        return "done"
    interrupted = returncode in SIGNAL_EXITS or -returncode in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    return "interrupted" if interrupted else "failed"


def cell_command(python: str, spec: GridSpec, cell: Cell, resume: bool) -> list[str]:
    """The cell's command line, run in the grid folder."""
    command = [python, str(script_path(cell.script)), "--env-id", cell.env_id, "--seed", str(cell.seed),
               "--run-name", cell.run_name, *spec.extra]
    command += ["--resume", f"runs/{cell.run_name}/checkpoint.pt"] if resume else []
    if spec.track:
        command += ["--track", "--wandb-project-name", spec.wandb_project_name, "--wandb-group", spec.name]
        command += ["--wandb-entity", spec.wandb_entity] if spec.wandb_entity else []
    return command


@dataclass
class Runner:
    """Runs cells, each script in its own session so that a terminal's Ctrl-C reaches only this process, which asks
    each script once to stop (SIGINT: it checkpoints and exits 130; a second SIGINT kills it). SIGINT rather than
    SIGTERM because a scheduler may send its own SIGTERM as well: one of each is still a graceful stop."""

    spec: GridSpec
    paths: GridPaths
    python: str = sys.executable
    max_attempts: int = 3
    slurm: bool = False  # the scripts must survive the SIGUSR2 that Slurm sends every process of the job step
    stop: threading.Event = field(default_factory=threading.Event)
    children: set[subprocess.Popen] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request_stop(self, signum: int, frame: Any = None) -> None:
        again = self.stop.is_set()
        self.stop.set()
        print(f"\ngrid: signal {signum}: " + ("stopping the running scripts now" if again else
                                               "asking the running scripts to checkpoint and stop"), file=sys.stderr)
        with self.lock:
            for child in self.children:
                child.send_signal(signal.SIGINT)

    def run_cell(self, cell: Cell, total: int) -> str:
        """Runs one cell if it needs running; returns its outcome."""
        tag, action = f"[{cell.index + 1}/{total}] {cell.run_name}", plan(self.paths, cell, self.max_attempts)
        if self.stop.is_set() or action not in (START, RESUME):
            outcome = "not started" if self.stop.is_set() else action
            print(f"{tag}: {outcome}", flush=True)
            return outcome
        if action == START and self.paths.run_dir(cell).exists():  # died before its first checkpoint: set aside
            stale = self.paths.root / "stale" / f"{cell.run_name}.{time.strftime('%Y%m%d-%H%M%S')}"
            stale.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.paths.run_dir(cell), stale)
        command, old = cell_command(self.python, self.spec, cell, action == RESUME), read_json(self.paths.state(cell))
        state = {"cell": asdict(cell), "status": "running", "action": action, "attempts": old.get("attempts", 0) + 1,
                 "failures": old.get("failures", 0), "command": command, "started": time.time(),
                 "wall_s": old.get("wall_s", 0.0), "machine": machine_info(), "git": git_state()}
        if self.slurm:  # blocked in this thread and so in the script it starts (Python handles it on the main thread)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        self.paths.log(cell).parent.mkdir(parents=True, exist_ok=True)
        with open(self.paths.log(cell), "a") as log:
            print(f"=== attempt {state['attempts']}, {action}, {time.strftime('%Y-%m-%d %H:%M:%S')} on "
                  f"{describe_machine(state['machine'])}\n$ {shlex.join(command)}", file=log, flush=True)
            with self.lock:  # no new script once a stop was asked for (request_stop holds this lock to signal)
                if self.stop.is_set():
                    return "not started"
                child = subprocess.Popen(command, cwd=self.paths.root, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
                self.children.add(child)
            write_atomic(self.paths.state(cell), state)
            print(f"{tag}: {action} (attempt {state['attempts']}, log {self.paths.log(cell)})", flush=True)
            returncode = child.wait()
        outcome, ended = classify_exit(returncode), time.time()
        state.update(status=outcome, returncode=returncode, ended=ended,
                     failures=state["failures"] + (outcome == "failed"),
                     wall_s=state["wall_s"] + ended - state["started"])  # every attempt's seconds, added up
        write_atomic(self.paths.state(cell), state)
        with self.lock:
            self.children.discard(child)
        print(f"{tag}: {outcome} (exit {returncode}) after {state['ended'] - state['started']:.0f} s", flush=True)
        return outcome


def run_cells(runner: Runner, cells: Sequence[Cell], total: int, workers: int) -> dict[str, str]:
    """Runs cells on `workers` threads; returns run name -> outcome. The main thread only waits, so that the signal
    handlers, which Python runs on it, can always forward a stop."""
    previous = {s: signal.signal(s, runner.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(runner.run_cell, cell, total): cell.run_name for cell in cells}
            return {futures[future]: future.result() for future in as_completed(futures)}
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class SlurmTask:
    """One array task: runs its cell as the local runner does. Before the time limit, or at a preemption, Slurm
    signals the task (SIGUSR2) and submitit calls checkpoint(): the script is asked to checkpoint and stop, then
    submitit requeues the task, which finds the checkpoint and resumes."""

    runner: Optional[Runner] = None

    def __call__(self, root: str, index: int, max_attempts: int, python: str) -> str:
        paths = GridPaths(Path(root))
        cells = expand_grid(spec := load_or_create_spec(paths, None))
        self.runner = Runner(spec, paths, python, max_attempts, slurm=True)
        return run_cells(self.runner, [cells[index]], len(cells), 1)[cells[index].run_name]

    def checkpoint(self, *args: Any) -> Any:
        from submitit.helpers import DelayedSubmission
        if self.runner is not None:
            self.runner.request_stop(signal.SIGUSR2)
            while self.runner.children:  # a worker thread waits on the script and records the attempt
                time.sleep(0.5)
        return DelayedSubmission(SlurmTask(), *args)


@dataclass(frozen=True)
class Args(GridSpec):
    root: Path = GRID_ROOT  # the folder that holds grid folders
    workers: int = 1  # cells run at once here (each script uses every core it gets: 1 on a 2-core machine)
    max_attempts: int = 3  # leave a cell alone after this many failures (SIGINT/SIGTERM stops do not count)
    dry_run: bool = False  # print each cell's plan and command, run nothing
    python: str = sys.executable  # the Python that runs the scripts (and, with --slurm, the array tasks)
    slurm: bool = False  # submit the unfinished cells as a Slurm job array (submitit) instead of running them here
    slurm_partition: Optional[str] = None  # Slurm partition
    slurm_time_min: int = 2880  # time limit of each task, minutes; at the limit the task checkpoints and requeues
    slurm_cpus: int = 4  # CPUs per task
    slurm_gpus: int = 1  # GPUs per task (0: none)
    slurm_mem_gb: int = 16  # memory per task, GB (an Atari replay of 1M transitions needs several)
    slurm_max_parallel: Optional[int] = None  # at most this many tasks at once
    slurm_signal_s: int = 300  # Slurm signals a task this many seconds before its time limit
    slurm_max_requeues: int = 20  # requeues after time limits per task, at most
    slurm_directive: tuple[str, ...] = ()  # extra sbatch options as key=value, e.g. --slurm-directive account=rl


def submit(paths: GridPaths, cells: Sequence[Cell], args: Args) -> list[Any]:
    """One job array over `cells`."""
    import submitit
    executor = submitit.AutoExecutor(folder=paths.root / "slurm" / "%j", cluster="slurm",
                                     slurm_max_num_timeout=args.slurm_max_requeues,
                                     slurm_python=shlex.quote(args.python))
    executor.update_parameters(
        name=paths.root.name, timeout_min=args.slurm_time_min, cpus_per_task=args.slurm_cpus,
        gpus_per_node=args.slurm_gpus, mem_gb=args.slurm_mem_gb, slurm_partition=args.slurm_partition,
        slurm_array_parallelism=args.slurm_max_parallel, slurm_signal_delay_s=args.slurm_signal_s,
        slurm_setup=[f"cd {shlex.quote(str(REPO_ROOT))}"],  # where `benchmarks` imports from
        slurm_additional_parameters=dict(kv.split("=", 1) for kv in args.slurm_directive))
    n = len(cells)
    return executor.map_array(SlurmTask(), [str(paths.root.resolve())] * n, [c.index for c in cells],
                              [args.max_attempts] * n, [args.python] * n)


def main(args: Args) -> int:
    paths, given = GridPaths(args.root / args.name), None
    if args.scripts or args.env_ids or args.seeds:  # a new grid (--name alone resumes one)
        given = GridSpec(**{f.name: getattr(args, f.name) for f in fields(GridSpec)})
    elif args.extra:
        raise SystemExit("flags after -- belong to a grid's spec: give them with --scripts, --env-ids and --seeds")
    cells = expand_grid(spec := load_or_create_spec(paths, given))
    plans = {cell: plan(paths, cell, args.max_attempts) for cell in cells}
    if args.dry_run:
        for cell, action in plans.items():
            command = cell_command(args.python, spec, cell, resume=action == RESUME)
            print(f"[{cell.index}] {action:<22} (cd {paths.root} && {shlex.join(command)})")
        return 0
    if args.slurm:
        if not (todo := [c for c in cells if plans[c] in (START, RESUME)]):
            print(f"grid {spec.name!r}: every cell is done or failed too often; nothing to submit")
            return 0
        jobs = submit(paths, todo, args)
        print(f"submitted {len(jobs)} array task(s) (job {jobs[0].job_id.split('_')[0]}); submitit's files in "
              f"{paths.root}/slurm/, each cell's output in {paths.root}/logs/; progress: --dry-run")
        return 0
    outcomes = run_cells(runner := Runner(spec, paths, args.python, args.max_attempts), cells, len(cells), args.workers)
    counts = ", ".join(f"{n} {o}" for o, n in sorted(Counter(outcomes.values()).items()))
    print(f"grid {spec.name!r}: {counts}; runs in {paths.root}/runs")
    return 130 if runner.stop.is_set() else 0 if all(o in ("done", SKIP_DONE) for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
