"""Prioritized replay cost per batch at 1M capacity with dqn_atari_dueling_per.py's own SumTree and ReplayBuffer: the
tree alone (sample + priority update), the full buffer (sample with weights and stacks + priority update), and add of
one vector step, each the mean over `iters` batches after a warm-up (benchmarks/README.md).

    python -m benchmarks.per_cost                 # CPU  -> benchmarks/results/per_cost.json
    python -m benchmarks.per_cost --cuda          # GPU  -> benchmarks/results/per_cost_cuda.json
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import tyro

from benchmarks.common import RESULTS_DIR, format_table, load_script, require_cuda, timed_blocks, write_json

PER_SCRIPT = "dqn_atari_dueling_per.py"
NUM_ENVS = 8  # the scripts' default


def measure(capacity: int, batch_sizes: list[int], device: torch.device, warmup: int, iters: int,
            full_buffer: bool) -> list[dict[str, Any]]:
    mod = load_script(PER_SCRIPT)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []

    def priorities(n: int) -> torch.Tensor:
        return torch.rand(n, dtype=torch.float64, device=device) + 1e-3

    def time_it(what: str, leaves: int, batch_size: int, step: Callable[[], Any]) -> None:
        rows.append({"what": what, "capacity": capacity, "leaves": leaves, "batch_size": batch_size,
                     "device": str(device), "seconds": timed_blocks(step, device, warmup, iters)[0]})

    tree = mod.SumTree(capacity, device)
    tree.set(torch.arange(capacity, device=device), priorities(capacity))
    for b in batch_sizes:
        new = priorities(b)
        time_it("tree", tree.size, b, lambda: tree.set(tree.sample(b), new))
    del tree
    if full_buffer:
        rb = mod.ReplayBuffer(capacity, NUM_ENVS, device, device)
        rb.pos, rb.count = 0, rb.per_env  # full: every slot old enough to hold its whole stack
        rb.tree.set(torch.arange(NUM_ENVS * rb.per_env, device=device), priorities(NUM_ENVS * rb.per_env))
        oldest = (torch.arange(NUM_ENVS, device=device)[:, None] * rb.per_env + torch.arange(4, device=device)).ravel()
        rb.tree.set(oldest, torch.zeros(len(oldest), dtype=torch.float64, device=device))  # not sampleable
        for b in batch_sizes:
            td_errors = torch.randn(b, device=device)
            time_it("buffer", rb.tree.size, b, lambda: rb.update_priorities(rb.sample(b, 0.4).indices, td_errors))
        frames = np.zeros((NUM_ENVS, 84, 84), dtype=np.uint8)
        zeros, firsts = np.zeros(NUM_ENVS, dtype=np.float32), np.zeros(NUM_ENVS, dtype=bool)
        time_it("add", rb.tree.size, NUM_ENVS, lambda: rb.add(frames, zeros, zeros, zeros, firsts))
    return rows


@dataclass
class Args:
    capacity: int = 1_000_000  # transitions (leaves of the sum tree)
    batch_sizes: tuple[int, ...] = (32, 512)  # batch sizes to time
    cuda: bool = False  # time on the GPU (refused when there is none)
    full_buffer: bool = True  # also time a full ReplayBuffer of `capacity` transitions (its RAM or GPU memory)
    warmup: int = 20  # untimed batches first
    iters: int = 200  # timed batches
    out: Optional[Path] = None  # the JSON file (default: results/per_cost.json, or per_cost_cuda.json with --cuda)


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
