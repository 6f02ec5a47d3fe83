"""Training-phase SPS of the three scripts in a fixed configuration, next to the update-cost bound and CleanRL's number
(definitions in benchmarks/README.md).

    python -m benchmarks.sps                 # all three, CPU, 1 env -> benchmarks/results/sps.json
    python -m benchmarks.sps --num-envs 4 --cuda --scripts dqn_atari.py
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import tyro

from benchmarks.common import (ATARI_SCRIPTS, CARTPOLE_SCRIPT, REFERENCES, SCRIPTS, AtariBenchConfig, format_table,
                               in_fresh_process, measure_script_sps, references_json, require_cuda, run_name_for,
                               timestamp_tag, write_json)
from benchmarks.update_cost import measure_update_cost


@dataclass
class Args(AtariBenchConfig):
    scripts: tuple[str, ...] = SCRIPTS  # which scripts to measure
    cartpole_timesteps: int = 20_000  # env steps of the dqn_cartpole.py run (its other flags stay at their defaults)
    update_iters: int = 500  # timed updates of the update-cost harness, per Atari script (0: skip the harness)
    out: Optional[Path] = None  # the JSON file (default: {out-dir}/sps.json)


def measure_atari(script: str, args: Args, tag: str) -> dict[str, Any]:
    """One training run in the fixed config, then the update cost of the same script in a fresh process."""
    run_name = run_name_for(args.env_id, script, args.seed, tag)
    run = measure_script_sps(script, args.script_flags(run_name), run_name, args.out_dir / "sps")
    result: dict[str, Any] = dict(run)
    if args.update_iters > 0:
        cost = in_fresh_process(measure_update_cost, script, args.env_id, args.cuda, args.capacity(),
                                args.batch_size, 20, args.update_iters)
        bound = args.train_frequency / cost["seconds_per_update"]
        result["update_cost"] = {**cost, "bound_sps": bound, "sps_over_bound": run["training"]["sps"] / bound}
    result["sps_over_cleanrl"] = run["training"]["sps"] / REFERENCES["cleanrl_atari_sps"].value
    return result


def main(args: Args) -> None:
    if unknown := set(args.scripts) - set(SCRIPTS):
        raise SystemExit(f"unknown --scripts {sorted(unknown)}; choose from {SCRIPTS}")
    require_cuda(args.cuda)
    tag = timestamp_tag("sps")
    atari = [measure_atari(s, args, tag) for s in ATARI_SCRIPTS if s in args.scripts]
    cartpole = None
    if CARTPOLE_SCRIPT in args.scripts:
        run_name = run_name_for("CartPole-v1", CARTPOLE_SCRIPT, args.seed, tag)
        flags = ["--seed", str(args.seed), "--run-name", run_name, "--total-timesteps", str(args.cartpole_timesteps),
                 "--cuda" if args.cuda else "--no-cuda"]
        cartpole = measure_script_sps(CARTPOLE_SCRIPT, flags, run_name, args.out_dir / "sps")
    if atari:
        cleanrl, sb3, update = (REFERENCES[k] for k in ("cleanrl_atari_sps", "sb3_atari_sps", "nature_cnn_update_ms"))
        rows = []
        for r in atari:
            cost = r.get("update_cost", {})
            rows.append([r["script"], args.num_envs, "cuda" if args.cuda else "cpu", r["training"]["sps"],
                         1e3 * cost["seconds_per_update"] if cost else None, cost.get("bound_sps"),
                         cost.get("sps_over_bound"), cleanrl.value, r["sps_over_cleanrl"]])
        print(f"\nAtari training-phase SPS ({args.env_id}, batch {args.batch_size}, train every "
              f"{args.train_frequency}, {args.total_timesteps:,} steps, learning starts {args.learning_starts:,}):")
        print(format_table(["script", "envs", "device", "training SPS", "ms/update", "bound SPS", "SPS/bound",
                            "CleanRL SPS*", "SPS/CleanRL"], rows, digits=2))
        print(f"* {cleanrl.source}: {cleanrl.note}. The ratio compares across machines unless this ran on that CPU "
              f"with 1 env.\nAlso there: {sb3.note}: {sb3.value:g} SPS; {update.note}.")
    if cartpole:
        print(f"\nCartPole-v1, dqn_cartpole.py defaults, {args.cartpole_timesteps:,} steps (its periodic evaluations "
              "and checkpoints fall inside the window):")
        print(format_table(["script", "training SPS", "from step", "to step", "whole run s"],
                           [[cartpole["script"], cartpole["training"]["sps"], int(cartpole["training"]["first_step"]),
                             int(cartpole["training"]["last_step"]), cartpole["wall_s"]]], digits=1))
    config = {k: v for k, v in asdict(args).items() if k not in ("out", "out_dir")}
    write_json(args.out or args.out_dir / "sps.json",
               {"config": {**config, "buffer_size": args.capacity()}, "atari": atari,
                "cartpole": cartpole,
                "references": references_json(["cleanrl_atari_sps", "sb3_atari_sps", "nature_cnn_update_ms"])})


if __name__ == "__main__":
    main(tyro.cli(Args))
