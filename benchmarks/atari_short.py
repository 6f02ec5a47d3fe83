"""Short-horizon Atari learning evidence on a CPU: both Atari scripts on one 200k-step protocol through grid.py, next to
a random policy and SB3's DQN; results/atari_short.json is the record (protocol and commands: benchmarks/README.md)."""

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tyro

from benchmarks.common import (PROTOCOL, RESULTS_DIR, ScalarPoint, describe_machine, format_table, in_fresh_process,
                               iqm_ci, load_script, read_json, read_scalars, sps_from_points, write_json)
from benchmarks.grid import GRID_ROOT, Cell, GridPaths, GridSpec, Runner, expand_grid, load_or_create_spec, run_cells
from benchmarks.plot import EVAL_TAG, TRAIN_TAG, RunData, game_of, plot_env

PLAN: dict[str, dict[str, tuple[int, ...]]] = {  # env id -> script -> seeds
    "BreakoutNoFrameskip-v4": {"dqn_atari.py": (1, 2, 3), "dqn_atari_dueling_per.py": (1, 2, 3)},  # 3 a side: #22
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
SMOOTH = 20  # training games per point of the training-games curves (a moving mean)
BARS = {"BreakoutNoFrameskip-v4": 5.0}  # every seed must end at least this many times the random policy's return
RANDOM = {"epsilon": 1.0, "episodes": 30, "seed": 12345}
# the protocol in SB3's DQN arguments: dqn_atari.py's defaults, and an update every 4 env steps = 1 vector step of 8
# envs x 2 gradient steps
SB3_SETTINGS = dict(learning_rate=1e-4, tau=1.0, gamma=0.99, target_update_interval=1_000, exploration_initial_eps=1.0,
                    exploration_final_eps=0.01, optimize_memory_usage=False, buffer_size=100_000,
                    learning_starts=20_000, batch_size=32, train_freq=1, gradient_steps=2, exploration_fraction=0.5)
SB3_RUN = dict(n_envs=8, total_timesteps=200_000, eval_every=50_000, eval_games=10, eval_epsilon=0.05)  # sb3_run's
# a pause longer than this between two logged updates is an interruption, not training time (periodic evaluations
# stay in, as in measure sps)
GAP_S = 300.0


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
    (every 100 updates after learning starts), SPS over them, and every `eval_every` env steps an evaluation of
    `eval_games` full games (its Monitor's unclipped scores) at epsilon `eval_epsilon`, and the
    (env step, score) of every training game, as our scripts log charts/episodic_return."""
    import stable_baselines3
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    model = DQN("CnnPolicy", sb3_env(env_id, n_envs, seed), device=device, seed=seed, verbose=0, **settings)
    every = 100 * settings["train_freq"] * n_envs // settings["gradient_steps"]  # env steps per 100 updates
    rng = np.random.default_rng(seed)
    points: list[tuple[int, float]] = []
    evals: list[list[float]] = []
    games: list[list[float]] = []

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
            games.extend([t, float(info["episode"]["r"])] for info in self.locals["infos"] if "episode" in info)
            if t > settings["learning_starts"] and (t - settings["learning_starts"]) % every == 0:
                points.append((t, time.time()))
            if eval_every and t % eval_every == 0:
                evals.append([t, evaluate(t)])
                print(f"sb3 {env_id} seed {seed}: step {t:,}, eval {evals[-1][1]:.2f}", flush=True)
            return True

    start = time.perf_counter()
    model.learn(total_timesteps=total_timesteps, callback=Callback())
    wall_s = time.perf_counter() - start
    model.get_env().close()
    return {"version": stable_baselines3.__version__, "device": str(model.device), "settings": settings,
            "wall_s": wall_s, "points": points, "training": sps_from_points(points), "evals": evals, "games": games}



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
    n_actions = int(script.make_env(game, 1, sticky, frames, train=True).single_action_space.n)
    q_network = script.QNetwork(n_actions)  # acts only when epsilon < 1
    returns, lengths = script.evaluate(q_network, game, sticky, frames, RANDOM["episodes"], RANDOM["epsilon"],
                                       RANDOM["seed"], torch.device("cpu"))
    return {"mean": float(returns.mean()), "std": float(returns.std()), "episodes": len(returns),
            "returns": returns.tolist(), "mean_length_frames": float(lengths.mean())}


def cell_record(paths: GridPaths, cell: Cell) -> dict[str, Any]:
    """A finished cell as atari_short.json keeps it: its evaluation curve, training games (env step, score) and SPS
    from its events, its time over all attempts, commit and machine from the grid's state/{run_name}.json."""
    scalars = read_scalars(paths.run_dir(cell), [EVAL_TAG, "losses/td_loss", TRAIN_TAG])
    evals, state = scalars[EVAL_TAG], read_json(paths.state(cell))
    return {"script": cell.script, "env_id": cell.env_id, "seed": cell.seed, "steps": evals[-1].step,
            "eval": [[p.step, p.value] for p in evals], "final_eval_return": evals[-1].value,
            "sps": sps_from_points([(p.step, p.wall_time) for p in scalars["losses/td_loss"]], GAP_S)["sps"],
            "wall_s": state["wall_s"], "commit": state["git"]["commit"], "machine": describe_machine(state["machine"]),
            "run_name": cell.run_name, "games": [[p.step, p.value] for p in scalars[TRAIN_TAG]]}


def sb3_record(env_id: str, seed: int) -> dict[str, Any]:
    """One SB3 DQN cell, as atari_short.json keeps it."""
    r = in_fresh_process(sb3_run, env_id, SB3_RUN["n_envs"], seed, "cpu", SB3_SETTINGS, SB3_RUN["total_timesteps"],
                         SB3_RUN["eval_every"], SB3_RUN["eval_games"], SB3_RUN["eval_epsilon"])
    return {"script": f"stable-baselines3 {r['version']} DQN", "env_id": env_id, "seed": seed,
            "steps": r["evals"][-1][0], "eval": r["evals"], "final_eval_return": r["evals"][-1][1],
            "sps": r["training"]["sps"], "wall_s": r["wall_s"], "games": r["games"]}


def by_implementation(data: dict[str, Any], env_id: str) -> dict[str, list[RunData]]:
    """The recorded runs of one game as plot.py reads runs, by implementation, each in seed order: evaluations, and
    training games (env step, score) as the training returns."""
    groups: dict[str, list[RunData]] = defaultdict(list)
    for r in sorted((r for r in data["runs"] if r["env_id"] == env_id), key=lambda r: r["seed"]):
        groups[r["script"]].append(RunData(Path(r.get("run_name", r["script"])), env_id, r["script"], r["seed"],
                                           [ScalarPoint(s, 0.0, v) for s, v in r["eval"]],
                                           [ScalarPoint(s, 0.0, v) for s, v in r.get("games", [])], r.get("machine")))
    return dict(sorted(groups.items()))


def table(data: dict[str, Any]) -> str:
    rows = []
    for env_id in sorted({r["env_id"] for r in data["runs"]}):
        random = data["random"].get(env_id, {}).get("mean")
        ratio = (lambda x: f"{x / random:.1f}x" if random else "-")  # noqa: E731
        for script, runs in by_implementation(data, env_id).items():
            finals = np.array([r.eval[-1].value for r in runs])
            ci = iqm_ci(finals)
            rows.append([env_id, script, " ".join(str(r.seed) for r in runs),
                         f"{finals.mean():.1f} +- {finals.std():.1f}", f"{ci['iqm']:.1f}",
                         f"[{ci['ci_low']:.1f}, {ci['ci_high']:.1f}]", ", ".join(f"{f:.1f}" for f in finals),
                         "-" if random is None else f"{random:.2f}", ratio(finals.mean()), ratio(finals.min()),
                         f"{BARS[env_id]:g}x" if env_id in BARS else "above random"])
    return format_table(["env", "implementation", "seeds", "final eval return (mean +- std)", "IQM",
                         "95% CI of IQM", "per seed", "random", "mean / random", "worst seed / random", "bar"], rows)


def plot(data: dict[str, Any], env_id: str, out: Path) -> Path:
    """out's name + _{game}.png: evaluation returns and training games (moving mean of SMOOTH games), mean and min/max
    over seeds, and the random policy's return."""
    random = {"random policy": data["random"][env_id]["mean"]} if env_id in data["random"] else {}
    return plot_env(env_id, by_implementation(data, env_id), "minmax", SMOOTH,
                    out.with_name(f"{out.stem}_{game_of(env_id)}.png"), random)


@dataclass
class Args:
    dry_run: bool = False  # print what would run, run nothing
    record_only: bool = False  # train nothing: record the cells the grids finished (and the random baseline)
    sb3: bool = True  # also run Stable-Baselines3's DQN cell(s)
    only: Optional[str] = None  # run only this implementation's missing cells: dqn_atari.py, ..._dueling_per.py, sb3
    env_id: Optional[str] = None  # run only this game's missing cells, e.g. BreakoutNoFrameskip-v4
    max_attempts: int = 3  # leave a grid cell alone after it failed this many times
    out: Path = RESULTS_DIR / "atari_short.json"  # the JSON record


def main(args: Args) -> int:
    protocol = {"flags": list(PROTOCOL), "plan": PLAN, "random": RANDOM,
                "sb3": {**SB3_SETTINGS, **SB3_RUN, "cells": [list(c) for c in SB3_CELLS]}}
    saved = json.loads(args.out.read_text()) if args.out.exists() else {"protocol": protocol}
    if saved["protocol"]["flags"] != list(PROTOCOL):
        print(f"error: {args.out} was made with other protocol flags; move it aside to start a new record",
              file=sys.stderr)
        return 2
    data = {"protocol": protocol, "random": saved.get("random", {}), "runs": saved.get("runs", [])}
    done = {(r["script"], r["env_id"], r["seed"]) for r in data["runs"]}
    todo = [c for env_id in PLAN for c in wanted_cells(env_id) if (c.script, c.env_id, c.seed) not in done
            and args.only in (None, c.script) and args.env_id in (None, c.env_id)]
    sb3_todo = [c for c in SB3_CELLS if args.sb3 and args.only in (None, "sb3") and args.env_id in (None, c[0])
                and not any(k[1:] == c and k[0].startswith("stable") for k in done)]
    if args.dry_run:
        print("to run: " + (", ".join([c.run_name for c in todo] + [f"SB3 {e} seed {s}" for e, s in sb3_todo]) or
                            "nothing"))
        return 0

    def record(run: dict[str, Any]) -> None:  # each finished cell is saved at once: the file is the record
        data["runs"].append(run)
        write_json(args.out, data)

    for env_id in PLAN:
        if env_id not in data["random"]:
            data["random"][env_id] = in_fresh_process(random_baseline, env_id)
            write_json(args.out, data)
    for cell in todo:
        spec = grid_spec(cell.env_id)
        paths = GridPaths(GRID_ROOT / spec.name)
        runner = None if args.record_only else Runner(load_or_create_spec(paths, spec), paths, sys.executable,
                                                       args.max_attempts)
        if runner:
            run_cells(runner, [cell], len(expand_grid(spec)), 1)
        if paths.done(cell):  # finished now, or before (--record-only trains nothing)
            record(cell_record(paths, cell))
        if runner and runner.stop.is_set():
            return 130
    for env_id, seed in [] if args.record_only else sb3_todo:
        record(sb3_record(env_id, seed))
    if not data["runs"]:
        return 0
    for env_id in sorted({r["env_id"] for r in data["runs"]}):
        print(f"wrote {plot(data, env_id, args.out)}")
    text = table(data)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
