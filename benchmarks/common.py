"""Shared helpers of the benchmark entry points: run a script, read its TensorBoard events, the SPS arithmetic, tables,
JSON results with a record of the machine, and the reference numbers quoted from the shared notes.

Nothing here changes the three scripts: everything is measured from the outside (their exit code, their last stdout
line and their TensorBoard events) or by importing their classes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CARTPOLE_SCRIPT = "dqn_cartpole.py"
ATARI_SCRIPTS = ("dqn_atari.py", "dqn_atari_dueling_per.py")
SCRIPTS = (CARTPOLE_SCRIPT, *ATARI_SCRIPTS)
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")  # what the scripts accept for --run-name
KB = 1000  # the notes quote decimal kilobytes (CleanRL 4 * 84 * 84 bytes = 28.2 KB)


# ---------------------------------------------------------------------------------------------------------------------
# Reference numbers, each with its source. None of them is measured by this package: they are printed next to ours.
# ---------------------------------------------------------------------------------------------------------------------
NOTES = "shared/NOTES.md"
NOTES_PEERS = f"{NOTES}, 'The peers, measured side by side on this 2-core CPU'"
NOTES_SCORES = f"{NOTES}, 'Published reference scores'"


@dataclass(frozen=True)
class Reference:
    value: float
    unit: str
    source: str
    note: str = ""


REFERENCES: dict[str, Reference] = {
    "cleanrl_atari_sps": Reference(108, "SPS", NOTES_PEERS, "CleanRL dqn_atari.py, training phase, Breakout, batch 32, "
                                   "train every 4, 12k steps, 2k learning starts, 1 env, this 2-core CPU"),
    "sb3_atari_sps": Reference(91, "SPS", NOTES_PEERS, "SB3 DQN, same config and machine"),
    "nature_cnn_update_ms": Reference(25, "ms", NOTES_PEERS, "one Nature-CNN update, batch 32, fp32, 2 threads; "
                                      "bound about 4 / 0.025 = 160 SPS"),
    "cleanrl_replay_kb": Reference(28.2, "KB/transition", NOTES_PEERS, "stacked obs, optimize_memory_usage"),
    "sb3_replay_kb": Reference(56.5, "KB/transition", NOTES_PEERS, "SB3 default ReplayBuffer (obs and next obs)"),
    "dedup_replay_kb": Reference(7.1, "KB/transition", NOTES_PEERS,
                                 "single frames, stacks rebuilt (Dopamine, Tianshou)"),
    "cleanrl_cartpole_steps": Reference(210_000, "steps", NOTES_PEERS, "CleanRL dqn.py to a last-10-episode mean of "
                                        "475 (a training-return criterion, not a greedy evaluation)"),
    "cleanrl_cartpole_seconds": Reference(130, "s", NOTES_PEERS, "same run as cleanrl_cartpole_steps"),
}

# game -> column -> (mean, spread over seeds)
PUBLISHED_SCORES: dict[str, dict[str, tuple[float, float]]] = {
    "Breakout": {"CleanRL dqn_atari (10M steps)": (366.9, 39.9), "Nature DQN": (401.2, 26.9)},
    "Pong": {"CleanRL dqn_atari (10M steps)": (20.25, 0.41), "Nature DQN": (18.9, 1.3)},
    "BeamRider": {"CleanRL dqn_atari (10M steps)": (6673, 1434), "Nature DQN": (6846, 1619)},
}
PUBLISHED_NOTE = (f"Source: {NOTES_SCORES}. CleanRL dqn_atari.py: 10M steps, 3 seeds (about 6 h per run on a GPU). "
                  "Nature DQN: Mnih et al. 2015, 50M (NOTES.md says steps; the paper trained on 50M frames).")


def references_json(keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {key: vars(REFERENCES[key]) for key in keys}


# ---------------------------------------------------------------------------------------------------------------------
# Scripts: import (for their classes) and run (as a subprocess, as a user would)
# ---------------------------------------------------------------------------------------------------------------------
def script_path(script: str) -> Path:
    """A script name relative to the repository root (dqn_atari.py), or any path."""
    path = Path(script)
    return path if path.is_absolute() else REPO_ROOT / path


def load_script(script: str) -> ModuleType:
    """Imports a script as a module; the scripts have no top-level side effects (STYLE.md rule 4)."""
    path = script_path(script)
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env_slug(env_id: str) -> str:
    """The env id as the scripts put it in run names: ALE/Pong-v5 -> ALE-Pong-v5."""
    return env_id.replace("/", "-")


def run_name_for(env_id: str, script: str, seed: int, tag: str) -> str:
    """{env_id}__{exp_name}__{seed}__{tag}: the scripts' own default pattern, with `tag` in place of the unix time,
    so that plot.py and W&B group our runs as they would the scripts' default-named ones."""
    name = f"{env_slug(env_id)}__{Path(script).stem}__{seed}__{tag}"
    if not RUN_NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"{name!r} is not a run name the scripts accept (letters, digits, . _ = + -)")
    return name


