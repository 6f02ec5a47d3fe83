"""Multi-seed, multi-env runner: a grid of (script, env id, seed) cells, run locally by a bounded worker pool or as a
Slurm job array, resumable, with deterministic run names and one W&B group per grid.

Layout of a grid folder ({root}/{name}/, the scripts' working directory, so their runs/ land in it):
    grid.json                 the grid's spec (scripts, env ids, seeds, extra flags, W&B settings), fixed at creation
    runs/{run_name}/          what the scripts write: TensorBoard events, checkpoint.pt, best_model.pt
    logs/{run_name}.log       each attempt's output, appended
    state/{run_name}.json     bookkeeping per cell: status, attempts, failures, last exit code, command, machine
    state/{run_name}.done     the marker of a finished cell, written only when the script exited 0
    state/{run_name}.lock     held (flock) while a process runs the cell, so two runners never run it at once
    stale/                    the runs/ folder of a cell that restarted from scratch (it died before its first
                              checkpoint), moved aside so that plots never mix two attempts
Run name: {env_id}__{exp_name}__{seed}__{grid name}, the scripts' default pattern with the grid name in place of the
time, so W&B ids (= run names) and plot.py's grouping stay stable across resumptions.

Re-running the same command resumes: a cell with a .done marker is skipped, one with a checkpoint continues with
`--resume runs/{run_name}/checkpoint.pt`, any other starts; a cell that failed --max-attempts times (an exit code
other than 0, 130 or 143; SIGKILL included) is left alone. Ctrl-C or SIGTERM asks every running script to
checkpoint and stop (a second one stops them at once).

    python -m benchmarks.grid --name breakout-pong --scripts dqn_atari.py --env-ids BreakoutNoFrameskip-v4 \\
        PongNoFrameskip-v4 --seeds 1 2 3 -- --total-timesteps 10000000 --checkpoint-frequency 250000
    python -m benchmarks.grid --name breakout-pong                 # resume it (the spec is read from grid.json)
    python -m benchmarks.grid --name breakout-pong --slurm         # write an sbatch job array for it instead
"""

from __future__ import annotations

import enum
import fcntl
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import tyro

from benchmarks.common import (REPO_ROOT, RESULTS_DIR, RUN_NAME_RE, describe_machine, git_state, machine_info,
                               run_name_for, script_path, split_passthrough)

GRID_ROOT = RESULTS_DIR / "grids"
# flags the grid sets per cell; in the extra flags they would make cells collide or break resumption
RESERVED_FLAGS = ("--env-id", "--seed", "--run-name", "--resume", "--play", "--track", "--no-track", "--wandb-group",
                  "--wandb-project-name", "--wandb-entity")
SIGNAL_EXITS = (130, 143)  # the scripts' exit codes after SIGINT / SIGTERM: checkpointed, resumable


# ---------------------------------------------------------------------------------------------------------------------
# The grid: spec, cells, paths
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridSpec:
    name: str
    scripts: tuple[str, ...]
    env_ids: tuple[str, ...]
    seeds: tuple[int, ...]
    extra: tuple[str, ...] = ()  # flags given to every cell
    track: bool = False
    wandb_project_name: str = "cleanRL"
    wandb_entity: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @staticmethod
    def from_json(text: str) -> "GridSpec":
        d = json.loads(text)
        return GridSpec(**{**d, **{k: tuple(d[k]) for k in ("scripts", "env_ids", "seeds", "extra")}})


def validate_spec(spec: GridSpec) -> list[str]:
    """Problems with a spec, as messages ([] when none)."""
    problems = []
    if not RUN_NAME_RE.fullmatch(spec.name) or ".." in spec.name or "__" in spec.name:
        problems.append(f"--name {spec.name!r} must be a plain name (letters, digits, . _ = + -, no '__')")
    for key in ("scripts", "env_ids", "seeds"):
        if not getattr(spec, key):
            problems.append(f"--{key.replace('_', '-')} is empty")
        if len(set(getattr(spec, key))) != len(getattr(spec, key)):
            problems.append(f"--{key.replace('_', '-')} has duplicates")
    problems += [f"{s} does not exist" for s in spec.scripts if not script_path(s).is_file()]
    for flag in spec.extra:
        if flag.split("=", 1)[0] in RESERVED_FLAGS:
            problems.append(f"{flag.split('=', 1)[0]} is set by the grid per cell; remove it from the flags after --")
    return problems


