"""Prioritized replay cost per batch at 1M capacity, with dqn_atari_dueling_per.py's own SumTree and ReplayBuffer.

Two measurements per device and batch size, each the mean over `iters` batches after a warm-up:
- tree: SumTree.sample(B) (stratified descent) + SumTree.set(B leaves) (priority update), on 2^20 leaves;
- buffer: ReplayBuffer.sample(B, beta) (descent, importance weights, rebuilding the B obs/next-obs stacks from frames)
  + ReplayBuffer.update_priorities(B), on a full 1M-transition buffer of 8 envs (about 7.1 GB of RAM, or GPU memory
  with --cuda);
- add: ReplayBuffer.add of one vector step (8 envs' frames, the new slots' priorities, the 4 oldest slots zeroed) on
  that full buffer.
The full buffer is made "full" by setting its counters and all priorities directly (adding 1M frames one by one would
take minutes and changes nothing the timing depends on): every slot is a sampleable transition with a random priority.

    python -m benchmarks.per_cost                 # CPU  -> benchmarks/results/per_cost.json
    python -m benchmarks.per_cost --cuda          # GPU  -> benchmarks/results/per_cost_cuda.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import tyro

from benchmarks.common import RESULTS_DIR, format_table, load_script, require_cuda, write_json

PER_SCRIPT = "dqn_atari_dueling_per.py"
NUM_ENVS = 8  # the scripts' default


def mean_seconds(step: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # sync point: the clock must wait for queued GPU work
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def measure(capacity: int, batch_sizes: list[int], device: torch.device, warmup: int, iters: int,
            full_buffer: bool) -> list[dict[str, Any]]:
    mod = load_script(PER_SCRIPT)
    torch.manual_seed(0)
    rows = []
    tree = mod.SumTree(capacity, device)
    tree.set(torch.arange(capacity, device=device), torch.rand(capacity, dtype=torch.float64, device=device) + 1e-3)
    for b in batch_sizes:
        new = torch.rand(b, dtype=torch.float64, device=device) + 1e-3
        seconds = mean_seconds(lambda: tree.set(tree.sample(b), new), device, warmup, iters)
        rows.append({"what": "tree", "capacity": capacity, "leaves": tree.size, "batch_size": b,
                     "device": str(device), "seconds": seconds})
    del tree
    if full_buffer:
        rb = mod.ReplayBuffer(capacity, NUM_ENVS, device, device)
        rb.pos, rb.count = 0, rb.per_env  # full: every slot old enough to hold its whole stack
        slots = torch.arange(NUM_ENVS * rb.per_env, device=device)
        rb.tree.set(slots, torch.rand(len(slots), dtype=torch.float64, device=device) + 1e-3)
        oldest = torch.arange(NUM_ENVS, device=device)[:, None] * rb.per_env + torch.arange(4, device=device)
        oldest = oldest.flatten()
        rb.tree.set(oldest, torch.zeros(len(oldest), dtype=torch.float64, device=device))  # not sampleable
        for b in batch_sizes:
            td_errors = torch.randn(b, device=device)

            def step() -> None:
                batch = rb.sample(b, 0.4)
                rb.update_priorities(batch.indices, td_errors)

            rows.append({"what": "buffer", "capacity": capacity, "leaves": rb.tree.size, "batch_size": b,
                         "device": str(device), "seconds": mean_seconds(step, device, warmup, iters)})
        frames = np.zeros((NUM_ENVS, 84, 84), dtype=np.uint8)
        zeros, firsts = np.zeros(NUM_ENVS, dtype=np.float32), np.zeros(NUM_ENVS, dtype=bool)
        rows.append({"what": "add", "capacity": capacity, "leaves": rb.tree.size, "batch_size": NUM_ENVS,
                     "device": str(device), "seconds": mean_seconds(lambda: rb.add(frames, zeros, zeros, zeros, firsts),
                                                                    device, warmup, iters)})
    return rows


@dataclass
class Args:
    capacity: int = 1_000_000
    """transitions (leaves of the sum tree)"""
    batch_sizes: tuple[int, ...] = (32, 512)
    """batch sizes to time"""
    cuda: bool = False
    """time on the GPU (refused when there is none)"""
    full_buffer: bool = True
    """also time ReplayBuffer.sample + update_priorities, and add, on a full buffer of `capacity` transitions (7.1 GB
    at 1M)"""
    warmup: int = 20
    """untimed batches first"""
    iters: int = 200
    """timed batches"""
    out: Optional[Path] = None
    """the JSON file (default: results/per_cost.json, or per_cost_cuda.json with --cuda)"""


def main(args: Args) -> None:
    require_cuda(args.cuda)
    device = torch.device("cuda" if args.cuda else "cpu")
    rows = measure(args.capacity, list(args.batch_sizes), device, args.warmup, args.iters, args.full_buffer)
    threads = torch.get_num_threads()
    print(f"PER cost per batch, {PER_SCRIPT}, capacity {args.capacity:,} ({device}, {threads} threads):")
    print(format_table(["what", "leaves", "batch", "ms per batch (sample + priority update; add: one vector step)"],
                       [[r["what"], r["leaves"], r["batch_size"], 1e3 * r["seconds"]] for r in rows], digits=3))
    out = args.out or RESULTS_DIR / ("per_cost_cuda.json" if args.cuda else "per_cost.json")
    write_json(out, {"config": {"capacity": args.capacity, "batch_sizes": list(args.batch_sizes),
                                "warmup": args.warmup, "iters": args.iters}, "rows": rows})


if __name__ == "__main__":
    main(tyro.cli(Args))
