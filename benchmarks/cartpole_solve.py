"""CartPole-v1 time-to-solve of dqn_cartpole.py over several seeds: env steps and seconds until the greedy evaluation
mean (10 episodes, every 2.5k steps by the script's defaults) reaches 475, or 'not solved' within its 50k steps.

Runs one seed at a time (so the seconds are not shared between runs), each with `--goal-score 475`, which makes the
script print `goal reached: eval mean M >= 475.0 at step S after T s` and stop. The seconds are the script's own
clock (from the start of its training loop: process and env start-up excluded, its evaluations included); the whole
process time is recorded too.

    python -m benchmarks.cartpole_solve                       # seeds 1-5 -> benchmarks/results/cartpole_solve.json
    python -m benchmarks.cartpole_solve --seeds 1 2 -- --learning-rate 5e-4    # flags after -- go to the script
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tyro

from benchmarks.common import (CARTPOLE_SCRIPT, REFERENCES, RESULTS_DIR, check_run, fmt, format_table, parse_finished,
                               parse_goal, references_json, require_cuda, run_name_for, run_script, split_passthrough,
                               timestamp_tag, write_json)


@dataclass
class Args:
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """the seeds, run one after another"""
    goal_score: float = 475.0
    """the evaluation mean that counts as solved (CartPole-v1's reward threshold)"""
    cuda: bool = False
    """run on the GPU"""
    out_dir: Path = RESULTS_DIR
    """where the JSON goes, and the runs/ and logs"""


def solve_seed(seed: int, args: Args, tag: str, script_flags: list[str]) -> dict[str, Any]:
    run_name = run_name_for("CartPole-v1", CARTPOLE_SCRIPT, seed, tag)
    workdir = args.out_dir / "cartpole_solve"
    flags = ["--seed", str(seed), "--run-name", run_name, "--goal-score", str(args.goal_score),
             "--cuda" if args.cuda else "--no-cuda", *script_flags]
    run = run_script(CARTPOLE_SCRIPT, flags, workdir, workdir / "logs" / f"{run_name}.log")
    check_run(run)
    goal, finished = parse_goal(run.output), parse_finished(run.output)
    return {"seed": seed, "run_name": run_name, "solved": goal is not None,
            "steps": goal["step"] if goal else None, "seconds": goal["seconds"] if goal else None,
            "eval_mean": goal["eval_mean"] if goal else None, "process_wall_s": run.wall_s, "finished": finished}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How many solved; the median and range of steps and seconds over the solved seeds."""
    solved = [r for r in results if r["solved"]]
    summary: dict[str, Any] = {"seeds": len(results), "solved": len(solved)}
    for key in ("steps", "seconds"):
        values = [r[key] for r in solved]
        summary[f"median_{key}"] = statistics.median(values) if values else None
        summary[f"min_{key}"] = min(values) if values else None
        summary[f"max_{key}"] = max(values) if values else None
    return summary


def results_table(results: list[dict[str, Any]]) -> str:
    rows = [[r["seed"], "yes" if r["solved"] else "not solved", r["steps"], r["seconds"], r["process_wall_s"],
             (r["finished"] or {}).get("best_eval_return")] for r in results]
    return format_table(["seed", "solved", "steps", "seconds", "process s", "best eval"], rows, digits=1)


def main(args: Args, script_flags: list[str]) -> None:
    require_cuda(args.cuda)
    tag = timestamp_tag("solve")
    results = [solve_seed(seed, args, tag, script_flags) for seed in args.seeds]
    summary = summarize(results)
    print(f"\ndqn_cartpole.py to a greedy evaluation mean >= {args.goal_score} (defaults"
          + (f" plus {' '.join(script_flags)}" if script_flags else "") + "):")
    print(results_table(results))
    print(f"solved {summary['solved']}/{summary['seeds']} seeds; median over solved seeds: "
          f"{fmt(summary['median_steps'], 0)} steps, {fmt(summary['median_seconds'])} s")
    steps, secs = REFERENCES["cleanrl_cartpole_steps"], REFERENCES["cleanrl_cartpole_seconds"]
    print(f"reference: CleanRL dqn.py ~{steps.value:,.0f} steps, ~{secs.value:.0f} s ({steps.source}; {steps.note})")
    write_json(args.out_dir / "cartpole_solve.json",
               {"config": {**{k: v for k, v in asdict(args).items() if k != "out_dir"}, "script_flags": script_flags},
                "results": results, "summary": summary,
                "references": references_json(["cleanrl_cartpole_steps", "cleanrl_cartpole_seconds"])})


if __name__ == "__main__":
    own, passthrough = split_passthrough(sys.argv[1:])
    main(tyro.cli(Args, args=own), passthrough)
