"""CartPole-v1 time-to-solve of dqn_cartpole.py over several seeds, one at a time, each with `--goal-score 475`: the
env step and the seconds (the script's own clock) at which its greedy evaluation mean first reached the goal, read from
its summary.json (goal_reached_step, goal_reached_s), or 'not solved' (benchmarks/README.md).

    python -m benchmarks.cartpole_solve                       # seeds 1-5 -> benchmarks/results/cartpole_solve.json
    python -m benchmarks.cartpole_solve --seeds 1 2 -- --learning-rate 5e-4    # flags after -- go to the script
"""

import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tyro

from benchmarks.common import (CARTPOLE_SCRIPT, REFERENCES, RESULTS_DIR, fmt, format_table, read_summary,
                               references_json, require_cuda, run_name_for, run_script, split_passthrough,
                               timestamp_tag, write_json)


@dataclass
class Args:
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)  # the seeds, run one after another
    goal_score: float = 475.0  # the evaluation mean that counts as solved (CartPole-v1's reward threshold)
    cuda: bool = False  # run on the GPU
    out_dir: Path = RESULTS_DIR  # where the JSON goes, and the runs/ and logs


def solve_result(seed: int, run_name: str, wall_s: float, summary: dict[str, Any]) -> dict[str, Any]:
    """One seed's row, from the run's summary.json."""
    solved = summary.get("goal_reached_step") is not None
    return {"seed": seed, "run_name": run_name, "solved": solved, "steps": summary.get("goal_reached_step"),
            "seconds": summary.get("goal_reached_s"), "eval_mean": summary.get("final_eval_return") if solved else None,
            "process_wall_s": wall_s, "summary": summary}


def solve_seed(seed: int, args: Args, tag: str, script_flags: list[str]) -> dict[str, Any]:
    run_name = run_name_for("CartPole-v1", CARTPOLE_SCRIPT, seed, tag)
    workdir = args.out_dir / "cartpole_solve"
    flags = ["--seed", str(seed), "--run-name", run_name, "--goal-score", str(args.goal_score),
             "--cuda" if args.cuda else "--no-cuda", *script_flags]
    wall_s = run_script(CARTPOLE_SCRIPT, flags, workdir, workdir / "logs" / f"{run_name}.log")
    return solve_result(seed, run_name, wall_s, read_summary(workdir / "runs" / run_name))


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How many solved; the median and range of steps and seconds over the solved seeds."""
    solved = [r for r in results if r["solved"]]
    summary: dict[str, Any] = {"seeds": len(results), "solved": len(solved)}
    for key in ("steps", "seconds"):
        values = [r[key] for r in solved]
        for name, f in (("median", statistics.median), ("min", min), ("max", max)):
            summary[f"{name}_{key}"] = f(values) if values else None
    return summary


def main(args: Args, script_flags: list[str]) -> None:
    require_cuda(args.cuda)
    tag = timestamp_tag("solve")
    results = [solve_seed(seed, args, tag, script_flags) for seed in args.seeds]
    summary = summarize(results)
    print(f"\ndqn_cartpole.py to a greedy evaluation mean >= {args.goal_score} (defaults"
          + (f" plus {' '.join(script_flags)}" if script_flags else "") + "):")
    print(format_table(["seed", "solved", "steps", "seconds", "process s", "best eval"],
                       [[r["seed"], "yes" if r["solved"] else "not solved", r["steps"], r["seconds"],
                         r["process_wall_s"], r["summary"].get("best_eval_return")] for r in results], digits=1))
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
