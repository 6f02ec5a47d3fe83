"""Short-horizon Atari learning evidence on a CPU: both Atari scripts on one fixed 200k-step protocol, over a grid of
(script, env id, seed), next to a random policy and one seed of Stable-Baselines3's DQN.

    python -m benchmarks.atari_short                  # run what is missing, one run at a time, then report
    python -m benchmarks.atari_short --dry-run        # what would run
    python -m benchmarks.atari_short --record-only    # train nothing: record cells the grids finished, the random
                                                      # baseline; rewrite the table and plots

Each env id's cells run through benchmarks/grid.py (grid folder results/grids/atari_short_{game}/), so a cell the grid
finished is never redone and an interrupted one resumes from its checkpoint (every 50k steps, replay included).
Each finished cell goes into results/atari_short.json at once (evaluation curve, SPS, wall time, commit, machine):
that file, not runs/ (which a fresh checkout does not have), is the record, and a cell in it is never rerun.
Outputs: results/atari_short.json (protocol, random, runs, meta), results/atari_short_{env}.png, results/atari_short.md.

Random policy: dqn_atari.py's own evaluate() (full games, no-op starts, the FIRE serve) with epsilon 1, 30 games.
SB3: its DQN through its own Atari wrappers (make_atari_env: AtariWrapper, VecFrameStack 4) on 8 envs with the same
protocol (an update every 4 env steps = train_freq 1 vector step x 2 gradient steps; target sync every 1000 env steps,
which SB3 divides by n_envs itself), evaluated like ours every 50k env steps: 10 full games (its Monitor's unclipped
game scores), epsilon 0.05, its own no-op starts.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tyro

from benchmarks.common import (RESULTS_DIR, describe_machine, format_table, in_fresh_process, load_script,
                               read_scalars, sps_from_points, write_json)
from benchmarks.grid import (GRID_ROOT, Action, Cell, GridPaths, GridSpec, Runner, expand_grid, load_or_create_spec,
                             read_state, run_cells)
from benchmarks.plot import EVAL_TAG, game_of, save_figure, style_axes

PROTOCOL = ("--total-timesteps", "200000", "--learning-starts", "20000", "--buffer-size", "100000",
            "--exploration-fraction", "0.5", "--target-network-frequency", "1000", "--train-frequency", "4",
            "--batch-size", "32", "--learning-rate", "1e-4", "--eval-frequency", "50000", "--eval-episodes", "10",
            "--eval-epsilon", "0.05", "--no-cuda", "--checkpoint-frequency", "50000", "--checkpoint-buffer")
PLAN: dict[str, dict[str, tuple[int, ...]]] = {  # env id -> script -> seeds
    "BreakoutNoFrameskip-v4": {"dqn_atari.py": (1, 2, 3), "dqn_atari_dueling_per.py": (1, 2)},
    # the second game, chosen by a pilot (benchmarks/RESULTS.md section 10): dqn_atari.py seed 1 at 50k steps
    "SeaquestNoFrameskip-v4": {"dqn_atari.py": (1, 2), "dqn_atari_dueling_per.py": (1, 2)},
}
SB3_CELLS = (("BreakoutNoFrameskip-v4", 1),)
BARS = {"BreakoutNoFrameskip-v4": 5.0}  # every seed must end at least this many times the random policy's return
RANDOM = {"epsilon": 1.0, "episodes": 30, "seed": 12345}
SB3_SETTINGS = dict(learning_rate=1e-4, buffer_size=100_000, learning_starts=20_000, batch_size=32, tau=1.0, gamma=0.99,
                    train_freq=1, gradient_steps=2, target_update_interval=1_000, exploration_fraction=0.5,
                    exploration_initial_eps=1.0, exploration_final_eps=0.01, optimize_memory_usage=False)
SB3_ENVS, SB3_STEPS, EVAL_EVERY, EVAL_GAMES, EVAL_EPSILON = 8, 200_000, 50_000, 10, 0.05
GAP_S = 300.0  # a pause longer than this between two logged updates is an interruption, not training time


def grid_spec(env_id: str) -> GridSpec:
    seeds = sorted({seed for seeds in PLAN[env_id].values() for seed in seeds})
    return GridSpec(f"atari_short_{game_of(env_id).lower()}", tuple(PLAN[env_id]), (env_id,), tuple(seeds), PROTOCOL)


def wanted_cells(env_id: str) -> list[Cell]:
    return [c for c in expand_grid(grid_spec(env_id)) if c.seed in PLAN[env_id][c.script]]


def random_baseline(env_id: str) -> dict[str, Any]:
    """The scripts' evaluation with epsilon 1 (call in a fresh process)."""
    import torch

    script = load_script("dqn_atari.py")
    game, sticky = script.atari_game(env_id)
    frames = script.Args().max_episode_frames
    envs = script.make_env(game, 1, sticky, frames, train=False)
    n_actions = int(envs.single_action_space.n)
    envs.close()
    returns, lengths = script.evaluate(script.QNetwork(n_actions), game, sticky, frames, RANDOM["episodes"],
                                       RANDOM["epsilon"], RANDOM["seed"], torch.device("cpu"))
    return {"mean": float(returns.mean()), "std": float(returns.std()), "episodes": len(returns),
            "returns": returns.tolist(), "mean_length_frames": float(lengths.mean())}


