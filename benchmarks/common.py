"""Shared helpers of the benchmark entry points (benchmarks/README.md). Nothing here parses the scripts' printed lines
(STYLE.md rule 11): a run is read from its summary.json and TensorBoard events."""

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Literal, NamedTuple, Sequence, get_args

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
AtariScript = Literal["dqn_atari.py", "dqn_atari_dueling_per.py"]  # a flag of this type takes only these
Script = Literal["dqn_cartpole.py", AtariScript]
CARTPOLE_SCRIPT, ATARI_SCRIPTS, SCRIPTS = "dqn_cartpole.py", get_args(AtariScript), get_args(Script)
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")  # what the scripts accept for --run-name
KB = 1000  # the notes quote decimal kilobytes (CleanRL 4 * 84 * 84 bytes = 28.2 KB)
NOTES = "shared/NOTES.md"
ScalarPoint = NamedTuple("ScalarPoint", [("step", int), ("wall_time", float), ("value", float)])  # a TensorBoard event
# the short Atari protocol's flags (atari_short.py; gpu_check.sh reads them here, where no matplotlib is imported)
PROTOCOL = ("--total-timesteps", "200000", "--learning-starts", "20000", "--buffer-size", "100000",
            "--exploration-fraction", "0.5", "--target-network-frequency", "1000", "--train-frequency", "4",
            "--batch-size", "32", "--learning-rate", "1e-4", "--eval-frequency", "50000", "--eval-episodes", "10",
            "--eval-epsilon", "0.05", "--no-cuda", "--checkpoint-frequency", "50000", "--checkpoint-buffer")


@dataclass(frozen=True)
class Reference:
    """A number printed next to ours, never measured here, with its source."""

    value: float
    unit: str
    note: str
    source: str = f"{NOTES}, 'The peers, measured side by side on this 2-core CPU'"


REFERENCES = {
    "cleanrl_atari_sps": Reference(108, "SPS", "CleanRL dqn_atari.py, training phase, Breakout, batch 32, train every "
                                   "4, 12k steps, 2k learning starts, 1 env, this 2-core CPU"),
    "sb3_atari_sps": Reference(91, "SPS", "SB3 DQN, same config and machine"),
    "nature_cnn_update_ms": Reference(25, "ms", "one Nature-CNN update, batch 32, fp32, 2 threads; bound about "
                                      "4 / 0.025 = 160 SPS"),
    "cleanrl_replay_kb": Reference(28.2, "KB/transition", "stacked obs, optimize_memory_usage"),
    "sb3_replay_kb": Reference(56.5, "KB/transition", "SB3 default ReplayBuffer (obs and next obs)"),
    "dedup_replay_kb": Reference(7.1, "KB/transition", "single frames, stacks rebuilt (Dopamine, Tianshou)"),
    "cleanrl_cartpole_steps": Reference(210_000, "steps", "CleanRL dqn.py to a last-10-episode mean of 475 (a "
                                        "training-return criterion, not a greedy evaluation)"),
    "cleanrl_cartpole_seconds": Reference(130, "s", "same run as cleanrl_cartpole_steps"),
}
PUBLISHED_SCORES = {  # game -> column -> (mean, spread over seeds)
    "Breakout": {"CleanRL dqn_atari (10M steps)": (366.9, 39.9), "Nature DQN": (401.2, 26.9)},
    "Pong": {"CleanRL dqn_atari (10M steps)": (20.25, 0.41), "Nature DQN": (18.9, 1.3)},
    "BeamRider": {"CleanRL dqn_atari (10M steps)": (6673, 1434), "Nature DQN": (6846, 1619)},
}
PUBLISHED_NOTE = (f"Source: {NOTES}, 'Published reference scores'. CleanRL dqn_atari.py: 10M steps, 3 seeds (about "
                  "6 h per run on a GPU). Nature DQN: Mnih et al. 2015, 50M (NOTES.md says steps; the paper trained "
                  "on 50M frames).")


