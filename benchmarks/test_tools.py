"""Tests of the benchmark tooling's logic: SPS arithmetic and TensorBoard reading, summary.json reading, IQM and its
bootstrap CI, tables, grid expansion and resume (with a stand-in script that follows the scripts' exit-code and
summary.json protocol, old-layout grid folders included), the submitit job array (run by submitit's debug executor),
plot aggregation, replay-byte counting, and a few-update smoke run of the update-cost harness.
Cheap (seconds); nothing here measures anything.

    python -m pytest benchmarks/test_tools.py
"""

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import atari_short, common, grid, measure, plot
from benchmarks.common import ScalarPoint
from benchmarks.grid import GridPaths, GridSpec


# ---------------------------------------------------------------------------------------------------------------------
# common
# ---------------------------------------------------------------------------------------------------------------------
def write_events(run_dir: Path, td_loss: list[tuple[int, float]], hparams: str | None = None) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    if hparams is not None:
        writer.add_text("hyperparameters", hparams)
    for step, wall in td_loss:
        writer.add_scalar("losses/td_loss", 0.5, step, walltime=wall)
    writer.close()


def test_sps_from_points_uses_first_and_last_point():
    result = common.sps_from_points([(2800, 104.0), (2400, 100.0), (12_000, 196.0)])  # any order
    assert result["sps"] == pytest.approx((12_000 - 2400) / (196.0 - 100.0))
    assert (result["first_step"], result["last_step"], result["points"]) == (2400, 12_000, 3)


@pytest.mark.parametrize("points", [[], [(2400, 1.0)], [(2400, 5.0), (2800, 5.0)]])
def test_sps_from_points_rejects_too_few_or_flat_points(points):
    with pytest.raises(ValueError):
        common.sps_from_points(points)


def test_training_sps_reads_td_loss_event_wall_times(tmp_path):
    write_events(tmp_path, [(2400, 1000.0), (2800, 1004.0), (3200, 1010.0)])
    result = common.training_sps(tmp_path)
    assert result["sps"] == pytest.approx(800 / 10.0)


def test_read_hparams_parses_the_scripts_table(tmp_path):
    write_events(tmp_path, [], "|param|value|\n|-|-|\n|env_id|ALE/Pong-v5|\n|exp_name|dqn_atari|\n|seed|3|")
    assert common.read_hparams(tmp_path) == {"env_id": "ALE/Pong-v5", "exp_name": "dqn_atari", "seed": "3"}


def test_cartpole_solve_reads_the_goal_and_the_run_from_summary_json(tmp_path):
    run_dir = tmp_path / "runs" / "CartPole-v1__dqn_cartpole__1__x"
    run_dir.mkdir(parents=True)
    summary = {"stop_reason": "goal reached", "env_steps": 27500, "gradient_updates": 26500, "wall_s": 33.0,
               "best_eval_return": 480.3, "final_eval_return": 480.3, "goal_score": 475.0,
               "goal_reached_step": 27500, "goal_reached_s": 31.2}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert common.read_summary(run_dir) == summary
    result = measure.solve_result(1, run_dir.name, 40.0, common.read_summary(run_dir))
    assert (result["solved"], result["steps"], result["seconds"], result["eval_mean"]) == (True, 27500, 31.2, 480.3)
    assert result["summary"]["gradient_updates"] == 26500 and result["process_wall_s"] == 40.0
    unsolved = measure.solve_result(2, "r", 50.0, {"stop_reason": "completed", "goal_reached_step": None,
                                                          "goal_reached_s": None, "best_eval_return": None})
    assert not unsolved["solved"] and unsolved["steps"] is None and unsolved["eval_mean"] is None
    assert common.read_summary(tmp_path / "runs" / "absent") == {}  # a run that has not ended yet
    summary = measure.solve_summary([result, unsolved, {**result, "steps": 5000, "seconds": 6.0}])
    assert (summary["seeds"], summary["solved"], summary["median_steps"], summary["min_seconds"]) == (3, 2, 16250, 6.0)