def steady_sps(points: list[tuple[int, float]]) -> float:
    """Env steps per second over consecutive (step, wall time) points, pauses longer than GAP_S (a resumption) left
    out; periodic evaluations stay in, as in common.training_sps."""
    pairs = [(s1 - s0, t1 - t0) for (s0, t0), (s1, t1) in zip(points, points[1:]) if 0 < t1 - t0 <= GAP_S]
    return sum(p[0] for p in pairs) / sum(p[1] for p in pairs)


def cell_record(paths: GridPaths, cell: Cell) -> dict[str, Any]:
    run_dir = paths.run_dir(cell)
    scalars = read_scalars(run_dir, [EVAL_TAG, "losses/td_loss"])
    evals, updates = scalars[EVAL_TAG], scalars["losses/td_loss"]
    state = read_state(paths.state(cell))
    return {"script": cell.script, "env_id": cell.env_id, "seed": cell.seed, "steps": evals[-1].step,
            "eval": [[p.step, p.value] for p in evals], "final_eval_return": evals[-1].value,
            "sps": steady_sps([(p.step, p.wall_time) for p in updates]),
            "wall_s": state.get("wall_s", state["ended"] - state["started"]),
            "commit": (state.get("git") or {}).get("commit"), "machine": describe_machine(state["machine"]),
            "run_name": cell.run_name}


def sb3_run(env_id: str, seed: int) -> dict[str, Any]:
    """One SB3 DQN run with evaluations (call in a fresh process)."""
    import ale_py
    import gymnasium as gym
    import stable_baselines3
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    gym.register_envs(ale_py)
    rng = np.random.default_rng(seed)

    def evaluate(model: DQN, step: int) -> float:
        env = VecFrameStack(make_atari_env(env_id, n_envs=1, seed=seed + 1_000_000 + step), n_stack=4)
        obs, scores = env.reset(), []
        while len(scores) < EVAL_GAMES:
            action, _ = model.predict(obs, deterministic=True)
            if rng.random() < EVAL_EPSILON:
                action = rng.integers(env.action_space.n, size=1)
            obs, _, _, infos = env.step(action)
            if "episode" in infos[0]:  # Monitor sits under AtariWrapper: a full game, unclipped
                scores.append(infos[0]["episode"]["r"])
        env.close()
        return float(np.mean(scores))

    evals: list[list[float]] = []
    points: list[tuple[int, float]] = []

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps > SB3_SETTINGS["learning_starts"] and self.num_timesteps % 400 == 0:
                points.append((self.num_timesteps, time.time()))
            if self.num_timesteps % EVAL_EVERY == 0:
                evals.append([self.num_timesteps, evaluate(self.model, self.num_timesteps)])
                print(f"sb3 {env_id} seed {seed}: step {self.num_timesteps:,}, eval {evals[-1][1]:.2f}", flush=True)
            return True

    env = VecFrameStack(make_atari_env(env_id, n_envs=SB3_ENVS, seed=seed), n_stack=4)
    model = DQN("CnnPolicy", env, device="cpu", seed=seed, verbose=0, **SB3_SETTINGS)
    start = time.perf_counter()
    model.learn(total_timesteps=SB3_STEPS, callback=Evaluate())
    return {"script": f"stable-baselines3 {stable_baselines3.__version__} DQN", "env_id": env_id, "seed": seed,
            "steps": evals[-1][0], "eval": evals, "final_eval_return": evals[-1][1],
            "sps": sps_from_points(points)["sps"], "wall_s": time.perf_counter() - start}


def key(run: dict[str, Any]) -> tuple[str, str, int]:
    return run["script"], run["env_id"], run["seed"]


def table(data: dict[str, Any]) -> str:
    rows = []
    for env_id in sorted({r["env_id"] for r in data["runs"]}):
        random = data["random"].get(env_id, {}).get("mean")
        for script in sorted({r["script"] for r in data["runs"] if r["env_id"] == env_id}):
            runs = sorted((r for r in data["runs"] if r["env_id"] == env_id and r["script"] == script),
                          key=lambda r: r["seed"])
            finals = np.array([r["final_eval_return"] for r in runs])
            ratio = (lambda x: f"{x / random:.1f}x" if random else "-")
            rows.append([env_id, script, " ".join(str(r["seed"]) for r in runs),
                         f"{finals.mean():.1f} +- {finals.std():.1f}",
                         ", ".join(f"{f:.1f}" for f in finals), "-" if random is None else f"{random:.2f}",
                         ratio(finals.mean()), ratio(finals.min()),
                         f"{BARS[env_id]:g}x" if env_id in BARS else "above random"])
    return format_table(["env", "implementation", "seeds", "final eval return (mean +- std)", "per seed", "random",
                         "mean / random", "worst seed / random", "bar"], rows)


