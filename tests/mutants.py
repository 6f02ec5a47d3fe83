"""Curated mutants (issue 31): each plants one small bug in a temporary copy of the scripts (or a fork recipe) and runs
the tests aimed at it there (pytest -x, tests/test_fingerprint.py excluded), which must fail. Not part of `pytest`.

    python -m tests.mutants            # all; prints mutant, the first failing test, seconds; exit 1 if one survives
    python -m tests.mutants --list     # names and rules;  python -m tests.mutants NAME ...  runs those only

A pattern that no longer occurs exactly once in its file fails the whole check before anything runs, naming the mutant:
rewrite the mutant for the new text rather than dropping it."""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ["dqn_cartpole.py", "dqn_atari.py", "dqn_atari_dueling_per.py", "pytest.ini", "tests", "forks"]
RULES = "tests/test_rules.py::test_"
ATARI_ONLY = "dqn_atari and not dueling"  # -k: dqn_atari.py's cases, not dqn_atari_dueling_per.py's


@dataclass(frozen=True)
class Mutant:
    name: str
    rule: str
    path: str  # the file the edits apply to, from the repository root
    edits: tuple[tuple[str, str], ...]  # (text that must occur exactly once, its replacement)
    tests: tuple[str, ...]  # pytest arguments: the tests aimed at this bug


def mutant(name, rule, path, edits, test, k=None):
    return Mutant(name, rule, path, tuple(edits), (RULES + test,) + (("-k", k) if k else ()))