@dataclass(frozen=True)
class Cell:
    index: int  # position in the grid: the Slurm array task id
    script: str
    env_id: str
    seed: int
    run_name: str


def expand_grid(spec: GridSpec) -> list[Cell]:
    """The cells, scripts outermost and seeds innermost; indices are stable for a given spec."""
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

    def state(self, cell: Cell) -> Path:
        return self.root / "state" / f"{cell.run_name}.json"

    def done(self, cell: Cell) -> Path:
        return self.root / "state" / f"{cell.run_name}.done"

    def lock(self, cell: Cell) -> Path:
        return self.root / "state" / f"{cell.run_name}.lock"


def load_or_create_spec(paths: GridPaths, given: Optional[GridSpec]) -> GridSpec:
    """The grid's spec: the saved one, which a given spec must equal (a grid never changes under its name), or the
    given one, saved, for a new grid."""
    if paths.spec.exists():
        saved = GridSpec.from_json(paths.spec.read_text())
        if given is not None and given != saved:
            diff = {k: (v, getattr(given, k)) for k, v in asdict(saved).items() if getattr(given, k) != v}
            raise SystemExit(f"grid {saved.name!r} exists with another spec (saved, given): {diff}; "
                             "use another --name, or give only --name to resume it")
        return saved
    if given is None:
        raise SystemExit(f"no grid at {paths.root}: give --scripts, --env-ids and --seeds to create it")
    problems = validate_spec(given)
    if problems:
        raise SystemExit("bad grid: " + "; ".join(problems))
    paths.root.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.spec, given.to_json())
    return given


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Resume bookkeeping (pure)
# ---------------------------------------------------------------------------------------------------------------------
class Action(enum.Enum):
    SKIP_DONE = "skip: done"
    SKIP_FAILED = "skip: failed too often"
    RESUME = "resume"
    START = "start"


def plan_cell(done: bool, has_checkpoint: bool, failures: int, max_attempts: int) -> Action:
    """What to do with a cell: only a .done marker (exit 0) finishes it; a checkpoint means progress to keep."""
    if done:
        return Action.SKIP_DONE
    if failures >= max_attempts:
        return Action.SKIP_FAILED
    return Action.RESUME if has_checkpoint else Action.START


def classify_exit(returncode: int) -> str:
    """'done' (0); 'interrupted' (the scripts' exit after SIGINT/SIGTERM, checkpointed, or death by one of those
    signals: resumable, not a failure); else 'failed', SIGKILL included (an out-of-memory kill looks the same)."""
    if returncode == 0:
        return "done"
    if returncode in SIGNAL_EXITS or -returncode in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        return "interrupted"
    return "failed"


