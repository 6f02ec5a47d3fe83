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
# The scripts' behaviour changed at commit 8c08bb3 (issue #22: the serve after a lost life is not a transition and
# restarts the frame stack). Their cells recorded before it are in results/atari_short_before_issue22.json; the grids
# of the new behaviour carry this suffix, so that no cell run before the change counts as done.
GRID_SUFFIX = "_after_issue22"
BIN = 25_000  # env steps per bin of the training-games curves
BARS = {"BreakoutNoFrameskip-v4": 5.0}  # every seed must end at least this many times the random policy's return
RANDOM = {"epsilon": 1.0, "episodes": 30, "seed": 12345}
SB3_SETTINGS = dict(learning_rate=1e-4, buffer_size=100_000, learning_starts=20_000, batch_size=32, tau=1.0, gamma=0.99,
                    train_freq=1, gradient_steps=2, target_update_interval=1_000, exploration_fraction=0.5,
                    exploration_initial_eps=1.0, exploration_final_eps=0.01, optimize_memory_usage=False)
SB3_ENVS, SB3_STEPS, EVAL_EVERY, EVAL_GAMES, EVAL_EPSILON = 8, 200_000, 50_000, 10, 0.05
GAP_S = 300.0  # a pause longer than this between two logged updates is an interruption, not training time


def grid_spec(env_id: str) -> GridSpec:
    seeds = sorted({seed for seeds in PLAN[env_id].values() for seed in seeds})
    return GridSpec(f"atari_short_{game_of(env_id).lower()}{GRID_SUFFIX}", tuple(PLAN[env_id]), (env_id,),
                    tuple(seeds), PROTOCOL)


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


def binned_games(games: list[list[float]], total: int) -> np.ndarray:
    """(bins,) mean score of the training games that ended in each BIN-step bin (NaN where none did)."""
    games_ = np.array(games).reshape(-1, 2)
    bins = np.minimum(games_[:, 0] // BIN, total // BIN - 1).astype(int)
    return np.array([games_[bins == b, 1].mean() if (bins == b).any() else np.nan for b in range(total // BIN)])


def plot(data: dict[str, Any], env_id: str, out: Optional[Path] = None) -> Path:
    """Left: evaluation returns. Right: training games (full games under epsilon, mean per BIN steps) of the runs
    that recorded them (runs recorded before games were kept have none)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, games_ax) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=100)
    runs = [r for r in data["runs"] if r["env_id"] == env_id]
    for i, script in enumerate(sorted({r["script"] for r in runs})):
        mine = [r for r in runs if r["script"] == script]
        curves = [np.array(r["eval"]) for r in mine]
        for curve in curves:
            ax.plot(curve[:, 0], curve[:, 1], color=f"C{i}", linewidth=0.7, alpha=0.5)
        steps = sorted(set.intersection(*(set(c[:, 0]) for c in curves)))
        mean = [np.mean([c[c[:, 0] == s, 1][0] for c in curves]) for s in steps]
        label = f"{script} ({len(curves)} seed{'s' * (len(curves) > 1)})"
        ax.plot(steps, mean, color=f"C{i}", linewidth=2.2, marker="o", label=label)
        binned = [binned_games(r["games"], r["steps"]) for r in mine if r.get("games")]
        centres = (np.arange(len(binned[0])) + 0.5) * BIN if binned else []
        for b in binned:
            games_ax.plot(centres, b, color=f"C{i}", linewidth=0.7, alpha=0.5)
        if binned:
            seen = (~np.isnan(binned)).sum(axis=0)  # seeds with a game ending in each bin
            mean = np.where(seen > 0, np.nansum(binned, axis=0) / np.maximum(seen, 1), np.nan)
            games_ax.plot(centres, mean, color=f"C{i}", linewidth=2.2, marker="o",
                          label=f"{script} ({len(binned)} of {len(mine)} seeds)")
    if env_id in data["random"]:
        ax.axhline(data["random"][env_id]["mean"], color="gray", linestyle="--", linewidth=1, label="random policy")
    ax.set_ylabel("evaluation return (10 games, eps 0.05)", fontsize=8)
    style_axes(ax, f"{env_id}: short protocol (200k steps), each seed thin, mean bold")
    games_ax.set_ylabel(f"training game score, mean per {BIN // 1000}k steps", fontsize=8)
    style_axes(games_ax, "training games (full games under epsilon)")
    return save_figure(fig, out or RESULTS_DIR / f"atari_short_{game_of(env_id)}.png")


BEFORE = RESULTS_DIR / "atari_short_before_issue22.json"
TAKEOFF = RESULTS_DIR / "takeoff"  # issue #22: the ablation records and the comparison figure and table


def takeoff(data: dict[str, Any], env_id: str = "BreakoutNoFrameskip-v4") -> str:
    """Issue #22's comparison on one figure and one table: dqn_atari.py before and after the serve change, the runs
    of ablation A (the change as a patch, the same behaviour), SB3, and dqn_atari_dueling_per.py before and after."""
    arms: list[dict[str, Any]] = []
    for r in read_json(BEFORE)["runs"] if BEFORE.exists() else []:
        arms.append({**r, "script": f"{r['script']} before 8c08bb3"})
    for path in sorted(TAKEOFF.glob("life_loss_reset_seed*.json")):
        arms.append({**read_json(path), "script": "dqn_atari.py, ablation A (patch of a195c73)", "steps": SB3_STEPS})
    arms += [{**r, "script": r["script"] + ("" if r["script"].startswith("stable") else " after 8c08bb3")}
             for r in data["runs"]]
    arms = [r for r in arms if r["env_id"] == env_id]
    rows = []
    for script in sorted({r["script"] for r in arms}):
        runs = sorted((r for r in arms if r["script"] == script), key=lambda r: r["seed"])
        cells = []
        for step in (50_000, 100_000, 150_000, 200_000):
            ci = iqm_ci([dict(map(tuple, r["eval"]))[step] for r in runs])
            cells.append(f"{ci['iqm']:.1f} [{ci['ci_low']:.1f}, {ci['ci_high']:.1f}]")
        rows.append([script, " ".join(str(r["seed"]) for r in runs), *cells])
    plot({"runs": arms, "random": data["random"]}, env_id, TAKEOFF / f"{game_of(env_id).lower()}_takeoff.png")
    return format_table(["arm", "seeds", "IQM [95% CI] at 50k", "100k", "150k", "200k"], rows)


@dataclass
class Args:
    dry_run: bool = False  # print what would run, run nothing
    record_only: bool = False  # train nothing: record the cells the grids finished (and the random baseline)
    sb3: bool = True  # also run Stable-Baselines3's DQN cell(s)
    only: Optional[str] = None  # run only this implementation's missing cells: dqn_atari.py, ..._dueling_per.py, sb3
    max_attempts: int = 3  # leave a grid cell alone after it failed this many times
    out: Path = RESULTS_DIR / "atari_short.json"  # the JSON record
    takeoff: bool = False  # train nothing: draw and tabulate issue #22's comparison into results/takeoff/


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
    if args.takeoff:
        text = takeoff(data)
        (TAKEOFF / "breakout_takeoff.md").write_text(text + "\n")
        print(text)
        return 0
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
