"""Two numbers behind issue #13 (dqn_atari_dueling_per.py learning slowly), from a run's checkpoint.pt written with
--checkpoint-buffer: the importance-sampling weights of the batches the learner sees, and where Adam's per-element
denominator sqrt(v_hat) + eps stands against eps (eps-dominated elements step by about lr * g / eps, not lr * m /
sqrt(v_hat)).

    python -m benchmarks.per_diagnose benchmarks/results/grids/atari_short_breakout/runs/RUN/checkpoint.pt
"""

from pathlib import Path

import numpy as np
import torch
import tyro

from benchmarks.common import load_script

PER_SCRIPT = "dqn_atari_dueling_per.py"


def diagnose(path: Path, batches: int = 200) -> dict:
    mod = load_script(PER_SCRIPT)
    state = torch.load(path, map_location="cpu", weights_only=True)
    args = mod.Args(**{k: v for k, v in state["args"].items() if k in mod.Args.__dataclass_fields__})
    if state["replay_buffer"] is None:
        raise SystemExit(f"{path} holds no replay buffer: write it with --checkpoint-buffer")
    rb = mod.ReplayBuffer(args.buffer_size, args.num_envs, torch.device("cpu"), torch.device("cpu"),
                          args.prioritized_replay_alpha, args.prioritized_replay_eps)
    rb.load_state_dict(state["replay_buffer"])
    step = state["global_step"]
    beta = mod.linear_schedule(args.prioritized_replay_beta0, 1.0, args.total_timesteps, step)
    torch.manual_seed(0)
    weights = torch.cat([rb.sample(args.batch_size, beta).weights for _ in range(batches)]).numpy()  # at this step
    eps = state["optimizer"]["param_groups"][0]["eps"]
    rms = torch.cat([(s["exp_avg_sq"] / (1 - 0.999 ** float(s["step"]))).sqrt().flatten()  # sqrt(v_hat)
                     for s in state["optimizer"]["state"].values()]).numpy()
    return {"checkpoint": str(path), "global_step": step, "beta": beta, "adam_eps": eps,
            "is_weight": {"mean": float(weights.mean()), "median": float(np.median(weights)),
                          "min": float(weights.min()), "p_min": float(rb.tree.mins[1])},
            "adam_sqrt_v_hat": {"median": float(np.median(rms)), "p90": float(np.percentile(rms, 90)),
                                "p99": float(np.percentile(rms, 99)), "share_below_eps": float((rms < eps).mean()),
                                "median_step_share": float(np.median(rms / (rms + eps)))}}


def main(checkpoints: tyro.conf.Positional[tuple[Path, ...]]) -> None:
    """Prints one line per checkpoint."""
    for path in checkpoints:
        d = diagnose(path)
        w, a = d["is_weight"], d["adam_sqrt_v_hat"]
        print(f"{path}: step {d['global_step']:,}, beta {d['beta']:.2f}: IS weight mean {w['mean']:.3f}, median "
              f"{w['median']:.3f}, min {w['min']:.4f} (p_min {w['p_min']:.2e}); Adam eps {d['adam_eps']:g}: "
              f"sqrt(v_hat) median {a['median']:.2e}, p90 {a['p90']:.2e}, p99 {a['p99']:.2e}, "
              f"{100 * a['share_below_eps']:.1f}% of elements below eps, median step share sqrt(v)/(sqrt(v)+eps) "
              f"{a['median_step_share']:.3f}")


if __name__ == "__main__":
    tyro.cli(main)
