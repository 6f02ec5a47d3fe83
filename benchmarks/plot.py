"""Learning curves and a final-score table (mean +- std, IQM with a bootstrap CI) over seeds from our TensorBoard runs,
next to the published scores in shared/NOTES.md (benchmarks/README.md)."""

import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import tyro
from matplotlib.figure import Figure

from benchmarks.common import (PUBLISHED_NOTE, PUBLISHED_SCORES, RESULTS_DIR, ScalarPoint, describe_machine,
                               format_table, iqm_ci, machine_info, read_hparams, read_json, read_scalars, write_json)

EVAL_TAG, TRAIN_TAG = "eval/episodic_return", "charts/episodic_return"
Spread = Literal["std", "minmax"]


@dataclass
class RunData:
    run_dir: Path
    env_id: str
    exp_name: str
    seed: int
    eval: list[ScalarPoint]
    train: list[ScalarPoint]
    machine: Optional[str]  # where the run was made, when grid.py recorded it

    @property
    def last_step(self) -> int:
        return max([p.step for p in self.eval + self.train], default=0)


def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Folders holding TensorBoard event files under `paths` (W&B's copies and grids' stale attempts skipped)."""
    return sorted({events.parent for path in paths for events in Path(path).rglob("events.out.tfevents.*")
                   if not {"wandb", "stale"} & set(events.relative_to(path).parts[:-1])})


def identify(run_dir: Path, hparams: dict[str, str]) -> Optional[tuple[str, str, int]]:
    """(env id, exp name, seed) from the hyperparameters text, else from a run name '{env}__{exp_name}__{seed}__...'
    ('/' in the env became '-'); None when neither."""
    try:
        return hparams["env_id"], hparams["exp_name"], int(hparams["seed"])
    except (KeyError, ValueError):
        parts = run_dir.name.split("__")
        return (parts[0], parts[1], int(parts[2])) if len(parts) >= 3 and re.fullmatch(r"-?\d+", parts[2]) else None


def load_runs(paths: Sequence[Path]) -> list[RunData]:
    runs = []
    for run_dir in find_run_dirs(paths):
        if (ident := identify(run_dir, read_hparams(run_dir))) is None:
            print(f"skip {run_dir}: no hyperparameters text and not an {{env}}__{{exp}}__{{seed}}__ name",
                  file=sys.stderr)
            continue
        scalars = read_scalars(run_dir, [EVAL_TAG, TRAIN_TAG])
        machine = read_json(run_dir.parent.parent / "state" / f"{run_dir.name}.json").get("machine")  # grid.py's
        runs.append(RunData(run_dir, *ident, scalars[EVAL_TAG], scalars[TRAIN_TAG],
                            describe_machine(machine) if machine else None))
    return runs


def dedupe(runs: Sequence[RunData]) -> list[RunData]:
    """One run per (env, script, seed): the one that got furthest (a seed counted twice would shrink the spread)."""
    best: dict[tuple[str, str, int], RunData] = {}
    for run in sorted(runs, key=lambda r: r.last_step, reverse=True):
        key = (run.env_id, run.exp_name, run.seed)
        if key in best:
            print(f"warning: {key} appears twice; keeping {best[key].run_dir} (step {best[key].last_step}), "
                  f"ignoring {run.run_dir} (step {run.last_step})", file=sys.stderr)
        best.setdefault(key, run)
    return list(best.values())


def moving_average(steps: np.ndarray, values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each `window` consecutive values, at the step of the window's last one; a short run (under 5 windows
    of episodes) gets a window of a fifth of its episodes, so that its curve keeps a shape."""
    window = max(1, min(window, len(values) // 5))
    return steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid")


def aggregate(curves: Sequence[tuple[np.ndarray, np.ndarray]], spread: Spread,
              num: int = 200) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Mean and band (mean +- std, or min and max) over seeds, each curve linearly interpolated onto a common grid
    over the steps all seeds cover; None when they cover no common step."""
    curves = [(np.asarray(s, float), np.asarray(v, float)) for s, v in curves if len(s)]
    if not curves or (last := min(s[-1] for s, _ in curves)) < (first := max(s[0] for s, _ in curves)):
        return None
    grid = np.linspace(first, last, num) if last > first else np.array([first])
    ys = np.stack([np.interp(grid, s, v) for s, v in curves])  # (seeds, num)
    mean = ys.mean(axis=0)
    if spread == "std":
        return grid, mean, mean - ys.std(axis=0), mean + ys.std(axis=0)
    return grid, mean, ys.min(axis=0), ys.max(axis=0)


def game_of(env_id: str) -> str:
    """BreakoutNoFrameskip-v4 / ALE/Breakout-v5 -> Breakout (the key of PUBLISHED_SCORES)."""
    return re.sub(r"(NoFrameskip)?-v\d+$", "", env_id.split("/")[-1])


def final_scores(runs: Sequence[RunData], last_episodes: int) -> dict[str, Any]:
    """Per seed: the last evaluation return and the mean of the last `last_episodes` training episodes; over seeds:
    mean and (population) std of both, and the IQM with its 95% bootstrap CI of the final evaluation."""
    per_seed = {r.seed: {"final_eval": r.eval[-1].value if r.eval else None,
                         "final_eval_step": r.eval[-1].step if r.eval else None,
                         "train_last": float(np.mean([p.value for p in r.train[-last_episodes:]])) if r.train else None,
                         "last_step": r.last_step, "run_dir": str(r.run_dir)} for r in runs}
    out: dict[str, Any] = {"seeds": sorted(per_seed), "per_seed": per_seed}
    for key in ("final_eval", "train_last"):
        values = [v[key] for v in per_seed.values() if v[key] is not None]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)} if values else None
        if key == "final_eval":
            out["final_eval_iqm"] = iqm_ci(values) if values else None
    out["steps"] = (min(v["last_step"] for v in per_seed.values()), max(v["last_step"] for v in per_seed.values()))
    return out


def scores_markdown(scores: dict[tuple[str, str], dict[str, Any]], last_episodes: int,
                    machines: Sequence[Optional[str]], sources: Sequence[Path]) -> str:
    pm = lambda s: "-" if s is None else f"{s['mean']:.1f} +- {s['std']:.1f}"  # noqa: E731
    columns = sorted({c for refs in PUBLISHED_SCORES.values() for c in refs})
    rows = []
    for (env_id, exp_name), s in sorted(scores.items()):
        refs, ci = PUBLISHED_SCORES.get(game_of(env_id), {}), s.get("final_eval_iqm")
        steps = f"{s['steps'][0]:,}" + ("" if s["steps"][0] == s["steps"][1] else f" - {s['steps'][1]:,}")
        rows.append([env_id, exp_name, len(s["seeds"]), steps, pm(s["final_eval"]),
                     "-" if ci is None else f"{ci['iqm']:.1f}",
                     "-" if ci is None else f"[{ci['ci_low']:.1f}, {ci['ci_high']:.1f}]", pm(s["train_last"]),
                     *[f"{refs[c][0]:g} +- {refs[c][1]:g}" if c in refs else "-" for c in columns]])
    headers = ["env", "script", "seeds", "steps", "final eval return", "IQM", "95% CI of IQM",
               f"train return (last {last_episodes} ep.)", *columns]
    made_on = "; ".join(sorted(set(m for m in machines if m))) or "-"
    if None in machines:
        made_on += f" ({list(machines).count(None)} of {len(machines)} runs have no record: made outside grid.py)"
    return "\n".join([
        "# Final scores", "", format_table(headers, rows), "",
        "Ours: mean +- std over seeds, and the interquartile mean (IQM) with its 95% percentile-bootstrap CI over "
        "seeds (with 2 or 3 seeds the CI about spans the seeds: it says how little they pin down). Final eval return "
        "= each seed's last eval/episodic_return (the scripts' final evaluation: full games, epsilon 0.05 for Atari, "
        f"greedy for CartPole); train return = mean of each seed's last {last_episodes} charts/episodic_return values "
        "(full games, unclipped score). 'steps' = the last logged env step (a range when seeds differ: unfinished "
        "runs).", f"Reference columns: {PUBLISHED_NOTE} Compare only at equal budgets.", "",
        f"Runs: {', '.join(str(p) for p in sources)}.", f"Runs made on: {made_on}.",
        f"Tabulated on: {describe_machine(machine_info())}.", ""])


def plot_env(env_id: str, groups: dict[str, list[RunData]], spread: Spread, smooth: int, path: Path,
             lines: dict[str, float]) -> Path:
    """Evaluation returns and smoothed training returns, mean and band over seeds, with a dashed line per `lines`
    entry (label -> score) on the evaluation panel."""
    fig = Figure(figsize=(9, 3.2), dpi=100)  # drawn for a file only: no pyplot, no display
    panels = {EVAL_TAG: "evaluation return", TRAIN_TAG: "training episode return"}
    for ax, (tag, title) in zip(fig.subplots(1, 2), panels.items()):
        for exp_name, runs in sorted(groups.items()):
            curves = [(np.array([p.step for p in points]), np.array([p.value for p in points]))
                      for points in (r.eval if tag == EVAL_TAG else r.train for r in runs)]
            if tag == TRAIN_TAG:
                curves = [moving_average(steps, values, smooth) if len(steps) else (steps, values)
                          for steps, values in curves]
            if (agg := aggregate(curves, spread)) is None:
                continue
            grid, mean, lo, hi = agg
            seeds = sum(len(steps) > 0 for steps, _ in curves)  # the seeds with this curve
            label = f"{exp_name} ({seeds} seed{'s' * (seeds != 1)})"
            if len(grid) == 1:
                ax.errorbar(grid, mean, yerr=[mean - lo, hi - mean], fmt="o", capsize=3, label=label)
            else:
                (line,) = ax.plot(grid, mean, label=label)
                ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2)
        if tag == EVAL_TAG:
            for name, score in lines.items():
                ax.axhline(score, linestyle="--", linewidth=0.8, color="gray")
                ax.annotate(name, (0, score), xycoords=("axes fraction", "data"), fontsize=6, color="gray", va="bottom")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("env steps", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:  # a panel can be empty: runs recorded before their training games
            ax.legend(fontsize=7)
    band = "mean +- std over seeds" if spread == "std" else "mean, min/max over seeds"
    smoothing = f"; training returns: moving mean of {smooth} episodes" if smooth > 1 else ""
    fig.suptitle(f"{env_id} ({band}{smoothing})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[Path, ...]]  # folders to search for runs (a grid's runs/, or run folders)
    spread: Spread = "std"  # the band around the mean over seeds: std, or minmax
    smooth: int = 20  # training returns: moving mean over this many episodes per seed before averaging seeds
    last_episodes: int = 100  # the table's training return: mean over each seed's last this many episodes
    env_ids: Optional[tuple[str, ...]] = None  # only these env ids
    out_dir: Path = RESULTS_DIR / "plots"  # where the PNGs, scores.md and scores.json go
    reference_lines: bool = True  # draw the published scores on the evaluation plot (they squash short runs' curves)


def main(args: Args) -> None:
    runs = dedupe([r for r in load_runs(args.runs) if not args.env_ids or r.env_id in args.env_ids])
    if not runs:
        raise SystemExit(f"no runs with TensorBoard events under {', '.join(map(str, args.runs))}")
    groups: dict[str, dict[str, list[RunData]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(runs, key=lambda r: r.seed):
        groups[run.env_id][run.exp_name].append(run)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for env_id, by_script in sorted(groups.items()):
        published = PUBLISHED_SCORES.get(game_of(env_id), {}) if args.reference_lines else {}
        path = args.out_dir / f"{env_id.replace('/', '-')}.png"
        lines = {column: score for column, (score, _) in published.items()}
        print(f"wrote {plot_env(env_id, by_script, args.spread, args.smooth, path, lines)}")
    scores = {(env_id, exp): final_scores(rs, args.last_episodes)
              for env_id, by_script in groups.items() for exp, rs in by_script.items()}
    markdown = scores_markdown(scores, args.last_episodes, [r.machine for r in runs], args.runs)
    (args.out_dir / "scores.md").write_text(markdown)
    print(f"{markdown}\nwrote {args.out_dir / 'scores.md'}")
    write_json(args.out_dir / "scores.json",
               {"config": {"runs": [str(p) for p in args.runs], "spread": args.spread, "smooth": args.smooth,
                           "last_episodes": args.last_episodes},
                "scores": [{"env_id": env_id, "script": exp, **s} for (env_id, exp), s in sorted(scores.items())],
                "published": PUBLISHED_SCORES, "published_note": PUBLISHED_NOTE})


if __name__ == "__main__":
    main(tyro.cli(Args))