def plot(data: dict[str, Any], env_id: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    runs = [r for r in data["runs"] if r["env_id"] == env_id]
    for i, script in enumerate(sorted({r["script"] for r in runs})):
        mine = [np.array(r["eval"]) for r in runs if r["script"] == script]
        for curve in mine:
            ax.plot(curve[:, 0], curve[:, 1], color=f"C{i}", linewidth=0.7, alpha=0.5)
        steps = sorted(set.intersection(*(set(c[:, 0]) for c in mine)))
        mean = [np.mean([c[c[:, 0] == s, 1][0] for c in mine]) for s in steps]
        ax.plot(steps, mean, color=f"C{i}", linewidth=2.2, marker="o", label=f"{script} ({len(mine)} seeds)")
    if env_id in data["random"]:
        ax.axhline(data["random"][env_id]["mean"], color="gray", linestyle="--", linewidth=1, label="random policy")
    ax.set_ylabel("evaluation return (10 games, eps 0.05)", fontsize=8)
    style_axes(ax, f"{env_id}: short protocol (200k steps), each seed thin, mean bold")
    return save_figure(fig, RESULTS_DIR / f"atari_short_{game_of(env_id)}.png")


@dataclass
class Args:
    dry_run: bool = False
    """print what would run, run nothing"""
    record_only: bool = False
    """train nothing: record the cells the grids have finished (and the random baseline); rewrite table and plots"""
    sb3: bool = True
    """also run Stable-Baselines3's DQN cell(s)"""
    only: Optional[str] = None
    """run only this implementation's missing cells: a script (dqn_atari.py, dqn_atari_dueling_per.py) or sb3"""
    max_attempts: int = 3
    """leave a grid cell alone after it failed this many times"""
    out: Path = RESULTS_DIR / "atari_short.json"
    """the JSON record"""


def main(args: Args) -> int:
    protocol = {"flags": list(PROTOCOL), "plan": PLAN, "random": RANDOM, "sb3": {**SB3_SETTINGS, "n_envs": SB3_ENVS,
                "total_timesteps": SB3_STEPS, "eval_every": EVAL_EVERY, "eval_games": EVAL_GAMES,
                "eval_epsilon": EVAL_EPSILON, "cells": [list(c) for c in SB3_CELLS]}}
    data = {"protocol": protocol, "random": {}, "runs": []}
    if args.out.exists():
        data = {k: v for k, v in json.loads(args.out.read_text()).items() if k != "meta"}
        if data["protocol"]["flags"] != list(PROTOCOL):
            print(f"error: {args.out} was made with other protocol flags; move it aside to start a new record",
                  file=sys.stderr)
            return 2
        data["protocol"] = protocol
    done = {key(r) for r in data["runs"]}
    todo = [c for env_id in PLAN for c in wanted_cells(env_id) if (c.script, c.env_id, c.seed) not in done
            and args.only in (None, c.script)]
    sb3_todo = [c for c in SB3_CELLS if args.sb3 and args.only in (None, "sb3")
                and not any(k[1:] == c and k[0].startswith("stable") for k in done)]
    if args.dry_run:
        print("to run: " + (", ".join([c.run_name for c in todo] + [f"SB3 {e} seed {s}" for e, s in sb3_todo]) or
                            "nothing"))
        return 0
    save = lambda: write_json(args.out, data)  # noqa: E731
    for env_id in PLAN:
        if env_id not in data["random"]:
            data["random"][env_id] = in_fresh_process(random_baseline, env_id)
            save()
    runners: dict[str, Runner] = {}
    for cell in todo:
        spec = grid_spec(cell.env_id)
        paths = GridPaths(GRID_ROOT / spec.name)
        if args.record_only:
            if paths.done(cell).exists():
                data["runs"].append(cell_record(paths, cell))
                save()
            continue
        if spec.name not in runners:
            runners[spec.name] = Runner(load_or_create_spec(paths, spec), paths, sys.executable, args.max_attempts)
        outcome = run_cells(runners[spec.name], [cell], len(expand_grid(spec)), 1)[cell.run_name]
        if outcome in ("done", Action.SKIP_DONE.value):
            data["runs"].append(cell_record(paths, cell))
            save()
        if runners[spec.name].stop.is_set():
            return 130
    for env_id, seed in [] if args.record_only else sb3_todo:
        data["runs"].append(in_fresh_process(sb3_run, env_id, seed))
        save()
    if not data["runs"]:
        return 0
    for env_id in sorted({r["env_id"] for r in data["runs"]}):
        print(f"wrote {plot(data, env_id)}")
    text = table(data)
    (RESULTS_DIR / "atari_short.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