def test_iqm_and_bootstrap_ci_match_rliable_on_known_numbers():
    # rliable 1.2.0 (get_interval_estimates, aggregate_iqm, 2000 reps) gives 2.5 [1, 10] and 12 [11, 13] here
    assert common.iqm(np.array([1.0, 2.0, 3.0, 10.0])) == 2.5  # the middle two of four
    assert common.iqm(np.arange(1.0, 9.0)) == 4.5 and common.iqm(np.array([11.0, 12.0, 13.0])) == 12.0
    ci = common.iqm_ci([1.0, 2.0, 3.0, 10.0])
    assert (ci["iqm"], ci["ci_low"], ci["ci_high"], ci["n"]) == (2.5, 1.0, 10.0, 4)
    assert (common.iqm_ci([11.0, 12.0, 13.0])["ci_low"], common.iqm_ci([11.0, 12.0, 13.0])["ci_high"]) == (11.0, 13.0)
    assert common.iqm_ci([5.0, 5.0])["ci_low"] == common.iqm_ci([5.0, 5.0])["ci_high"] == 5.0
    assert common.iqm_ci([0, 10, 20, 30, 40, 100]) == common.iqm_ci([0, 10, 20, 30, 40, 100])  # seeded: reproducible


def test_format_table_aligns_numbers_right_and_marks_missing():
    table = common.format_table(["name", "sps"], [["a", 1234.5], ["bb", None]]).splitlines()
    assert table[0] == "| name   |     sps |"
    assert table[1] == "|:-------|--------:|"
    assert table[2] == "| a      | 1,234.5 |" and table[3] == "| bb     |       - |"
    # a column of None only, NaN, number-like strings (kept as given), ints; no rows at all
    table = common.format_table(["ms", "x", "seeds", "n"], [[None, float("nan"), "2.00", 1000], [None, 3.25, "1 2", 2]])
    assert table.splitlines()[1:] == ["|-----:|----:|:--------|------:|", "|    - |   - | 2.00    | 1,000 |",
                                      "|    - | 3.2 | 1 2     |     2 |"]
    assert common.format_table(["a", "b"], []).splitlines()[0] == "| a   | b   |"


def test_run_name_follows_the_scripts_pattern():
    assert common.run_name_for("ALE/Pong-v5", "dqn_atari.py", 2, "g1") == "ALE-Pong-v5__dqn_atari__2__g1"
    with pytest.raises(ValueError):
        common.run_name_for("CartPole-v1", "dqn_cartpole.py", 1, "bad name")


def test_flags_after_a_lone_double_dash_go_to_the_scripts():
    import tyro

    args = tyro.cli(grid.Args, args=["--name", "g", "--seeds", "1", "2", "--", "--total-timesteps", "5", "--cuda"])
    assert (args.name, args.seeds, args.extra) == ("g", (1, 2), ("--total-timesteps", "5", "--cuda"))
    assert tyro.cli(grid.Args, args=["--name", "g"]).extra == ()
    solve = tyro.cli(measure.CartpoleSolve, args=["--seeds", "1", "--", "--learning-rate", "5e-4"])
    assert (solve.seeds, solve.script_flags) == ((1,), ("--learning-rate", "5e-4"))


def test_atari_flags_evaluate_only_at_the_end_without_periodic_checkpoints():
    flags = measure.AtariBenchConfig(total_timesteps=12_000, num_envs=4, cuda=True).script_flags("r")
    pairs = dict(zip(flags[::2], flags[1::2]))  # flag -> value, except the final --cuda
    assert pairs["--buffer-size"] == "12000" and pairs["--num-envs"] == "4" and pairs["--eval-frequency"] == "0"
    assert pairs["--checkpoint-frequency"] == "0" and pairs["--eval-episodes"] == "1" and flags[-1] == "--cuda"
    graphed = measure.AtariBenchConfig(cuda=True, cudagraphs=True, compile=True).script_flags("r")
    assert graphed[-3:] == ["--cuda", "--cudagraphs", "--compile"]
    with pytest.raises(SystemExit, match="need --cuda"):  # the scripts would ignore them: no number for a CPU run
        measure.AtariBenchConfig(cudagraphs=True)
    with pytest.raises(SystemExit, match="needs --cuda"):
        measure.UpdateCost(cudagraphs=True)


def test_gpu_check_script_parses_and_finds_the_protocol():
    """gpu_check.sh runs only on a lent GPU: here at least its syntax, and the protocol flags it reads."""
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=common.REPO_ROOT).returncode == 0
    assert "--no-cuda" in common.PROTOCOL and "--checkpoint-buffer" in common.PROTOCOL  # it replaces both
    # the device has no matplotlib or tabulate: the protocol must come from a module that imports neither
    blocked = ("import sys; sys.modules['matplotlib'] = sys.modules['tabulate'] = None; "
               "from benchmarks.common import PROTOCOL; print(*PROTOCOL)")
    printed = subprocess.run([sys.executable, "-c", blocked], cwd=common.REPO_ROOT, capture_output=True, text=True)
    assert printed.stdout.split() == list(common.PROTOCOL), printed.stderr


