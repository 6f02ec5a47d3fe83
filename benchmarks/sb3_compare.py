"""Stable-Baselines3's DQN and our dqn_atari.py in one command, same config (sps.py's Atari config), same machine:
training-phase SPS of both, the ratio, and replay bytes per transition of both (benchmarks/README.md).

    python -m benchmarks.sb3_compare          # -> benchmarks/results/sb3_compare.json
"""

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


def sb3_env(env_id: str, n_envs: int, seed: int) -> Any:
    """ale-py's gymnasium env through SB3's own Atari wrappers (make_atari_env: AtariWrapper; VecFrameStack 4)."""
    import ale_py
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack
    gym.register_envs(ale_py)
    return VecFrameStack(make_atari_env(env_id, n_envs=n_envs, seed=seed), n_stack=4)


def sb3_run(env_id: str, n_envs: int, seed: int, device: str, settings: dict[str, Any], total_timesteps: int,
            eval_every: int = 0, eval_games: int = 10, eval_epsilon: float = 0.05) -> dict[str, Any]:
    """One SB3 DQN run (call in a fresh process): (env step, wall time) where our scripts would log losses/td_loss
    (every 100 updates after learning starts), SPS over them, replay bytes per transition, and every `eval_every` env
    steps an evaluation of `eval_games` full games (its Monitor's unclipped scores) at epsilon `eval_epsilon`."""
    import stable_baselines3
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    model = DQN("CnnPolicy", sb3_env(env_id, n_envs, seed), device=device, seed=seed, verbose=0, **settings)
    every = LOG_EVERY * settings["train_freq"] * n_envs // settings["gradient_steps"]  # env steps per 100 updates
    rng = np.random.default_rng(seed)
    points: list[tuple[int, float]] = []
    evals: list[list[float]] = []

    def evaluate(step: int) -> float:
        env, scores = sb3_env(env_id, 1, seed + 1_000_000 + step), []
        obs = env.reset()
        while len(scores) < eval_games:
            action, _ = model.predict(obs, deterministic=True)
            if rng.random() < eval_epsilon:
                action = rng.integers(env.action_space.n, size=1)
            obs, _, _, infos = env.step(action)
            if "episode" in infos[0]:  # Monitor sits under AtariWrapper: a full game, unclipped
                scores.append(infos[0]["episode"]["r"])
        env.close()
        return float(np.mean(scores))

    class Callback(BaseCallback):
        def _on_step(self) -> bool:
            t = self.num_timesteps
            if t > settings["learning_starts"] and (t - settings["learning_starts"]) % every == 0:
                points.append((t, time.time()))
            if eval_every and t % eval_every == 0:
                evals.append([t, evaluate(t)])
                print(f"sb3 {env_id} seed {seed}: step {t:,}, eval {evals[-1][1]:.2f}", flush=True)
            return True

    start = time.perf_counter()
    model.learn(total_timesteps=total_timesteps, callback=Callback())
    wall_s = time.perf_counter() - start
    rb = model.replay_buffer
    # SB3 allocates with np.zeros (pages committed on first write); nbytes is the size it will reach when full
    arrays = {k: v for k, v in vars(rb).items() if isinstance(v, np.ndarray)}
    total = sum(v.nbytes for v in arrays.values())
    model.get_env().close()
    return {"version": stable_baselines3.__version__, "device": str(model.device), "torch_threads":
            torch.get_num_threads(), "settings": settings, "wall_s": wall_s, "points": points,
            "training": sps_from_points(points), "evals": evals,
            "replay": {"capacity": rb.buffer_size, "bytes": total, "bytes_per_transition": total / rb.buffer_size,
                       "arrays": {k: [list(v.shape), str(v.dtype), v.nbytes] for k, v in arrays.items()}}}


@dataclass
class Args(AtariBenchConfig):
    script: str = "dqn_atari.py"  # our Atari script to compare
    out: Optional[Path] = None  # the JSON file (default: {out-dir}/sb3_compare.json)


def main(args: Args) -> None:
    if args.script not in ATARI_SCRIPTS:
        raise SystemExit(f"--script must be one of {ATARI_SCRIPTS}")
    if args.num_envs != 1:
        print(f"note: ours runs {args.num_envs} envs, SB3 1: the ratio then compares setups, not implementations")
    require_cuda(args.cuda)
    run_name = run_name_for(args.env_id, args.script, args.seed, timestamp_tag("sb3cmp"))
    ours = measure_script_sps(args.script, args.script_flags(run_name), run_name, args.out_dir / "sb3_compare")
    print("$ SB3 DQN in a fresh process", flush=True)
    config = {k: v for k, v in asdict(args).items() if k in AtariBenchConfig.__dataclass_fields__}
    settings = dict(learning_rate=1e-4, buffer_size=args.capacity(), learning_starts=args.learning_starts,
                    batch_size=args.batch_size, tau=1.0, gamma=0.99, train_freq=args.train_frequency, gradient_steps=1,
                    target_update_interval=1_000, exploration_fraction=0.1, exploration_initial_eps=1.0,
                    exploration_final_eps=0.01, optimize_memory_usage=False)  # dqn_atari.py's defaults
    sb3 = in_fresh_process(sb3_run, args.env_id, 1, args.seed, "cuda" if args.cuda else "cpu", settings,
                           args.total_timesteps)
    our_memory = in_fresh_process(replay_bytes, args.script, args.capacity(), args.num_envs, 1_000_000)
    ratio = ours["training"]["sps"] / sb3["training"]["sps"]
    device = "cuda" if args.cuda else "cpu"
    print(f"\n{args.env_id}, batch {args.batch_size}, train every {args.train_frequency}, {args.total_timesteps:,} "
          f"steps, learning starts {args.learning_starts:,}, buffer {args.capacity():,}, {device}:")
    print(format_table(["implementation", "envs", "device", "training SPS", "replay KB/transition"],
                       [[args.script, args.num_envs, device, ours["training"]["sps"],
                         our_memory["bytes_per_transition"] / KB],
                        [f"SB3 {sb3['version']} DQN", 1, sb3["device"], sb3["training"]["sps"],
                         sb3["replay"]["bytes_per_transition"] / KB]], digits=2))
    print(f"ours / SB3: {ratio:.2f}x SPS, "
          f"{sb3['replay']['bytes_per_transition'] / our_memory['bytes_per_transition']:.1f}x less replay memory")
    write_json(args.out or args.out_dir / "sb3_compare.json",
               {"config": {**config, "buffer_size": args.capacity(), "script": args.script},
                "ours": {**ours, "replay": our_memory}, "sb3": sb3, "sps_ratio_ours_over_sb3": ratio})


if __name__ == "__main__":
    main(tyro.cli(Args))