@dataclass
class ScriptRun:
    command: list[str]
    returncode: int
    wall_s: float  # the whole process: start-up, warm-up, training, final evaluation, checkpoint
    log_path: Path
    output: str  # stdout and stderr together


def run_script(script: str, flags: Sequence[str], cwd: Path, log_path: Path) -> ScriptRun:
    """Runs `python SCRIPT FLAGS` in `cwd` (the scripts write runs/ there), output to `log_path`; waits for it."""
    command = [sys.executable, str(script_path(script)), *flags]
    cwd.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ (cd {cwd} && {' '.join(command)})  > {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        returncode = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
    wall_s = time.perf_counter() - start
    return ScriptRun(command, returncode, wall_s, log_path, log_path.read_text(errors="replace"))


def check_run(run: ScriptRun) -> None:
    """Stops the benchmark with the script's last lines when a run failed: a number from a failed run is no number."""
    if run.returncode != 0:
        tail = "\n".join(run.output.splitlines()[-15:])
        raise SystemExit(f"{' '.join(run.command)} exited with {run.returncode} (log: {run.log_path}):\n{tail}")


FINISHED_RE = re.compile(r"^finished (?P<run_name>\S+): (?P<steps>\d+) steps, (?P<updates>\d+) gradient updates, "
                         r"(?P<syncs>\d+) target syncs in (?P<seconds>[\d.]+)s; best eval return (?P<best_eval>\S+)$")
GOAL_RE = re.compile(r"^goal reached: eval mean (?P<mean>\S+) >= (?P<goal>\S+) at step (?P<step>\d+) "
                     r"after (?P<seconds>[\d.]+)s$")


def parse_finished(output: str) -> Optional[dict[str, Any]]:
    """The scripts' last stdout line on a normal exit, as numbers; None when absent."""
    for line in reversed(output.splitlines()):
        if match := FINISHED_RE.match(line.strip()):
            d = match.groupdict()
            return {"run_name": d["run_name"], "steps": int(d["steps"]), "gradient_updates": int(d["updates"]),
                    "target_syncs": int(d["syncs"]), "seconds": float(d["seconds"]),
                    "best_eval_return": float(d["best_eval"])}
    return None


def parse_goal(output: str) -> Optional[dict[str, Any]]:
    """dqn_cartpole.py's `goal reached: ...` line (printed when --goal-score is met); None when absent."""
    for line in output.splitlines():
        if match := GOAL_RE.match(line.strip()):
            d = match.groupdict()
            return {"eval_mean": float(d["mean"]), "goal": float(d["goal"]), "step": int(d["step"]),
                    "seconds": float(d["seconds"])}
    return None


T = TypeVar("T")


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """Calls fn(*args) in a new interpreter (spawn), so a measurement shares no threads, allocator or imports with
    the parent; fn must be a module-level function of an importable module."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard events
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalarPoint:
    step: int
    wall_time: float
    value: float


def _accumulator(run_dir: Path):
    # imported here: tensorboard's event loader is slow to import and only some entry points need it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0 = keep every event (the default keeps a reservoir sample of 10k scalars per tag);
    # purge_orphaned_data (the default) drops events a resumed run rewrote, as TensorBoard shows them
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def read_scalars(run_dir: Path, tags: Sequence[str]) -> dict[str, list[ScalarPoint]]:
    """Every event of each tag (an absent tag gives []), in step order."""
    accumulator = _accumulator(run_dir)
    present = set(accumulator.Tags()["scalars"])
    return {tag: sorted((ScalarPoint(e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag)),
                        key=lambda p: (p.step, p.wall_time)) if tag in present else [] for tag in tags}


def parse_hparams_table(text: str) -> dict[str, str]:
    """The scripts' `hyperparameters` text: a markdown table |param|value| -> {param: value} (values as text)."""
    params = {}
    for line in text.splitlines():
        cells = line.strip().strip("|").split("|")
        if len(cells) == 2 and cells[0] not in ("param", "-"):
            params[cells[0].strip()] = cells[1].strip()
    return params


def read_hparams(run_dir: Path) -> dict[str, str]:
    """The run's hyperparameters text table ({} when the run has none)."""
    accumulator = _accumulator(run_dir)
    if "hyperparameters/text_summary" not in accumulator.Tags()["tensors"]:
        return {}
    events = accumulator.Tensors("hyperparameters/text_summary")
    return parse_hparams_table(events[-1].tensor_proto.string_val[0].decode())


def sps_from_points(points: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Env steps per second between the first and the last (step, wall time) point:
    (step_last - step_first) / (wall_last - wall_first)."""
    if len(points) < 2:
        raise ValueError(f"need at least 2 timed points, got {len(points)}: run longer after learning starts")
    (step_first, wall_first), (step_last, wall_last) = min(points), max(points)
    if wall_last <= wall_first or step_last <= step_first:
        raise ValueError(f"points do not advance: {points[0]} .. {points[-1]}")
    return {"sps": (step_last - step_first) / (wall_last - wall_first), "first_step": step_first,
            "last_step": step_last, "seconds": wall_last - wall_first, "points": len(points)}


def training_sps(run_dir: Path) -> dict[str, float]:
    """Training-phase SPS of a run from its losses/td_loss events. The scripts log that tag every 100 gradient
    updates, at the env step of the update, so every event lies after learning starts: warm-up, start-up and the final
    evaluation are outside the window; periodic evaluations inside it (if --eval-frequency falls there) are in it."""
    points = read_scalars(run_dir, ["losses/td_loss"])["losses/td_loss"]
    return sps_from_points([(p.step, p.wall_time) for p in points])


# ---------------------------------------------------------------------------------------------------------------------
# Output: tables and JSON
# ---------------------------------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 1) -> str:
    """Numbers with thousands separators and `digits` decimals (ints without); None/NaN as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """A markdown table (readable in a terminal, pasteable into RESULTS.md); numbers right-aligned."""
    cells = [[fmt(v, digits) for v in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in cells)])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a number depends on: host, CPU, cores, torch and its threads, the GPU if any."""
    import torch

    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        pass
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line: '2 x Intel(R) Xeon(R) ..., 24 GB RAM, no GPU, torch 2.13.0+cpu (2 threads), host h'."""
    gpu = info.get("gpu") or "no GPU"
    ram = f", {info['ram_gb']} GB RAM" if "ram_gb" in info else ""
    return (f"{info.get('cpu_count')} x {info.get('cpu')}{ram}, {gpu}, torch {info.get('torch')} "
            f"({info.get('torch_threads')} threads), host {info.get('host')}")


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the tree had uncommitted changes (numbers from a dirty tree say so)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """payload plus `meta` (command line, time, machine, git state) to `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"argv": sys.argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
            "git": git_state()}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({**payload, "meta": meta}, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"machine: {describe_machine(meta['machine'])}\nwrote {path}")
    return path


def require_cuda(cuda: bool) -> None:
    """--cuda where there is no GPU would silently measure the CPU (the scripts fall back with a warning): refuse."""
    import torch

    if cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda was given but torch sees no CUDA device here")


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`own args -- script flags`: what follows a lone `--` goes to the scripts untouched (tyro would parse it)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


@dataclass
class AtariBenchConfig:
    """The fixed Atari SPS configuration (NOTES.md: the one CleanRL's 108 SPS and SB3's 91 SPS were measured in)."""

    env_id: str = "BreakoutNoFrameskip-v4"
    """the Atari game"""
    seed: int = 1
    """the seed of the runs"""
    total_timesteps: int = 12_000
    """env steps of each run"""
    learning_starts: int = 2_000
    """env step at which updates start"""
    batch_size: int = 32
    """the batch size of each update"""
    train_frequency: int = 4
    """env steps per gradient update"""
    buffer_size: Optional[int] = None
    """replay capacity (default: total-timesteps, so that nothing is ever overwritten)"""
    max_episode_frames: int = 10_000
    """frame cap of an episode: bounds the final 1-episode evaluation (the cap applies to training episodes too)"""
    num_envs: int = 1
    """parallel envs of our scripts (SB3 always uses 1)"""
    cuda: bool = False
    """run on the GPU (--cuda to the scripts) instead of the CPU"""
    out_dir: Path = RESULTS_DIR
    """where JSON results, and the scripts' runs/ and logs go"""

    def capacity(self) -> int:
        return self.buffer_size or self.total_timesteps

    def script_flags(self, run_name: str) -> list[str]:
        """Our Atari scripts' flags for this config: evaluation only at the end (1 episode), no periodic checkpoint."""
        return ["--env-id", self.env_id, "--seed", str(self.seed), "--run-name", run_name,
                "--total-timesteps", str(self.total_timesteps), "--learning-starts", str(self.learning_starts),
                "--batch-size", str(self.batch_size), "--train-frequency", str(self.train_frequency),
                "--buffer-size", str(self.capacity()), "--num-envs", str(self.num_envs),
                "--eval-frequency", "0", "--eval-episodes", "1", "--max-episode-frames", str(self.max_episode_frames),
                "--checkpoint-frequency", "0", "--cuda" if self.cuda else "--no-cuda"]


@dataclass
class MeasuredRun:
    """One script run measured for SPS: the run's identity and the numbers read back from it."""

    script: str
    run_name: str
    run_dir: str
    wall_s: float
    training: dict[str, float]  # sps_from_points() of its losses/td_loss events
    finished: Optional[dict[str, Any]]  # parse_finished() of its output


def measure_script_sps(script: str, flags: list[str], run_name: str, workdir: Path) -> MeasuredRun:
    """Runs a script to completion in `workdir` and reads its training-phase SPS back from its events."""
    run = run_script(script, flags, workdir, workdir / "logs" / f"{run_name}.log")
    check_run(run)
    run_dir = workdir / "runs" / run_name
    return MeasuredRun(script, run_name, str(run_dir), run.wall_s, training_sps(run_dir), parse_finished(run.output))


def timestamp_tag(prefix: str) -> str:
    """A run-name tag unique per second: sps-20261123-071500."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