# ---------------------------------------------------------------------------------------------------------------------
# grid
# ---------------------------------------------------------------------------------------------------------------------
def spec(**kwargs) -> GridSpec:
    base = dict(name="g1", scripts=("dqn_atari.py",), env_ids=("BreakoutNoFrameskip-v4", "ALE/Pong-v5"),
                seeds=(1, 2), extra=("--total-timesteps", "1000"))
    return GridSpec(**{**base, **kwargs})


def test_expand_grid_order_indices_and_names():
    cells = grid.expand_grid(spec(scripts=("dqn_atari.py", "dqn_atari_dueling_per.py")))
    assert [c.index for c in cells] == list(range(8))
    assert (cells[0].script, cells[0].env_id, cells[0].seed) == ("dqn_atari.py", "BreakoutNoFrameskip-v4", 1)
    assert (cells[3].env_id, cells[3].seed) == ("ALE/Pong-v5", 2)
    assert cells[4].run_name == "BreakoutNoFrameskip-v4__dqn_atari_dueling_per__1__g1"
    assert len({c.run_name for c in cells}) == 8


def test_validate_spec_reports_problems():
    assert grid.validate_spec(spec()) == []
    problems = grid.validate_spec(spec(name="a__b", seeds=(1, 1), scripts=("nope.py",),
                                       extra=("--seed", "3", "--run-name=x", "--total-timesteps", "5")))
    text = " ".join(problems)
    assert "--name" in text and "duplicates" in text and "nope.py does not exist" in text
    assert "--seed is set by the grid" in text and "--run-name is set by the grid" in text
    assert "--total-timesteps" not in text


def test_spec_json_roundtrip_and_mismatch(tmp_path):
    paths = GridPaths(tmp_path / "g1")
    created = grid.load_or_create_spec(paths, spec())
    assert json.loads(paths.spec.read_text())["seeds"] == [1, 2]
    assert grid.load_or_create_spec(paths, None) == created  # --name alone resumes
    with pytest.raises(SystemExit, match="another spec"):
        grid.load_or_create_spec(paths, spec(seeds=(1, 2, 3)))
    with pytest.raises(SystemExit, match="no grid"):
        grid.load_or_create_spec(GridPaths(tmp_path / "other"), None)


@pytest.mark.parametrize("done, checkpoint, failures, expected", [
    (True, True, 0, grid.SKIP_DONE), (True, False, 5, grid.SKIP_DONE), (False, True, 0, grid.RESUME),
    (False, False, 0, grid.START), (False, True, 3, grid.SKIP_FAILED), (False, False, 2, grid.START)])
def test_plan_cell(done, checkpoint, failures, expected):
    assert grid.plan_cell(done, checkpoint, failures, max_attempts=3) == expected
    # a run stopped by a non-finite loss is not retried: its resume would replay the same updates into the same NaN
    assert grid.plan_cell(done, checkpoint, failures, max_attempts=3, diverged=True) == (
        grid.SKIP_DONE if done else grid.SKIP_DIVERGED)


@pytest.mark.parametrize("code, outcome", [(0, "done"), (130, "interrupted"), (143, "interrupted"),
                                           (-15, "interrupted"), (-2, "interrupted"), (1, "failed"), (2, "failed"),
                                           (-9, "failed"), (137, "failed")])
def test_classify_exit(code, outcome):
    assert grid.classify_exit(code) == outcome


def test_cell_command_resume_and_track():
    s = spec(track=True, wandb_project_name="proj", wandb_entity="team")
    cell = grid.expand_grid(s)[0]
    command = grid.cell_command("py", s, cell, resume=True)
    assert command[:2] == ["py", str(common.REPO_ROOT / "dqn_atari.py")]
    joined = " ".join(command)
    assert f"--run-name {cell.run_name} --total-timesteps 1000" in joined
    assert f"--resume runs/{cell.run_name}/checkpoint.pt" in joined
    assert "--track --wandb-project-name proj --wandb-group g1 --wandb-entity team" in joined
    assert "--resume" not in grid.cell_command("py", spec(), cell, resume=False)
    assert "--track" not in grid.cell_command("py", spec(), cell, resume=False)


@pytest.mark.parametrize("reason, done", [("completed", True), ("goal reached", True), ("signal SIGINT", False),
                                          ("signal SIGTERM", False), ("non-finite loss at step 7", False)])
