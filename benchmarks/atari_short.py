"""Short-horizon Atari learning evidence on a CPU: both Atari scripts on one 200k-step protocol through grid.py, next to
a random policy and SB3's DQN; results/atari_short.json is the record (protocol and commands: benchmarks/README.md)."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tyro

from benchmarks.common import (RESULTS_DIR, describe_machine, format_table, in_fresh_process, iqm_ci, load_script,
                               read_json, read_scalars, write_json)
from benchmarks.grid import (GRID_ROOT, SKIP_DONE, Cell, GridPaths, GridSpec, Runner, expand_grid, load_or_create_spec,
                             run_cells)
from benchmarks.plot import EVAL_TAG, game_of, save_figure, style_axes
from benchmarks.measure import sb3_run

PROTOCOL = ("--total-timesteps", "200000", "--learning-starts", "20000", "--buffer-size", "100000",
            "--exploration-fraction", "0.5", "--target-network-frequency", "1000", "--train-frequency", "4",
            "--batch-size", "32", "--learning-rate", "1e-4", "--eval-frequency", "50000", "--eval-episodes", "10",
            "--eval-epsilon", "0.05", "--no-cuda", "--checkpoint-frequency", "50000", "--checkpoint-buffer")
PLAN: dict[str, dict[str, tuple[int, ...]]] = {  # env id -> script -> seeds
    "BreakoutNoFrameskip-v4": {"dqn_atari.py": (1, 2, 3), "dqn_atari_dueling_per.py": (1, 2)},
    # the second game, chosen by a pilot (benchmarks/RESULTS.md section 10): dqn_atari.py seed 1 at 50k steps
    "SeaquestNoFrameskip-v4": {"dqn_atari.py": (1, 2), "dqn_atari_dueling_per.py": (1, 2)},
}
# the side-by-side cell (Breakout seed 1), Seaquest seeds 1 and 2 (a peer on the game where dqn_atari.py seed 2
# ended below random), and Breakout seeds 2 and 3, so that the take-off comparison of issue #22 has 3 seeds a side
# (benchmarks/RESULTS.md section 10)
SB3_CELLS = (("BreakoutNoFrameskip-v4", 1), ("SeaquestNoFrameskip-v4", 1), ("SeaquestNoFrameskip-v4", 2),
             ("BreakoutNoFrameskip-v4", 2), ("BreakoutNoFrameskip-v4", 3))
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
    """A finished cell as atari_short.json keeps it: its evaluation curve, training games (env step, score) and SPS
    from its events, its time over all attempts, commit and machine from the grid's state/{run_name}.json."""
    scalars = read_scalars(paths.run_dir(cell), [EVAL_TAG, "losses/td_loss", "charts/episodic_return"])
    evals, updates = scalars[EVAL_TAG], scalars["losses/td_loss"]
    state = read_json(paths.state(cell))
    return {"script": cell.script, "env_id": cell.env_id, "seed": cell.seed, "steps": evals[-1].step,
            "eval": [[p.step, p.value] for p in evals], "final_eval_return": evals[-1].value,
            "sps": steady_sps([(p.step, p.wall_time) for p in updates]),
            "wall_s": state.get("wall_s", state["ended"] - state["started"]),
            "commit": (state.get("git") or {}).get("commit"), "machine": describe_machine(state["machine"]),
            "run_name": cell.run_name, "games": [[p.step, p.value] for p in scalars["charts/episodic_return"]]}


def sb3_record(env_id: str, seed: int) -> dict[str, Any]:
    """One SB3 DQN cell, as atari_short.json keeps it."""
    r = in_fresh_process(sb3_run, env_id, SB3_ENVS, seed, "cpu", SB3_SETTINGS, SB3_STEPS, EVAL_EVERY, EVAL_GAMES,
                         EVAL_EPSILON)
    return {"script": f"stable-baselines3 {r['version']} DQN", "env_id": env_id, "seed": seed,
            "steps": r["evals"][-1][0], "eval": r["evals"], "final_eval_return": r["evals"][-1][1],
            "sps": r["training"]["sps"], "wall_s": r["wall_s"], "games": r["games"]}


def table(data: dict[str, Any]) -> str:
    rows = []
    for env_id in sorted({r["env_id"] for r in data["runs"]}):
        random = data["random"].get(env_id, {}).get("mean")
        ratio = (lambda x: f"{x / random:.1f}x" if random else "-")  # noqa: E731
        for script in sorted({r["script"] for r in data["runs"] if r["env_id"] == env_id}):
            runs = sorted((r for r in data["runs"] if r["env_id"] == env_id and r["script"] == script),
                          key=lambda r: r["seed"])
            finals = np.array([r["final_eval_return"] for r in runs])
            ci = iqm_ci(finals)
            rows.append([env_id, script, " ".join(str(r["seed"]) for r in runs),
                         f"{finals.mean():.1f} +- {finals.std():.1f}", f"{ci['iqm']:.1f}",
                         f"[{ci['ci_low']:.1f}, {ci['ci_high']:.1f}]", ", ".join(f"{f:.1f}" for f in finals),
                         "-" if random is None else f"{random:.2f}", ratio(finals.mean()), ratio(finals.min()),
                         f"{BARS[env_id]:g}x" if env_id in BARS else "above random"])
    return format_table(["env", "implementation", "seeds", "final eval return (mean +- std)", "IQM",
                         "95% CI of IQM", "per seed", "random", "mean / random", "worst seed / random", "bar"], rows)


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
        label = f"{script} ({len(mine)} seed{'s' * (len(mine) > 1)})"
        ax.plot(steps, mean, color=f"C{i}", linewidth=2.2, marker="o", label=label)
    if env_id in data["random"]:
        ax.axhline(data["random"][env_id]["mean"], color="gray", linestyle="--", linewidth=1, label="random policy")
    ax.set_ylabel("evaluation return (10 games, eps 0.05)", fontsize=8)
    style_axes(ax, f"{env_id}: short protocol (200k steps), each seed thin, mean bold")
    return save_figure(fig, RESULTS_DIR / f"atari_short_{game_of(env_id)}.png")


@dataclass
class Args:
    dry_run: bool = False  # print what would run, run nothing
    record_only: bool = False  # train nothing: record the cells the grids finished (and the random baseline)
    sb3: bool = True  # also run Stable-Baselines3's DQN cell(s)
    only: Optional[str] = None  # run only this implementation's missing cells: dqn_atari.py, ..._dueling_per.py, sb3
    max_attempts: int = 3  # leave a grid cell alone after it failed this many times
    out: Path = RESULTS_DIR / "atari_short.json"  # the JSON record


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
    done = {(r["script"], r["env_id"], r["seed"]) for r in data["runs"]}
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
            if paths.done(cell):
                data["runs"].append(cell_record(paths, cell))
                save()
            continue
        if spec.name not in runners:
            runners[spec.name] = Runner(load_or_create_spec(paths, spec), paths, sys.executable, args.max_attempts)
        outcome = run_cells(runners[spec.name], [cell], len(expand_grid(spec)), 1)[cell.run_name]
        if outcome in ("done", SKIP_DONE):
            data["runs"].append(cell_record(paths, cell))
            save()
        if runners[spec.name].stop.is_set():
            return 130
    for env_id, seed in [] if args.record_only else sb3_todo:
        data["runs"].append(sb3_record(env_id, seed))
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