def cell_command(python: str, spec: GridSpec, cell: Cell, resume: bool) -> list[str]:
    """The cell's command line, run in the grid folder."""
    command = [python, str(script_path(cell.script)), "--env-id", cell.env_id, "--seed", str(cell.seed),
               "--run-name", cell.run_name, *spec.extra]
    if resume:
        command += ["--resume", f"runs/{cell.run_name}/checkpoint.pt"]
    if spec.track:
        command += ["--track", "--wandb-project-name", spec.wandb_project_name, "--wandb-group", spec.name]
        if spec.wandb_entity:
            command += ["--wandb-entity", spec.wandb_entity]
    return command


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------------------------------
# Running cells
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Runner:
    """Runs cells, each in its own session so that a terminal's Ctrl-C reaches only this process, which then asks
    each script once to stop (SIGINT: it checkpoints and exits 130). SIGINT rather than SIGTERM because a scheduler
    may send the script its own SIGTERM as well: one of each is still a graceful stop, two SIGTERMs would kill it."""

    spec: GridSpec
    paths: GridPaths
    python: str = sys.executable
    max_attempts: int = 3
    stop: threading.Event = field(default_factory=threading.Event)
    _children: set[subprocess.Popen] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def request_stop(self, signum: int, frame: Any = None) -> None:
        first = not self.stop.is_set()
        self.stop.set()
        print(f"\ngrid: signal {signum}: " + ("asking the running scripts to checkpoint and stop" if first else
                                               "stopping the running scripts now"), file=sys.stderr, flush=True)
        with self._lock:
            for child in self._children:
                child.send_signal(signal.SIGINT)  # the scripts' first SIGINT: stop; a second: die

    def run_cell(self, cell: Cell, total: int) -> str:
        """Runs one cell if it needs running; returns its outcome."""
        tag = f"[{cell.index + 1}/{total}] {cell.run_name}"
        if self.stop.is_set():
            return "not started"
        self.paths.lock(cell).parent.mkdir(parents=True, exist_ok=True)
        with open(self.paths.lock(cell), "w") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{tag}: skip: another runner holds it", flush=True)
                return "running elsewhere"
            state = read_state(self.paths.state(cell))
            action = plan_cell(self.paths.done(cell).exists(), self.paths.checkpoint(cell).exists(),
                               state.get("failures", 0), self.max_attempts)
            if action in (Action.SKIP_DONE, Action.SKIP_FAILED):
                print(f"{tag}: {action.value}", flush=True)
                return action.value
            if action is Action.START and self.paths.run_dir(cell).exists():
                # an attempt that died before its first checkpoint: keep its files, out of the plots' way
                stale = self.paths.root / "stale" / f"{cell.run_name}.{time.strftime('%Y%m%d-%H%M%S')}"
                stale.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.paths.run_dir(cell), stale)
            return self._execute(cell, action, state, tag)

    def _execute(self, cell: Cell, action: Action, state: dict[str, Any], tag: str) -> str:
        command = cell_command(self.python, self.spec, cell, resume=action is Action.RESUME)
        attempt = state.get("attempts", 0) + 1
        slurm = {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
                 if k in os.environ}
        state = {"cell": asdict(cell), "status": "running", "action": action.value, "attempts": attempt,
                 "failures": state.get("failures", 0), "command": command, "started": time.time(),
                 "wall_s": state.get("wall_s", 0.0),  # the seconds of every attempt so far, this one added at its end
                 "machine": machine_info(), "git": git_state(), "slurm": slurm or None}
        self.paths.log(cell).parent.mkdir(parents=True, exist_ok=True)
        with open(self.paths.log(cell), "a") as log:
            log.write(f"=== attempt {attempt}, {action.value}, {time.strftime('%Y-%m-%d %H:%M:%S')} on "
                      f"{describe_machine(state['machine'])}\n$ {shlex.join(command)}\n")
            log.flush()
            with self._lock:  # no new script once a stop was asked for (request_stop holds this lock to signal)
                if self.stop.is_set():
                    return "not started"
                child = subprocess.Popen(command, cwd=self.paths.root, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
                self._children.add(child)
            write_atomic(self.paths.state(cell), json.dumps(state, indent=2) + "\n")
            print(f"{tag}: {action.value} (attempt {attempt}, log {self.paths.log(cell)})", flush=True)
            returncode = child.wait()
            with self._lock:
                self._children.discard(child)
        outcome = classify_exit(returncode)
        ended = time.time()
        state.update(status=outcome, returncode=returncode, ended=ended,
                     wall_s=state["wall_s"] + ended - state["started"],
                     failures=state["failures"] + (outcome == "failed"))
        write_atomic(self.paths.state(cell), json.dumps(state, indent=2) + "\n")
        if outcome == "done":
            write_atomic(self.paths.done(cell), f"exit 0 at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        print(f"{tag}: {outcome} (exit {returncode}) after {state['ended'] - state['started']:.0f} s", flush=True)
        return outcome


def run_cells(runner: Runner, cells: Sequence[Cell], total: int, workers: int) -> dict[str, str]:
    """Runs cells on `workers` threads (each waits on one script process); returns run name -> outcome."""
    previous = {s: signal.signal(s, runner.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    outcomes: dict[str, str] = {}
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: dict[Future, Cell] = {pool.submit(runner.run_cell, cell, total): cell for cell in cells}
            while pending:  # wait with a timeout: signal handlers run on this (main) thread between waits
                finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    outcomes[pending.pop(future).run_name] = future.result()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return outcomes


# ---------------------------------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------------------------------
def array_ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array syntax)."""
    parts, ordered = [], sorted(set(indices))
    for _, group in itertools.groupby(enumerate(ordered), key=lambda p: p[1] - p[0]):
        run = [i for _, i in group]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts)


@dataclass(frozen=True)
class SlurmOptions:
    """What the sbatch file asks for; the defaults here are also the --slurm-* flags' defaults."""

    partition: Optional[str] = None
    time: str = "2-00:00:00"
    cpus: int = 4
    gpus: int = 1
    mem: str = "16G"
    max_parallel: Optional[int] = None
    signal_s: int = 300
    directives: tuple[str, ...] = ()


def sbatch_script(spec: GridSpec, paths: GridPaths, indices: Sequence[int], python: str, max_attempts: int,
                  options: SlurmOptions) -> str:
    """An sbatch job array, one task per cell index: each runs this module on its cell (resume-aware, locked).
    --signal sends SIGTERM to the task `signal_s` seconds before its time limit, which the runner turns into a
    checkpoint; resubmitting the file then continues from it."""
    root = paths.root.resolve()
    array = array_ranges(indices) + (f"%{options.max_parallel}" if options.max_parallel else "")
    lines = ["#!/bin/bash",
             f"# Generated by benchmarks/grid.py: grid {spec.name!r}, {len(indices)} cell(s) of "
             f"{len(spec.scripts) * len(spec.env_ids) * len(spec.seeds)}, one array task each.",
             "# Resubmitting is safe: finished cells exit at once, interrupted ones resume from their checkpoint.",
             f"#SBATCH --job-name={spec.name}",
             f"#SBATCH --array={array}",
             f"#SBATCH --output={root}/logs/slurm-%A_%a.out",
             "#SBATCH --open-mode=append",
             f"#SBATCH --cpus-per-task={options.cpus}",
             f"#SBATCH --mem={options.mem}",
             f"#SBATCH --time={options.time}",
             f"#SBATCH --signal=B:TERM@{options.signal_s}"]
    if options.gpus:
        lines.append(f"#SBATCH --gres=gpu:{options.gpus}")
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    lines += [f"#SBATCH {d}" for d in options.directives]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(REPO_ROOT))}",
              "# exec: the runner receives Slurm's signal itself and forwards it to the script",
              f"exec {shlex.quote(python)} -m benchmarks.grid --name {shlex.quote(spec.name)} "
              f"--root {shlex.quote(str(root.parent))} --max-attempts {max_attempts} --cell \"$SLURM_ARRAY_TASK_ID\""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    name: str
    """the grid's name: its folder, the run names' suffix and the W&B group"""
    scripts: Optional[tuple[str, ...]] = None
    """scripts of a new grid (paths relative to the repository root)"""
    env_ids: Optional[tuple[str, ...]] = None
    """env ids of a new grid"""
    seeds: Optional[tuple[int, ...]] = None
    """seeds of a new grid"""
    track: bool = False
    """log every cell to W&B (--track), grouped as --wandb-group NAME"""
    wandb_project_name: str = "cleanRL"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity"""
    root: Path = GRID_ROOT
    """the folder that holds grid folders"""
    workers: int = 1
    """cells run at once (each script uses every core it gets: 1 on a 2-core machine)"""
    max_attempts: int = 3
    """leave a cell alone after it failed this many times (stops by SIGINT/SIGTERM do not count; SIGKILL does)"""
    cell: Optional[int] = None
    """run only the cell with this index (what each Slurm array task does)"""
    dry_run: bool = False
    """print each cell's plan and command, run nothing"""
    python: str = sys.executable
    """the Python that runs the scripts (and, with --slurm, this runner)"""
    slurm: bool = False
    """write {root}/{name}/{name}.sbatch (a job array over the unfinished cells) instead of running"""
    slurm_partition: Optional[str] = SlurmOptions.partition
    """#SBATCH --partition"""
    slurm_time: str = SlurmOptions.time
    """#SBATCH --time of each task"""
    slurm_cpus: int = SlurmOptions.cpus
    """#SBATCH --cpus-per-task"""
    slurm_gpus: int = SlurmOptions.gpus
    """GPUs per task (#SBATCH --gres=gpu:N; 0: none)"""
    slurm_mem: str = SlurmOptions.mem
    """#SBATCH --mem (a 1M-transition Atari replay takes about 7 GB)"""
    slurm_max_parallel: Optional[int] = SlurmOptions.max_parallel
    """at most this many tasks at once (--array=...%N)"""
    slurm_directive: tuple[str, ...] = SlurmOptions.directives
    """extra #SBATCH lines, e.g. --slurm-directive=--account=rl"""


def main(args: Args, extra: list[str]) -> int:
    paths = GridPaths(args.root / args.name)
    given = None
    if args.scripts is not None or args.env_ids is not None or args.seeds is not None:
        given = GridSpec(args.name, tuple(args.scripts or ()), tuple(args.env_ids or ()), tuple(args.seeds or ()),
                         tuple(extra), args.track, args.wandb_project_name, args.wandb_entity)
    elif extra:
        raise SystemExit("flags after -- belong to a grid's spec: give them with --scripts, --env-ids and --seeds")
    spec = load_or_create_spec(paths, given)
    cells = expand_grid(spec)
    if args.cell is not None:
        if not 0 <= args.cell < len(cells):
            raise SystemExit(f"--cell {args.cell} is not a cell of grid {spec.name!r} (0..{len(cells) - 1})")
        cells = [cells[args.cell]]

    def plan(cell: Cell) -> Action:
        return plan_cell(paths.done(cell).exists(), paths.checkpoint(cell).exists(),
                         read_state(paths.state(cell)).get("failures", 0), args.max_attempts)

    if args.dry_run:
        for cell in cells:
            action = plan(cell)
            command = cell_command(args.python, spec, cell, resume=action is Action.RESUME)
            print(f"[{cell.index}] {action.value:<22} (cd {paths.root} && {shlex.join(command)})")
        return 0
    if args.slurm:
        todo = [c.index for c in cells if plan(c) in (Action.START, Action.RESUME)]
        if not todo:
            print(f"grid {spec.name!r}: every cell is done or failed too often; nothing to submit")
            return 0
        options = SlurmOptions(args.slurm_partition, args.slurm_time, args.slurm_cpus, args.slurm_gpus, args.slurm_mem,
                               args.slurm_max_parallel, directives=args.slurm_directive)
        path = paths.root / f"{spec.name}.sbatch"
        write_atomic(path, sbatch_script(spec, paths, todo, args.python, args.max_attempts, options))
        print(f"wrote {path} ({len(todo)} array task(s)); submit it with:\n  sbatch {path}\n"
              f"progress: ls {paths.root}/state/*.done | wc -l; logs in {paths.root}/logs/")
        return 0

    runner = Runner(spec, paths, args.python, args.max_attempts)
    outcomes = run_cells(runner, cells, len(expand_grid(spec)), args.workers)
    counts = {o: list(outcomes.values()).count(o) for o in sorted(set(outcomes.values()))}
    print(f"grid {spec.name!r}: " + ", ".join(f"{n} {o}" for o, n in counts.items()) + f"; runs in {paths.root}/runs")
    if runner.stop.is_set():
        return 130
    return 0 if all(o in ("done", Action.SKIP_DONE.value) for o in outcomes.values()) else 1


if __name__ == "__main__":
    own, passthrough = split_passthrough(sys.argv[1:])
    sys.exit(main(tyro.cli(Args, args=own), passthrough))