def test_a_cell_is_done_when_its_summary_says_so(tmp_path, reason, done):
    paths = GridPaths(tmp_path)
    cell = grid.expand_grid(spec())[0]
    assert not paths.done(cell)  # no summary.json yet: the run has not ended
    paths.run_dir(cell).mkdir(parents=True)
    (paths.run_dir(cell) / "summary.json").write_text(json.dumps({"stop_reason": reason}))
    assert paths.done(cell) is done
    assert (grid.plan(paths, cell, max_attempts=3) == grid.SKIP_DIVERGED) is reason.startswith("non-finite")


FAKE_SCRIPT = textwrap.dedent("""
    # Stands in for a DQN script: records its argv; by $FAKE_EXIT: 0 = completes, 143 = stopped by SIGTERM,
    # 1 = crashes before any checkpoint, wait = runs until SIGINT; a checkpoint and summary.json as the scripts write.
    import json, os, signal, sys, time
    args = sys.argv[1:]
    run = os.path.join("runs", args[args.index("--run-name") + 1])
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "argv.txt"), "a") as f:
        f.write(" ".join(args) + "\\n")

    def end(code, reason):
        open(os.path.join(run, "checkpoint.pt"), "w").close()
        with open(os.path.join(run, "summary.json"), "w") as f:
            json.dump({"stop_reason": reason, "resumed_from": "--resume" in args}, f)
        sys.exit(code)

    mode = os.environ["FAKE_EXIT"]
    if mode == "wait":
        signal.signal(signal.SIGINT, lambda *_: end(130, "signal SIGINT"))
        open(os.path.join(run, "started"), "w").close()
        time.sleep(60)
        sys.exit(3)
    if mode in ("0", "143"):
        end(int(mode), "completed" if mode == "0" else "signal SIGTERM")
    sys.exit(int(mode))
""")


@pytest.fixture
def fake_grid(tmp_path):
    script = tmp_path / "fake_dqn.py"
    script.write_text(FAKE_SCRIPT)
    s = GridSpec("fake", (str(script),), ("CartPole-v1",), (1,), ("--total-timesteps", "10"))
    paths = GridPaths(tmp_path / "grids" / "fake")
    grid.load_or_create_spec(paths, s)
    return grid.Runner(s, paths, sys.executable, max_attempts=2), grid.expand_grid(s)[0]


def argv_lines(paths: GridPaths, cell: grid.Cell) -> list[str]:
    return (paths.run_dir(cell) / "argv.txt").read_text().splitlines()


def test_runner_resumes_an_interrupted_cell_and_then_skips_it(fake_grid, monkeypatch):
    runner, cell = fake_grid
    paths = runner.paths
    monkeypatch.setenv("FAKE_EXIT", "143")  # stopped by SIGTERM: checkpointed, summary says so
    assert runner.run_cell(cell, 1) == "interrupted"
    assert paths.checkpoint(cell).exists() and not paths.done(cell)
    state = json.loads(paths.state(cell).read_text())
    assert (state["status"], state["attempts"], state["failures"], state["returncode"]) == ("interrupted", 1, 0, 143)

    monkeypatch.setenv("FAKE_EXIT", "0")
    assert runner.run_cell(cell, 1) == "done"
    argv = argv_lines(paths, cell)
    assert "--resume" not in argv[0] and f"--resume runs/{cell.run_name}/checkpoint.pt" in argv[1]
    assert paths.done(cell) and common.read_summary(paths.run_dir(cell))["stop_reason"] == "completed"
    assert runner.run_cell(cell, 1) == grid.SKIP_DONE
    assert len(argv_lines(paths, cell)) == 2  # not run again
    assert paths.log(cell).read_text().count("=== attempt") == 2
    done = json.loads(paths.state(cell).read_text())
    assert done["wall_s"] > done["ended"] - done["started"] > 0  # both attempts' time, not only the last one's
    assert done["git"]["commit"]


def test_runner_counts_failures_and_moves_a_checkpointless_attempt_aside(fake_grid, monkeypatch):
    runner, cell = fake_grid
    monkeypatch.setenv("FAKE_EXIT", "1")  # a crash before any checkpoint
    assert runner.run_cell(cell, 1) == "failed"
    assert runner.paths.run_dir(cell).exists() and not runner.paths.checkpoint(cell).exists()
    assert runner.run_cell(cell, 1) == "failed"  # restarted from scratch: the first attempt's folder moved aside
    assert len(list((runner.paths.root / "stale").iterdir())) == 1
    assert json.loads(runner.paths.state(cell).read_text())["failures"] == 2
    assert runner.run_cell(cell, 1) == grid.SKIP_FAILED  # max_attempts=2
    assert not runner.paths.done(cell)


