"""Fingerprint of short fixed-seed CPU runs of the three scripts, which a change meant to keep behaviour (a reshape,
a rename) must reproduce bit for bit: so that learning results measured before it stay valid after it.

Per script, one run in two processes: a first part, then `--resume` from its checkpoint (replay included) to the end.
Recorded: every logged training and evaluation return and TD loss with its step, the final counts of env steps,
gradient updates and target syncs, and a SHA-256 of the final online and target weights.
Float results depend on the CPU's kernels, so a fingerprint holds for the machine (CPU model, cores, torch, threads)
that recorded it. tests/fingerprint.json keeps one record per machine type (the Intel Xeon and the AMD EPYC dev VMs,
both from the same commit); tests/test_fingerprint.py compares against the record of the machine it runs on, fails
if that differs, and skips only on a machine with no record, saying how to add one there from the same commit:

    git worktree add /tmp/fp COMMIT && (cd /tmp/fp && python $OLDPWD/tests/fingerprint.py --scripts-from . \
        --out $OLDPWD/tests/fingerprint.json)
    python tests/fingerprint.py            # record from the working tree (only before a behaviour-keeping change)

Recording replaces this machine's record in the file and keeps the others.
"""

import argparse
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ROOT, read_scalars, run_main, run_script  # noqa: E402

ATARI = ["--num-envs", 2, "--buffer-size", 2000, "--learning-starts", 400, "--train-frequency", 4, "--batch-size", 16,
         "--target-network-frequency", 200, "--eval-frequency", 600, "--eval-episodes", 1, "--max-episode-frames",
         800, "--checkpoint-buffer", "--no-cuda"]
# (flags of both parts, the first part's steps, the total)
RUNS = {
    "dqn_cartpole": (["--learning-starts", 500, "--eval-frequency", 1000, "--eval-episodes", 2, "--no-cuda"], 1500,
                     3000),
    "dqn_atari": (ATARI, 600, 1200),
    "dqn_atari_dueling_per": (ATARI, 600, 1200),
}
TAGS = ["charts/episodic_return", "eval/episodic_return", "losses/td_loss"]
DEFAULT_OUT = Path(__file__).resolve().parent / "fingerprint.json"


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def weights_sha256(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def collect(script: str, workdir: Path, root: Path = ROOT) -> dict:
    """The scripts of this checkout run in this process (as the test does), another checkout's in subprocesses."""
    run = run_main if root == ROOT else functools.partial(run_script, root=root)
    flags, first, total = RUNS[script]
    part1 = run(script, *flags, "--seed", 1, "--total-timesteps", first, "--run-name", "fp", cwd=workdir)
    assert part1.returncode == 0, part1.stderr
    checkpoint = workdir / "runs" / "fp" / "checkpoint.pt"
    part2 = run(script, *flags, "--seed", 1, "--total-timesteps", total, "--resume", checkpoint, cwd=workdir)
    assert part2.returncode == 0, part2.stderr
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return {"counts": {k: state[k] for k in ("global_step", "n_updates", "n_target_syncs")},
            "weights_sha256": {k: weights_sha256(state[k]) for k in ("model", "target_model")},
            "scalars": {tag: read_scalars(workdir / "runs" / "fp", tag) for tag in TAGS}}


def fingerprint(root: Path) -> dict:
    runs = {}
    for script in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            runs[script] = collect(script, Path(tmp), root)
    return runs


def records(path: Path = DEFAULT_OUT) -> list[dict]:
    return json.loads(path.read_text())["records"] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--scripts-from", type=Path, default=ROOT, help="a checkout (e.g. a worktree of the commit "
                        "before a change) whose scripts to record")
    args = parser.parse_args()
    git = lambda *cmd: subprocess.run(["git", *cmd], cwd=args.scripts_from, capture_output=True,  # noqa: E731
                                      text=True).stdout.strip()
    commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    record = {"commit": commit, "dirty": dirty, "machine": machine(), "runs": fingerprint(args.scripts_from)}
    kept = [r for r in records(args.out) if r["machine"] != record["machine"]]
    args.out.write_text(json.dumps({"records": kept + [record]}, indent=1) + "\n")
    print(f"wrote {args.out}: this machine's record (commit {commit[:7]}{', dirty tree' if dirty else ''}) beside "
          f"{len(kept)} other machine(s)")


if __name__ == "__main__":
    main()
