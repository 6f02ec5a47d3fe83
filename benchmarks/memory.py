"""Replay memory per Atari transition of both Atari scripts, from a really allocated ReplayBuffer, next to CleanRL's and
SB3's (shared/NOTES.md); plus the scripts' own ReplayBuffer.bytes_needed() at 1M.

    python -m benchmarks.memory               # -> benchmarks/results/memory.json
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import tyro

from benchmarks.common import (ATARI_SCRIPTS, KB, REFERENCES, RESULTS_DIR, format_table, in_fresh_process,
                               load_script, references_json, write_json)


def tensor_bytes(obj: Any, _seen: Optional[set[int]] = None) -> int:
    """Bytes of all distinct tensors reachable from `obj` through attributes, lists, tuples and dicts (a tensor met
    twice, or a view of one counted, is counted once per storage)."""
    seen = set() if _seen is None else _seen
    key = obj.untyped_storage().data_ptr() if isinstance(obj, torch.Tensor) else id(obj)
    if key in seen:
        return 0
    seen.add(key)
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def replay_bytes(script: str, capacity: int, num_envs: int, full_capacity: int) -> dict[str, Any]:
    """Allocates the script's ReplayBuffer with `capacity` on the CPU and measures it; bytes_needed at full size."""
    mod = load_script(script)
    allocated = tensor_bytes(mod.ReplayBuffer(capacity, num_envs, torch.device("cpu"), torch.device("cpu")))
    needed_full = mod.ReplayBuffer.bytes_needed(full_capacity, num_envs)
    return {"script": script, "capacity": capacity, "num_envs": num_envs, "allocated_bytes": allocated,
            "bytes_per_transition": allocated / capacity,
            "bytes_needed_at_capacity": mod.ReplayBuffer.bytes_needed(capacity, num_envs),
            "full_capacity": full_capacity, "bytes_needed_full": needed_full,
            "bytes_per_transition_full": needed_full / full_capacity}


@dataclass
class Args:
    capacity: int = 100_000  # transitions of the buffer really allocated (about 0.7 GB of RAM)
    num_envs: int = 1  # envs the buffer is split over (its per-env capacity is rounded up)
    full_capacity: int = 1_000_000  # the capacity bytes_needed() is also evaluated at
    out: Path = RESULTS_DIR / "memory.json"  # the JSON file


def main(args: Args) -> None:
    # each buffer in its own process, so that one freed buffer cannot make the next look cheaper or dearer
    ours = [in_fresh_process(replay_bytes, s, args.capacity, args.num_envs, args.full_capacity) for s in ATARI_SCRIPTS]
    rows: list[list[Any]] = [[r["script"], r["bytes_per_transition"] / KB, r["bytes_needed_full"] / 1e9,
                              "allocated here"] for r in ours]
    notes = []
    for key, name in [("cleanrl_replay_kb", "CleanRL dqn_atari.py"), ("sb3_replay_kb", "SB3 DQN (default)")]:
        ref = REFERENCES[key]
        rows.append([name, ref.value, ref.value * KB * args.full_capacity / 1e9, "reference*"])
        notes.append(f"{name}: {ref.note}")
    print(f"Replay memory per Atari transition (KB = 1000 bytes; our buffers allocated at {args.capacity:,} "
          f"transitions, {args.num_envs} env(s); GB at {args.full_capacity:,} from bytes_needed for ours):")
    print(format_table(["replay", "KB/transition", f"GB at {args.full_capacity:,}", "source"], rows, digits=2))
    print(f"* {REFERENCES['cleanrl_replay_kb'].source}; " + "; ".join(notes))
    write_json(args.out, {"config": {k: v for k, v in asdict(args).items() if k != "out"}, "ours": ours,
                          "references": references_json(["cleanrl_replay_kb", "sb3_replay_kb", "dedup_replay_kb"])})


if __name__ == "__main__":
    main(tyro.cli(Args))