SYNC = "the_target_syncs_at_each_multiple_of_its_frequency_and_is_frozen_between"
EPSILON = "the_loop_acts_at_the_scheduled_epsilon_and_evaluates_at_its_own"
ATARI_EVAL = "an_atari_evaluation_counts_each_game_once_in_full_unclipped"
ATARI_REPLAY = "the_atari_replay_stores_what_the_env_did_the_serve_included"
CARTPOLE_REPLAY = "the_cartpole_replay_stores_the_executed_action_and_only_terminations_as_dones"
CLIPS = "the_atari_replay_clips_rewards_and_bootstraps_a_truncation"
TD = "the_td_target_is_cut_by_dones_and_discounted_by_the_batchs_discount"
PER_STEP = "per_takes_an_importance_weighted_huber_step_clipped_to_max_grad_norm"
PER_PRIORITIES = "per_writes_back_abs_delta_plus_eps_to_the_alpha_for_the_sampled_rows"
RESTORES = "a_checkpoint_restores_adam_the_rngs_and_the_replay"
CALL_SYNC = "update_target(run.target_network, run.q_network, args.tau)"
SOFT = "target_param.copy_(param) if tau == 1.0 else target_param.lerp_(param, tau)"
MUTANTS = [
    mutant("cartpole_target_never_synced", "target sync", "dqn_cartpole.py", [(CALL_SYNC, "pass")], SYNC,
           "dqn_cartpole"),
    mutant("atari_target_never_synced", "target sync", "dqn_atari.py", [(CALL_SYNC, "pass")], SYNC, ATARI_ONLY),
    mutant("per_sync_ignores_tau", "target sync", "dqn_atari_dueling_per.py",
           [(CALL_SYNC, "update_target(run.target_network, run.q_network, 1.0)")], SYNC, "dueling_per-0.5"),
    mutant("cartpole_soft_update_is_a_copy", "target sync", "dqn_cartpole.py", [(SOFT, "target_param.copy_(param)")],
           "update_target_is_a_hard_copy_at_tau_1_and_a_soft_update_below", "dqn_cartpole"),
    mutant("atari_epsilon_over_all_steps", "epsilon", "dqn_atari.py",
           [("int(args.exploration_fraction * args.total_timesteps)", "args.total_timesteps")], EPSILON, ATARI_ONLY),
    mutant("per_evaluates_at_end_e", "epsilon", "dqn_atari_dueling_per.py",
           [("args.eval_epsilon, args.seed + 1_000_000 + run.global_step",
             "args.end_e, args.seed + 1_000_000 + run.global_step")], EPSILON, "dueling_per"),
    mutant("cartpole_evaluation_greedy", "epsilon", "dqn_cartpole.py",
           [("epsilon_greedy(q_network, obs, epsilon, envs.single_action_space.n, rng, device)",
             "epsilon_greedy(q_network, obs, 0.0, envs.single_action_space.n, rng, device)")],
           "a_cartpole_evaluation_counts_each_episode_once_in_full"),
    mutant("atari_eval_counts_the_next_game", "evaluation", "dqn_atari.py",
           [("returns += rewards * ~finished", "returns += rewards")], ATARI_EVAL, ATARI_ONLY),
    mutant("per_eval_ends_a_game_twice", "evaluation", "dqn_atari_dueling_per.py",
           [("ended = games.ended & ~finished", "ended = games.ended")], ATARI_EVAL, "dueling_per"),
    mutant("cartpole_eval_counts_the_next_episode", "evaluation", "dqn_cartpole.py",
           [("returns += rewards * ~finished", "returns += rewards")],
           "a_cartpole_evaluation_counts_each_episode_once_in_full"),
    mutant("atari_envs_clip_the_score", "evaluation", "dqn_atari.py",
           [("reward_clipping=False", "reward_clipping=True")], "the_atari_envs_report_the_unclipped_score",
           ATARI_ONLY),
    mutant("atari_rewards_stored_unclipped", "replay", "dqn_atari.py",
           [("rewards = np.sign(rewards).astype(np.float32)", "rewards = rewards.astype(np.float32)")], CLIPS,
           ATARI_ONLY),
    mutant("atari_stores_the_agents_action_not_the_serve", "replay", "dqn_atari.py",
           [("actions = games.act(epsilon_greedy(run.q_network, obs, epsilon, n_actions, run.rng, device))",
             "actions = epsilon_greedy(run.q_network, obs, epsilon, n_actions, run.rng, device)"),
            ("envs.send(actions)", "envs.send(games.act(actions))")], ATARI_REPLAY),
    mutant("cartpole_stores_the_greedy_action", "replay", "dqn_cartpole.py",
           [("actions[is_transition], rewards[is_transition]",
             "epsilon_greedy(run.q_network, obs, 0.0, n_actions, run.rng, device)[is_transition], "
             "rewards[is_transition]")], CARTPOLE_REPLAY),
    mutant("atari_truncation_stored_as_done", "replay", "dqn_atari.py",
           [("actions, rewards, terminations, truncations, firsts=games.starts",
             "actions, rewards, terminations | truncations, truncations, firsts=games.starts")], ATARI_REPLAY),
    mutant("per_batch_cuts_at_truncation", "replay", "dqn_atari_dueling_per.py",
           [("terminations[:, 0].float()", "(terminations[:, 0] | truncations[:, 0]).float()")], CLIPS,
           "dueling_per"),
    mutant("cartpole_truncation_stored_as_done", "replay", "dqn_cartpole.py",
           [("terminations[is_transition])", "(terminations | truncations)[is_transition])")], CARTPOLE_REPLAY),
    mutant("atari_td_target_not_cut_by_dones", "TD target", "dqn_atari.py",
           [("return rewards + discounts * target_max * (1 - dones)", "return rewards + discounts * target_max")],
           TD, ATARI_ONLY),
    mutant("cartpole_td_target_fixed_gamma", "TD target", "dqn_cartpole.py",
           [("data.dones, data.discounts)", "data.dones, 0.99)")], TD, "dqn_cartpole"),
    mutant("per_double_argmax_from_the_target", "TD target", "dqn_atari_dueling_per.py",
           [("best_actions = q_network(next_observations)", "best_actions = target_network(next_observations)")],
           "the_double_target_takes_the_online_argmax_and_the_target_value"),
    mutant("per_importance_weights_dropped", "PER wiring", "dqn_atari_dueling_per.py",
           [("loss = (data.weights * F.smooth_l1_loss(q_taken, td_target, reduction=\"none\")).mean()",
             "loss = F.smooth_l1_loss(q_taken, td_target, reduction=\"none\").mean()")], PER_STEP),
    mutant("per_mse_not_huber", "PER wiring", "dqn_atari_dueling_per.py",
           [("F.smooth_l1_loss(q_taken, td_target, reduction=\"none\")",
             "F.mse_loss(q_taken, td_target, reduction=\"none\")")], PER_STEP),
    mutant("per_gradients_not_clipped", "PER wiring", "dqn_atari_dueling_per.py",
           [("nn.utils.clip_grad_norm_(q_network.parameters(), max_grad_norm)", "pass")], PER_STEP),
    mutant("per_priorities_without_eps", "PER wiring", "dqn_atari_dueling_per.py",
           [("priorities = (td_errors.detach().abs().double() + self.eps) ** self.alpha",
             "priorities = td_errors.detach().abs().double() ** self.alpha")], PER_PRIORITIES),
    mutant("per_priorities_on_other_rows", "PER wiring", "dqn_atari_dueling_per.py",
           [("rb.update_priorities(data.indices, td_target - q_taken)",
             "rb.update_priorities(data.indices, (td_target - q_taken).flip(0))")], PER_PRIORITIES),
    mutant("atari_adam_not_restored", "resume", "dqn_atari.py",
           [("self.optimizer.load_state_dict(state[\"optimizer\"])", "pass")], RESTORES, ATARI_ONLY),
    mutant("cartpole_numpy_rng_not_restored", "resume", "dqn_cartpole.py",
           [("self.rng.bit_generator.state = state[\"numpy_rng\"]", "pass")], RESTORES, "dqn_cartpole"),
    mutant("per_torch_rng_not_restored", "resume", "dqn_atari_dueling_per.py",
           [("torch.set_rng_state(state[\"torch_rng\"])", "pass")], RESTORES, "dueling_per"),
    mutant("cartpole_replay_not_restored", "resume", "dqn_cartpole.py",
           [("self.rb.load_state_dict(state[\"replay_buffer\"])", "pass")], RESTORES, "dqn_cartpole"),
    mutant("per_tree_not_restored", "resume", "dqn_atari_dueling_per.py",
           [("self.tree.sums.copy_(state[\"sums\"])", "pass")], RESTORES, "dueling_per-True"),
    mutant("atari_resume_learns_at_once", "resume", "dqn_atari.py", [("or step <= run.learning_from ", "")],
           "a_resume_without_the_replay_refills_learning_starts_steps_before_updating", ATARI_ONLY),
    mutant("per_refill_counted_from_step_0", "resume", "dqn_atari_dueling_per.py",
           [("self.learning_from = self.global_step + self.args.learning_starts",
             "self.learning_from = self.args.learning_starts")], RESTORES, "dueling_per-False"),
    mutant("huber_recipe_is_mse", "forks", "forks/huber.patch",
           [("+    loss = F.smooth_l1_loss(q_taken, td_target)", "+    loss = F.mse_loss(q_taken, td_target)")],
           "the_huber_recipe_takes_a_huber_step"),
    mutant("double_recipe_argmax_from_the_target", "forks", "forks/double_dqn.patch",
           [("+        best_actions = q_network(next_observations)",
             "+        best_actions = target_network(next_observations)")],
           "the_double_recipe_computes_the_double_target"),
]


