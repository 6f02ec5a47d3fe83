"""Shared test helpers: import a script as a module, run it as a subprocess, read its TensorBoard scalars."""

import contextlib
import functools
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["dqn_cartpole", "dqn_atari", "dqn_atari_dueling_per"]


@functools.cache
def load_script(name: str, root: Path = ROOT):
    """Imports {root}/{name}.py (the scripts have no top-level side effects)."""
    spec = importlib.util.spec_from_file_location(name, Path(root) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args, cwd, timeout: float = 600, env: dict | None = None, wait: bool = True,
               stderr=subprocess.PIPE, root: Path = ROOT):
    """Runs `python {root}/{name}.py args...` in cwd; returns the CompletedProcess (or the Popen if wait=False, whose
    stderr goes to `stderr`: a pipe by default, or e.g. a pty's file descriptor)."""
    cmd = [sys.executable, str(root / f"{name}.py"), *map(str, args)]
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_main(name: str, *args, cwd, root: Path = ROOT) -> subprocess.CompletedProcess:
    """Runs {name}.main() on the parsed flags inside this process, from cwd, with stdout and stderr captured; returns
    what run_script would (the exit code from SystemExit). It saves the interpreter start-up and the imports of torch,
    ale-py and TensorBoard, a few seconds a run; tests of the process itself (signals, kills, tracebacks, a terminal,
    environment variables) use run_script."""
    import tyro

    module, out, err, code = load_script(name, root), io.StringIO(), io.StringIO(), 0
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main(tyro.cli(module.Args, args=[str(a) for a in args]))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess([name, *map(str, args)], code, out.getvalue(), err.getvalue())


def read_summary(run_dir) -> dict:
    """runs/{run}/summary.json, which every run leaves when it ends (completed, a signal, a non-finite loss)."""
    path = Path(run_dir) / "summary.json"
    assert path.exists(), f"no {path}"
    return json.loads(path.read_text())


def finished_counts(run_dir) -> dict:
    """Env steps, gradient updates and target syncs of a run, from its summary.json."""
    summary = read_summary(run_dir)
    return {"steps": summary["env_steps"], "updates": summary["gradient_updates"],
            "target_syncs": summary["target_syncs"]}


def read_scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one TensorBoard tag across all event files of a run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def read_tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"]) | {f"text:{t}" for t in acc.Tags().get("tensors", [])}


def wait_until(predicate, proc, timeout: float = 300, poll: float = 0.05) -> None:
    """Polls predicate() until true; fails early with the process's output if it exits first."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited with {proc.returncode} first:\n{out}\n{err}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(poll)


def checkpoint_step(path) -> int | None:
    """The global_step of a checkpoint file, or None while it does not exist (or is being replaced)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None
