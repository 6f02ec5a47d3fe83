"""Stable-Baselines3's DQN and our dqn_atari.py in one run, same config, same machine: training-phase SPS of both, the
ratio, and replay bytes per transition of both.

Config (sps.py's Atari config): BreakoutNoFrameskip-v4, batch 32, an update every 4 env steps, 12k steps, learning
from step 2k, a buffer that holds the whole run, 1 env for SB3 (ale-py's gymnasium env, SB3's AtariWrapper through
make_atari_env, VecFrameStack 4, as rl-zoo's Atari setup) and the same learning rate, target period, gamma and
exploration schedule as dqn_atari.py's defaults; SB3 keeps its own default gradient clipping (10).
Both SPS numbers are taken the same way: (step_last - step_first) / (wall_last - wall_first) over the env steps at
which every 100th update happens after learning starts (our losses/td_loss events; a callback for SB3).
Each side runs in its own process, one after the other.

    pip install -r benchmarks/requirements.txt
    python -m benchmarks.sb3_compare          # -> benchmarks/results/sb3_compare.json
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tyro

from benchmarks.common import (ATARI_SCRIPTS, KB, AtariBenchConfig, format_table, in_fresh_process, measure_script_sps,
                               require_cuda, run_name_for, sps_from_points, timestamp_tag, write_json)
from benchmarks.memory import replay_bytes

LOG_EVERY = 100  # the scripts log losses/td_loss every 100 updates; SB3 is timed at the same env steps


def sb3_run(config: dict[str, Any]) -> dict[str, Any]:
    """One SB3 DQN run (call in a fresh process): its timed points, SPS and replay bytes per transition."""
    import ale_py
    import gymnasium as gym
    import stable_baselines3
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    gym.register_envs(ale_py)
    c = AtariBenchConfig(**config)
    env = VecFrameStack(make_atari_env(c.env_id, n_envs=1, seed=c.seed), n_stack=4)
    settings = dict(learning_rate=1e-4, buffer_size=c.capacity(), learning_starts=c.learning_starts,
                    batch_size=c.batch_size, tau=1.0, gamma=0.99, train_freq=c.train_frequency, gradient_steps=1,
                    target_update_interval=1_000, exploration_fraction=0.1, exploration_initial_eps=1.0,
                    exploration_final_eps=0.01, optimize_memory_usage=False)
    model = DQN("CnnPolicy", env, device="cuda" if c.cuda else "cpu", seed=c.seed, verbose=0, **settings)
    points: list[tuple[int, float]] = []
    every = LOG_EVERY * c.train_frequency

    class Timer(BaseCallback):
        """Records (env step, wall time) where our scripts would log losses/td_loss: every 100 updates."""

        def _on_step(self) -> bool:
            t = self.num_timesteps
            if t > c.learning_starts and (t - c.learning_starts) % every == 0:
                points.append((t, time.time()))
            return True

    start = time.perf_counter()
    model.learn(total_timesteps=c.total_timesteps, callback=Timer())
    wall_s = time.perf_counter() - start
    rb = model.replay_buffer
    # SB3 allocates with np.zeros (pages committed on first write); nbytes is the size it will reach when full
    arrays = {k: v for k, v in vars(rb).items() if isinstance(v, np.ndarray)}
    total = sum(v.nbytes for v in arrays.values())
    env.close()
    return {"version": stable_baselines3.__version__, "device": str(model.device), "torch_threads":
            torch.get_num_threads(), "settings": settings, "wall_s": wall_s, "points": points,
            "training": sps_from_points(points),
            "replay": {"capacity": rb.buffer_size, "bytes": total, "bytes_per_transition": total / rb.buffer_size,
                       "arrays": {k: [list(v.shape), str(v.dtype), v.nbytes] for k, v in arrays.items()}}}


@dataclass
class Args(AtariBenchConfig):
    script: str = "dqn_atari.py"
    """our Atari script to compare"""
    out: Optional[Path] = None
    """the JSON file (default: {out-dir}/sb3_compare.json)"""


def main(args: Args) -> None:
    if args.script not in ATARI_SCRIPTS:
        raise SystemExit(f"--script must be one of {ATARI_SCRIPTS}")
    if args.num_envs != 1:
        print(f"note: ours runs {args.num_envs} envs, SB3 1: the ratio then compares setups, not implementations")
    require_cuda(args.cuda)
    tag = timestamp_tag("sb3cmp")
    run_name = run_name_for(args.env_id, args.script, args.seed, tag)
    ours = measure_script_sps(args.script, args.script_flags(run_name), run_name, args.out_dir / "sb3_compare")
    print("$ SB3 DQN in a fresh process", flush=True)
    config = {k: v for k, v in asdict(args).items() if k in AtariBenchConfig.__dataclass_fields__}
    sb3 = in_fresh_process(sb3_run, config)
    our_memory = in_fresh_process(replay_bytes, args.script, args.capacity(), args.num_envs, 1_000_000)

    ratio = ours.training["sps"] / sb3["training"]["sps"]
    print(f"\n{args.env_id}, batch {args.batch_size}, train every {args.train_frequency}, {args.total_timesteps:,} "
          f"steps, learning starts {args.learning_starts:,}, buffer {args.capacity():,}, "
          f"{'cuda' if args.cuda else 'cpu'}:")
    print(format_table(
        ["implementation", "envs", "device", "training SPS", "replay KB/transition"],
        [[args.script, args.num_envs, "cuda" if args.cuda else "cpu", ours.training["sps"],
          our_memory["bytes_per_transition"] / KB],
         [f"SB3 {sb3['version']} DQN", 1, sb3["device"], sb3["training"]["sps"],
          sb3["replay"]["bytes_per_transition"] / KB]], digits=2))
    print(f"ours / SB3: {ratio:.2f}x SPS, "
          f"{sb3['replay']['bytes_per_transition'] / our_memory['bytes_per_transition']:.1f}x less replay memory")
    write_json(args.out or args.out_dir / "sb3_compare.json",
               {"config": {**config, "buffer_size": args.capacity(), "script": args.script},
                "ours": {**asdict(ours), "replay": our_memory}, "sb3": sb3, "sps_ratio_ours_over_sb3": ratio})


if __name__ == "__main__":
    main(tyro.cli(Args))