def pattern_errors(mutants: list[Mutant]) -> list[str]:
    """One line per edit whose text does not occur exactly once in its file (the scripts changed under it)."""
    errors = []
    for m in mutants:
        text = (ROOT / m.path).read_text()
        errors += [f"{m.name}: {old!r} occurs {text.count(old)} times in {m.path}, not once"
                   for old, _ in m.edits if text.count(old) != 1]
    return errors


def run_one(m: Mutant, workdir: Path, timeout: float) -> tuple[str, str, float, str]:
    """Copies the repository's scripts, tests and forks to workdir, applies m's edits and runs its tests; returns
    (outcome: caught, SURVIVED or ERROR; the first failing test id or the output's tail; seconds; its first E line)."""
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, workdir / name)
    path = workdir / m.path
    text = path.read_text()
    for old, new in m.edits:
        text = text.replace(old, new)
    path.write_text(text)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "--basetemp",
           str(workdir / "basetemp"), "--ignore", "tests/test_fingerprint.py", *m.tests]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "WANDB_MODE": "offline"}
    started = time.time()
    try:
        result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "ERROR", f"no result in {timeout:.0f} s", time.time() - started, ""
    seconds, out = time.time() - started, result.stdout + result.stderr
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)
    if result.returncode == 1 and first:
        return "caught", first.group(1), seconds, next((ln for ln in out.splitlines() if ln.startswith("E ")), "")
    if result.returncode == 0:
        return "SURVIVED", "", seconds, ""
    return "ERROR", f"pytest exit {result.returncode}: " + " | ".join(out.strip().splitlines()[-3:]), seconds, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one mutant's tests may take")
    parser.add_argument("--why", action="store_true", help="also print the first error line of each failing test")
    parser.add_argument("--baseline", action="store_true", help="first run each mutant's tests unmutated: all pass")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"error: no mutant named {', '.join(sorted(unknown))} (--list lists them)")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list:
        print("\n".join(f"{m.name:<46} {m.rule:<12} {m.path}" for m in chosen))
        return
    errors = pattern_errors(chosen)
    if errors:
        print("error: mutants whose pattern no longer applies (rewrite them for the new text):", file=sys.stderr)
        print("\n".join(errors), file=sys.stderr)
        raise SystemExit(2)
    if args.baseline:
        for tests in dict.fromkeys(m.tests for m in chosen):
            with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as workdir:
                outcome, detail, *_ = run_one(Mutant("baseline", "", "pytest.ini", (), tests), Path(workdir),
                                             args.timeout)
            if outcome != "SURVIVED":  # unmutated, the tests must pass
                raise SystemExit(f"error: unmutated, {' '.join(tests)} does not pass: {outcome} {detail}")
        print("baseline: every mutant's tests pass on the unmutated copy")
    rows, started = [], time.time()
    print(f"{'mutant':<46} {'rule':<12} {'caught by (first failing test)':<100} {'s':>5}", flush=True)
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as workdir:
            outcome, detail, seconds, why = run_one(m, Path(workdir), args.timeout)
        rows.append(outcome)
        shown = detail if outcome == "caught" else f"{outcome} {detail}".strip()
        print(f"{m.name:<46} {m.rule:<12} {shown:<100} {seconds:>5.0f}" + f"\n    {why}" * args.why, flush=True)
    survived, broken = rows.count("SURVIVED"), rows.count("ERROR")
    print(f"{len(rows)} mutants: {rows.count('caught')} caught, {survived} survived, {broken} errors "
          f"in {time.time() - started:.0f} s")
    if survived or broken:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