def references_json(keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {key: vars(REFERENCES[key]) for key in keys}


def script_path(script: str) -> Path:
    """A script name relative to the repository root (dqn_atari.py), or any path."""
    return Path(script) if Path(script).is_absolute() else REPO_ROOT / script


def load_script(script: str) -> ModuleType:
    """Imports a script as a module; the scripts have no top-level side effects (STYLE.md rule 4)."""
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", script_path(script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_name_for(env_id: str, script: str, seed: int, tag: str) -> str:
    """{env_id}__{exp_name}__{seed}__{tag}: the scripts' default pattern with `tag` in place of the unix time."""
    name = f"{env_id.replace('/', '-')}__{Path(script).stem}__{seed}__{tag}"  # as the scripts write env ids
    if not RUN_NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"{name!r} is not a run name the scripts accept (letters, digits, . _ = + -)")
    return name


def run_script(script: str, flags: Sequence[str], cwd: Path, log_path: Path) -> float:
    """Runs `python SCRIPT FLAGS` in `cwd` (runs/ lands there), output to `log_path`; returns the process's seconds.
    A failed run stops the benchmark with its last lines: a number from a failed run is no number."""
    command = [sys.executable, str(script_path(script)), *flags]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ (cd {cwd} && {' '.join(command)})  > {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        returncode = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{' '.join(command)} exited with {returncode} (log: {log_path}):\n{tail}")
    return time.perf_counter() - start


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object; {} when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_summary(run_dir: Path) -> dict[str, Any]:
    """runs/{run_name}/summary.json, which the scripts write when a run ends however it ends ({} before that)."""
    return read_json(Path(run_dir) / "summary.json")


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a new interpreter (spawn), sharing no threads, allocator or imports with the caller."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def timed_blocks(step: Callable[[], Any], warmup: int, iters: int, blocks: int = 1) -> list[float]:
    """Seconds per call of `step` in each of `blocks` equal blocks of `iters` calls, after `warmup` untimed ones:
    torch.utils.benchmark.Timer, which waits for the GPU around each block, on the process's torch threads (its
    default is 1 thread, which is not how the scripts run)."""
    import torch
    from torch.utils.benchmark import Timer

    timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    if warmup:
        timer.timeit(warmup)
    return [timer.timeit(max(1, iters // blocks)).mean for _ in range(blocks)]


def _accumulator(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow import: only here
    # size_guidance 0 = keep every event (the default samples 10k per tag); purge_orphaned_data (the default) drops
    # events a resumed run rewrote, as TensorBoard shows them
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def read_scalars(run_dir: Path, tags: Sequence[str]) -> dict[str, list[ScalarPoint]]:
    """Every event of each tag (an absent tag gives []), in step order."""
    accumulator = _accumulator(run_dir)
    present = set(accumulator.Tags()["scalars"])
    return {tag: sorted((ScalarPoint(e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag)),
                        key=lambda p: (p.step, p.wall_time)) if tag in present else [] for tag in tags}


def read_hparams(run_dir: Path) -> dict[str, str]:
    """The run's `hyperparameters` text, a markdown table |param|value|, as {param: value} ({} when absent)."""
    accumulator = _accumulator(run_dir)
    if "hyperparameters/text_summary" not in accumulator.Tags()["tensors"]:
        return {}
    text = accumulator.Tensors("hyperparameters/text_summary")[-1].tensor_proto.string_val[0].decode()
    cells = [line.strip().strip("|").split("|") for line in text.splitlines()]
    return {c[0].strip(): c[1].strip() for c in cells if len(c) == 2 and c[0] not in ("param", "-")}


def sps_from_points(points: Sequence[tuple[int, float]], max_gap: float = math.inf) -> dict[str, float]:
    """Env steps per second over (step, wall time) points in step order: from the first to the last, less the steps
    and seconds of any gap longer than `max_gap` seconds between two points (a run stopped and resumed later)."""
    points = sorted(points)
    if len(points) < 2:
        raise ValueError(f"need at least 2 timed points, got {len(points)}: run longer after learning starts")
    gaps = [(s1 - s0, t1 - t0) for (s0, t0), (s1, t1) in zip(points, points[1:]) if 0 < t1 - t0 <= max_gap]
    steps, seconds = sum(g[0] for g in gaps), sum(g[1] for g in gaps)
    if steps <= 0 or seconds <= 0:
        raise ValueError(f"points do not advance: {points[0]} .. {points[-1]}")
    return {"sps": steps / seconds, "first_step": points[0][0], "last_step": points[-1][0], "seconds": seconds,
            "points": len(points)}


def training_sps(run_dir: Path) -> dict[str, float]:
    """Training-phase SPS from the losses/td_loss events, which the scripts log every 100 updates at the env step of
    the update: start-up, warm-up and the final evaluation fall outside the window."""
    points = read_scalars(run_dir, ["losses/td_loss"])["losses/td_loss"]
    return sps_from_points([(p.step, p.wall_time) for p in points])


def iqm(values: np.ndarray) -> np.ndarray:
    """Mean of the middle 50% along the last axis: rliable's aggregate_iqm (scipy.stats.trim_mean(x, 0.25))."""
    values = np.sort(values, axis=-1)
    cut = int(0.25 * values.shape[-1])
    return values[..., cut:values.shape[-1] - cut].mean(axis=-1)


def iqm_ci(values: Sequence[float], reps: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """IQM over seeds and its percentile bootstrap CI, seeds resampled with replacement: rliable's stratified
    bootstrap with one task. With 2 or 3 seeds the interval about spans the seeds."""
    x = np.asarray(values, dtype=float)
    boot = iqm(x[np.random.default_rng(seed).integers(0, len(x), (reps, len(x)))])
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return {"iqm": float(iqm(x)), "ci_low": float(low), "ci_high": float(high), "level": level, "n": len(x)}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """A markdown table (tabulate's): columns of numbers right-aligned, with thousands separators and `digits` decimals,
    None and NaN as '-'; other columns left-aligned, their strings as given (tabulate would reformat '2.00')."""
    from tabulate import tabulate  # here, so that reading PROTOCOL (gpu_check.sh) needs no tabulate

    rows = [[None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(headers))]
    return tabulate(rows, headers, tablefmt="pipe", floatfmt=f",.{digits}f", intfmt=",", missingval="-",
                    colalign=["right" if n else "left" for n in numeric],
                    disable_numparse=[i for i, n in enumerate(numeric) if not n] if rows else True)


def machine_info() -> dict[str, Any]:
    """What a number depends on: host, CPU, cores, RAM, torch and its threads, the GPU if any."""
    import torch
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)}


def describe_machine(info: dict[str, Any]) -> str:
    """One line: '2 x Intel(R) Xeon(R) ..., 24 GB RAM, no GPU, torch 2.13.0+cpu (2 threads), host h'."""
    ram = f", {info['ram_gb']} GB RAM" if "ram_gb" in info else ""
    return (f"{info.get('cpu_count')} x {info.get('cpu')}{ram}, {info.get('gpu') or 'no GPU'}, torch "
            f"{info.get('torch')} ({info.get('torch_threads')} threads), host {info.get('host')}")


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """`payload` as JSON through a temporary file: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """payload plus `meta` (command line, time, machine, git state) to `path`."""
    meta = {"argv": sys.argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
            "git": git_state()}
    write_atomic(path, {**payload, "meta": meta})
    print(f"machine: {describe_machine(meta['machine'])}\nwrote {path}")
    return path


def pick_device(cuda: bool) -> Any:
    """--cuda's device. Where there is no GPU it would silently measure the CPU (the scripts fall back with a
    warning): refused."""
    import torch
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda was given but torch sees no CUDA device here")
    return torch.device("cuda" if cuda else "cpu")