def test_runner_starts_nothing_after_a_stop(fake_grid, monkeypatch):
    runner, cell = fake_grid
    monkeypatch.setenv("FAKE_EXIT", "0")
    runner.stop.set()
    assert runner.run_cell(cell, 1) == "not started"
    assert not runner.paths.run_dir(cell).exists()


def start_waiting_cell(runner: grid.Runner, cell: grid.Cell) -> tuple[threading.Thread, dict]:
    """Runs the cell on a thread (as run_cells does) with a script that runs until SIGINT; returns once it runs."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(outcome=runner.run_cell(cell, 1)))
    thread.start()
    deadline = time.time() + 30
    while not (runner.paths.run_dir(cell) / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    return thread, result


def test_a_stop_is_forwarded_so_the_script_checkpoints_and_the_cell_resumes(fake_grid, monkeypatch):
    runner, cell = fake_grid
    monkeypatch.setenv("FAKE_EXIT", "wait")
    thread, result = start_waiting_cell(runner, cell)
    runner.request_stop(signal.SIGTERM)  # what Ctrl-C or SIGTERM to the grid does
    thread.join(30)
    assert result["outcome"] == "interrupted" and runner.paths.checkpoint(cell).exists()
    assert common.read_summary(runner.paths.run_dir(cell))["stop_reason"] == "signal SIGINT"
    assert grid.plan(runner.paths, cell, 2) == grid.RESUME


def test_slurm_task_checkpoints_and_requeues_into_a_resumed_run(fake_grid, monkeypatch):
    runner, cell = fake_grid
    monkeypatch.setenv("FAKE_EXIT", "wait")
    task = grid.SlurmTask()
    task.runner = grid.Runner(runner.spec, runner.paths, sys.executable, 2, slurm=True)
    thread, result = start_waiting_cell(task.runner, cell)
    args = (str(runner.paths.root), cell.index, 2, sys.executable)
    requeued = task.checkpoint(*args)  # what submitit calls on Slurm's SIGUSR2 before the time limit
    thread.join(30)
    assert result["outcome"] == "interrupted" and runner.paths.checkpoint(cell).exists()
    assert isinstance(requeued.function, grid.SlurmTask) and requeued.args == args
    monkeypatch.setenv("FAKE_EXIT", "0")
    assert requeued.result() == "done"  # the requeued task: the same cell, resumed
    assert f"--resume runs/{cell.run_name}/checkpoint.pt" in argv_lines(runner.paths, cell)[1]


def test_slurm_submits_the_unfinished_cells_as_one_submitit_job_array(tmp_path, monkeypatch):
    import submitit

    script = tmp_path / "fake_dqn.py"
    script.write_text(FAKE_SCRIPT)
    given = GridSpec("g2", (str(script),), ("CartPole-v1",), (1, 2, 3), ("--total-timesteps", "10"))
    paths = GridPaths(tmp_path / "grids" / "g2")
    grid.load_or_create_spec(paths, given)
    first = grid.expand_grid(given)[0]
    paths.run_dir(first).mkdir(parents=True)
    (paths.run_dir(first) / "summary.json").write_text(json.dumps({"stop_reason": "completed"}))
    recorded: dict = {}

    class Executor(submitit.AutoExecutor):  # submitit's own debug executor (runs the tasks here), recording
        def __init__(self, folder, cluster, **kwargs):
            recorded.update(cluster=cluster, folder=folder, **kwargs)
            super().__init__(folder, cluster="debug", **kwargs)

        def update_parameters(self, **kwargs):
            recorded.update(kwargs)
            super().update_parameters(**kwargs)  # slurm_* names are checked against the Slurm executor's

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    monkeypatch.setenv("FAKE_EXIT", "0")
    args = grid.Args(name="g2", root=tmp_path / "grids", slurm=True, slurm_partition="gpu", slurm_max_parallel=2,
                     slurm_directive=("account=rl",))
    assert grid.main(args) == 0
    assert recorded["cluster"] == "slurm" and recorded["folder"] == paths.root / "slurm" / "%j"
    assert (recorded["slurm_partition"], recorded["gpus_per_node"], recorded["slurm_array_parallelism"]) == (
        "gpu", 1, 2)
    assert recorded["slurm_signal_delay_s"] == 300 and recorded["slurm_additional_parameters"] == {"account": "rl"}
    assert recorded["timeout_min"] == 2880 and recorded["slurm_max_num_timeout"] == 20
    jobs = grid.submit(paths, [c for c in grid.expand_grid(given) if not paths.done(c)], args)
    assert len(jobs) == 2 and [job.result() for job in jobs] == ["done", "done"]  # the cell already done: not in it
    assert not (paths.run_dir(first) / "argv.txt").exists()
    assert all(paths.done(c) for c in grid.expand_grid(given))


# ---------------------------------------------------------------------------------------------------------------------
# atari_short
# ---------------------------------------------------------------------------------------------------------------------
def test_atari_short_cells_and_sps_without_pauses():
    cells = atari_short.wanted_cells("BreakoutNoFrameskip-v4")
    assert [(c.script, c.seed) for c in cells] == [("dqn_atari.py", 1), ("dqn_atari.py", 2), ("dqn_atari.py", 3),
                                                   ("dqn_atari_dueling_per.py", 1), ("dqn_atari_dueling_per.py", 2),
                                                   ("dqn_atari_dueling_per.py", 3)]
    assert all(c.run_name.endswith("__atari_short_breakout_after_issue22") for c in cells)  # no pre-fix cell counts
    # 100 steps/s while training; the 998 s pause (a resumption) is left out
    points = [(0, 0.0), (100, 1.0), (200, 2.0), (300, 1000.0), (400, 1001.0)]
    assert common.sps_from_points(points, max_gap=atari_short.GAP_S)["sps"] == 100.0


def test_atari_short_skips_recorded_cells_reports_and_refuses_another_protocol(tmp_path, capsys):
    runs = [{"script": c.script, "env_id": c.env_id, "seed": c.seed, "final_eval_return": 10.0 + c.seed,
             "eval": [[50_000, 1.0], [100_000, 10.0 + c.seed]]}
            for env_id in atari_short.PLAN for c in atari_short.wanted_cells(env_id)]
    runs += [{"script": "stable-baselines3 2.9.2 DQN", "env_id": env_id, "seed": seed, "final_eval_return": 8.0,
              "eval": [[50_000, 2.0], [100_000, 8.0]]} for env_id, seed in atari_short.SB3_CELLS]
    out = tmp_path / "atari_short.json"
    record = {"protocol": {"flags": list(atari_short.PROTOCOL)}, "random": {e: {"mean": 2.0} for e in atari_short.PLAN},
              "runs": runs}
    out.write_text(json.dumps(record))
    assert atari_short.main(atari_short.Args(dry_run=True, out=out)) == 0
    assert "to run: nothing" in capsys.readouterr().out
    empty = tmp_path / "empty.json"  # --only: one implementation's missing cells
    assert atari_short.main(atari_short.Args(dry_run=True, out=empty, only="sb3")) == 0
    sb3_cells = ", ".join(f"SB3 {env_id} seed {seed}" for env_id, seed in atari_short.SB3_CELLS)
    assert capsys.readouterr().out.strip() == "to run: " + sb3_cells
    assert ("BreakoutNoFrameskip-v4", 3) in atari_short.SB3_CELLS  # issue #22: three SB3 Breakout seeds
    assert atari_short.main(atari_short.Args(dry_run=True, out=empty, only="dqn_atari_dueling_per.py")) == 0
    assert capsys.readouterr().out.count("__dqn_atari_dueling_per__") == 5
    assert atari_short.main(atari_short.Args(record_only=True, out=out)) == 0  # nothing to record: table and plot
    lines = (tmp_path / "atari_short.md").read_text().splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    row = dict(zip(cells(lines[0]), cells(next(line for line in lines if "| dqn_atari.py " in line))))
    # seeds, final mean +- std, IQM and its bootstrap CI, per seed, random, mean / random, worst seed / random, the bar
    assert [row[k] for k in ("seeds", "final eval return (mean +- std)", "IQM", "95% CI of IQM", "per seed", "random",
                             "mean / random", "worst seed / random", "bar")] == [
        "1 2 3", "12.0 +- 0.8", "12.0", "[11.0, 13.0]", "11.0, 12.0, 13.0", "2.00", "6.0x", "5.5x", "5x"]
    assert (tmp_path / "atari_short_Breakout.png").stat().st_size > 0
    assert json.loads(out.read_text())["runs"] == runs  # the record is left as it was
    out.write_text(json.dumps({**record, "protocol": {"flags": ["--total-timesteps", "1"]}}))
    assert atari_short.main(atari_short.Args(out=out)) == 2
    assert "other protocol flags" in capsys.readouterr().err


def test_atari_short_draws_every_implementation_with_its_training_games(tmp_path, monkeypatch):
    games = [[step, step / 10_000] for step in range(1_000, 200_000, 1_000)]  # (env step a game ended at, its score)
    run = lambda script, seed: {"script": script, "env_id": "BreakoutNoFrameskip-v4", "seed": seed,  # noqa: E731
                                "games": games, "eval": [[s, seed * s / 50_000] for s in (50_000, 100_000, 200_000)]}
    data = {"random": {"BreakoutNoFrameskip-v4": {"mean": 1.0}},
            "runs": [run("stable-baselines3 2.9.2 DQN", 2), run("dqn_atari.py", 2), run("dqn_atari.py", 1)]}
    groups = atari_short.by_implementation(data, "BreakoutNoFrameskip-v4")
    assert list(groups) == ["dqn_atari.py", "stable-baselines3 2.9.2 DQN"]
    assert [r.seed for r in groups["dqn_atari.py"]] == [1, 2]  # seed order, whatever the record's order
    sb3 = groups["stable-baselines3 2.9.2 DQN"][0]
    assert sb3.eval[-1] == ScalarPoint(200_000, 0.0, 8.0) and [p.value for p in sb3.train] == [g[1] for g in games]
    figures = []
    save = plot.Figure.savefig
    monkeypatch.setattr(plot.Figure, "savefig", lambda fig, path: (figures.append(fig), save(fig, path)))
    path = atari_short.plot(data, "BreakoutNoFrameskip-v4", tmp_path / "atari_short.json")
    assert path == tmp_path / "atari_short_Breakout.png" and path.stat().st_size > 0
    evals, train = figures[0].axes
    labels = lambda ax: [t.get_text() for t in ax.get_legend().get_texts()]  # noqa: E731
    assert labels(evals) == labels(train) == ["dqn_atari.py (2 seeds)", "stable-baselines3 2.9.2 DQN (1 seed)"]
    assert [line.get_ydata()[0] for line in evals.lines][-1] == 1.0  # the random policy, dashed
    assert max(train.lines[0].get_ydata()) > 15  # the training games' moving mean climbs with the scores


# ---------------------------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------------------------
def test_identify_from_hyperparameters_or_the_run_name():
    assert plot.identify(Path("ALE-Pong-v5__dqn_atari__3__1700000000"), {}) == ("ALE-Pong-v5", "dqn_atari", 3)
    assert plot.identify(Path("sps-run"), {}) is None and plot.identify(Path("a__b__c"), {}) is None
    run = Path("BreakoutNoFrameskip-v4__dqn_atari__2__g")
    assert plot.identify(run, {}) == ("BreakoutNoFrameskip-v4", "dqn_atari", 2)
    assert plot.identify(run, {"env_id": "ALE/Pong-v5", "exp_name": "x", "seed": "7"}) == ("ALE/Pong-v5", "x", 7)


def test_find_run_dirs_skips_wandb_and_stale(tmp_path):
    for d in ["runs/a", "runs/b/wandb/x", "stale/c", "runs/d"]:
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "events.out.tfevents.1.host").write_bytes(b"")
    assert plot.find_run_dirs([tmp_path]) == [tmp_path / "runs/a", tmp_path / "runs/d"]


def test_aggregate_std_and_minmax_on_the_common_steps():
    a = (np.array([0, 10, 20]), np.array([0.0, 10.0, 20.0]))
    b = (np.array([5, 10, 30]), np.array([5.0, 20.0, 40.0]))  # covers 5..30: the common range is 5..20
    grid_, mean, lo, hi = plot.aggregate([a, b], "std", num=4)
    np.testing.assert_allclose(grid_, [5, 10, 15, 20])
    np.testing.assert_allclose(mean, [5.0, 15.0, 20.0, 25.0])  # b at 15 and 20: 25, 30
    np.testing.assert_allclose(hi - mean, [0.0, 5.0, 5.0, 5.0])
    _, _, lo, hi = plot.aggregate([a, b], "minmax", num=4)
    np.testing.assert_allclose(lo, [5, 10, 15, 20])
    np.testing.assert_allclose(hi, [5, 20, 25, 30])
    assert plot.aggregate([(np.array([0, 1]), np.zeros(2)), (np.array([5, 6]), np.zeros(2))], "std") is None
    single = plot.aggregate([(np.array([100]), np.array([1.0])), (np.array([100]), np.array([3.0]))], "std")
    assert list(single[0]) == [100] and list(single[1]) == [2.0]


def test_moving_average():
    steps, values = plot.moving_average(np.arange(10), np.arange(10, dtype=float), window=2)
    assert list(steps) == list(range(1, 10)) and values[0] == 0.5
    steps, values = plot.moving_average(np.arange(3), np.array([1.0, 2.0, 3.0]), window=20)  # short: raw
    assert list(values) == [1.0, 2.0, 3.0]


def test_game_of_and_final_scores():
    assert plot.game_of("BreakoutNoFrameskip-v4") == "Breakout" and plot.game_of("ALE/BeamRider-v5") == "BeamRider"
    runs = [plot.RunData(Path(f"r{s}"), "PongNoFrameskip-v4", "dqn_atari", s,
                         [ScalarPoint(100, 0.0, -21.0), ScalarPoint(200, 0.0, float(v))],
                         [ScalarPoint(i, 0.0, float(i)) for i in range(1, 5)], None) for s, v in [(1, 10), (2, 20)]]
    scores = plot.final_scores(runs, last_episodes=2)
    assert scores["final_eval"] == {"mean": 15.0, "std": 5.0, "n": 2}
    assert scores["train_last"]["mean"] == 3.5 and scores["steps"] == (200, 200)
    assert (scores["final_eval_iqm"]["iqm"], scores["final_eval_iqm"]["ci_low"]) == (15.0, 10.0)
    text = plot.scores_markdown({("PongNoFrameskip-v4", "dqn_atari"): scores}, 2, [None, None], [Path("runs")])
    assert "15.0 +- 5.0" in text and "20.25 +- 0.41" in text and "18.9 +- 1.3" in text
    assert re.search(r"\| 15\.0 +\| \[10\.0, 20\.0\] +\|", text) and "IQM" in text  # IQM and its bootstrap CI
    assert "2 of 2 runs have no record" in text


def test_dedupe_keeps_the_longest_run():
    short = plot.RunData(Path("a"), "E", "x", 1, [ScalarPoint(10, 0, 1)], [], None)
    long = plot.RunData(Path("b"), "E", "x", 1, [ScalarPoint(99, 0, 1)], [], None)
    other = plot.RunData(Path("c"), "E", "x", 2, [], [], None)
    assert {r.run_dir for r in plot.dedupe([short, long, other])} == {Path("b"), Path("c")}


# ---------------------------------------------------------------------------------------------------------------------
# memory and the update-cost harness (these import the scripts: they fail if the scripts' APIs drift)
# ---------------------------------------------------------------------------------------------------------------------
def test_tensor_bytes_counts_each_storage_once():
    class Holder:
        def __init__(self):
            self.a = torch.zeros(10, dtype=torch.uint8)
            self.view = self.a[2:5]
            self.nested = {"b": [torch.zeros(4, dtype=torch.float32)]}
            self.again = self.nested
            self.n = 3

    assert measure.tensor_bytes(Holder()) == 10 + 16


@pytest.mark.parametrize("script", common.ATARI_SCRIPTS)
def test_replay_bytes_matches_the_scripts_bytes_needed(script):
    result = measure.replay_bytes(script, capacity=1_000, num_envs=1, full_capacity=1_000_000)
    # the PER buffer also holds a scalar max priority (8 bytes) that bytes_needed leaves out
    assert 0 <= result["allocated_bytes"] - result["bytes_needed_at_capacity"] <= 8
    assert 7_000 < result["bytes_per_transition"] < 7_200


@pytest.mark.parametrize("script", common.ATARI_SCRIPTS)
def test_update_cost_harness_takes_updates(script, monkeypatch):
    """Each timed call is one real update of the script's own train_step: it moves the online network."""
    mod, steps = common.load_script(script), []
    train_step = mod.train_step

    def counted(q_network, *rest):
        before = [p.detach().clone() for p in q_network.parameters()]
        stats = train_step(q_network, *rest)
        steps.append(any(not torch.equal(b, p) for b, p in zip(before, q_network.parameters())))
        return stats
    monkeypatch.setattr(mod, "train_step", counted)
    monkeypatch.setattr(measure, "load_script", lambda name: mod)
    result = measure.UpdateCost(script, capacity=64, iters=2).measure(warmup=1, blocks=2)
    assert result["iters"] == 2 and result["seconds_per_update"] > 0 and result["n_actions"] == 4
    assert len(steps) >= 1 + 2 and all(steps)  # the warm-up and the timed ones (Timer adds its own warm-up calls)
