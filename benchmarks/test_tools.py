"""Tests of the benchmark tooling's logic: SPS arithmetic and TensorBoard reading, output parsing, tables, grid
expansion, resume bookkeeping (with a stand-in script that follows the scripts' exit-code protocol), sbatch
generation, plot aggregation, replay-byte counting, and a few-update smoke run of the update-cost harness.
Cheap (seconds); nothing here measures anything.

    python -m pytest benchmarks/test_tools.py
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import atari_short, common, grid, memory, plot
from benchmarks.common import ScalarPoint
from benchmarks.grid import Action, GridPaths, GridSpec


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


def test_parse_finished_and_goal_lines():
    output = ("step 2500: eval return 9.50 +- 0.50\n"
              "goal reached: eval mean 480.30 >= 475.0 at step 27500 after 31.2s\n"
              "finished CartPole-v1__dqn_cartpole__1__x: 27500 steps, 26500 gradient updates, 26500 target syncs "
              "in 33.0s; best eval return 480.30\n")
    assert common.parse_goal(output) == {"eval_mean": 480.3, "goal": 475.0, "step": 27500, "seconds": 31.2}
    finished = common.parse_finished(output)
    assert finished["steps"] == 27500 and finished["gradient_updates"] == 26500 and finished["seconds"] == 33.0
    assert common.parse_finished("finished r: 1 steps, 0 gradient updates, 0 target syncs in 0.1s; "
                                 "best eval return -inf")["best_eval_return"] == float("-inf")
    assert common.parse_goal("finished ...") is None and common.parse_finished("error: x") is None


def test_format_table_aligns_numbers_right_and_marks_missing():
    table = common.format_table(["name", "sps"], [["a", 1234.5], ["bb", None]]).splitlines()
    assert table[0] == "| name |     sps |"
    assert table[1] == "|------|--------:|"
    assert table[2] == "| a    | 1,234.5 |" and table[3] == "| bb   |       - |"


def test_run_name_follows_the_scripts_pattern():
    assert common.run_name_for("ALE/Pong-v5", "dqn_atari.py", 2, "g1") == "ALE-Pong-v5__dqn_atari__2__g1"
    with pytest.raises(ValueError):
        common.run_name_for("CartPole-v1", "dqn_cartpole.py", 1, "bad name")


def test_split_passthrough():
    assert common.split_passthrough(["--name", "g", "--", "--total-timesteps", "5"]) == (
        ["--name", "g"], ["--total-timesteps", "5"])
    assert common.split_passthrough(["--name", "g"]) == (["--name", "g"], [])


def test_atari_flags_evaluate_only_at_the_end_without_periodic_checkpoints():
    flags = common.AtariBenchConfig(total_timesteps=12_000, num_envs=4, cuda=True).script_flags("r")
    pairs = dict(zip(flags[::2], flags[1::2]))  # flag -> value, except the final --cuda
    assert pairs["--buffer-size"] == "12000" and pairs["--num-envs"] == "4" and pairs["--eval-frequency"] == "0"
    assert pairs["--checkpoint-frequency"] == "0" and pairs["--eval-episodes"] == "1" and flags[-1] == "--cuda"


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
    assert GridSpec.from_json(paths.spec.read_text()) == created
    assert grid.load_or_create_spec(paths, None) == created  # --name alone resumes
    with pytest.raises(SystemExit, match="another spec"):
        grid.load_or_create_spec(paths, spec(seeds=(1, 2, 3)))
    with pytest.raises(SystemExit, match="no grid"):
        grid.load_or_create_spec(GridPaths(tmp_path / "other"), None)


@pytest.mark.parametrize("done, checkpoint, failures, expected", [
    (True, True, 0, Action.SKIP_DONE), (True, False, 5, Action.SKIP_DONE), (False, True, 0, Action.RESUME),
    (False, False, 0, Action.START), (False, True, 3, Action.SKIP_FAILED), (False, False, 2, Action.START)])
def test_plan_cell(done, checkpoint, failures, expected):
    assert grid.plan_cell(done, checkpoint, failures, max_attempts=3) is expected


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


def test_array_ranges():
    assert grid.array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert grid.array_ranges([3]) == "3" and grid.array_ranges([2, 1, 1, 0]) == "0-2"


def test_sbatch_script(tmp_path):
    s = spec()
    paths = GridPaths(tmp_path / "g1")
    text = grid.sbatch_script(s, paths, [0, 1, 3], "/venv/bin/python", 3,
                              grid.SlurmOptions(partition="gpu", gpus=1, max_parallel=2, directives=("--account=rl",)))
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --array=0-1,3%2" in lines and "#SBATCH --job-name=g1" in lines
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH --partition=gpu" in lines and "#SBATCH --account=rl" in lines
    assert "#SBATCH --signal=B:TERM@300" in lines
    assert lines[-1] == (f"exec /venv/bin/python -m benchmarks.grid --name g1 --root {tmp_path.resolve()} "
                         "--max-attempts 3 --cell \"$SLURM_ARRAY_TASK_ID\"")
    no_gpu = grid.sbatch_script(s, paths, [0], "python", 3, grid.SlurmOptions(gpus=0))
    assert "--gres" not in no_gpu and "--partition" not in no_gpu and "#SBATCH --array=0\n" in no_gpu


FAKE_SCRIPT = textwrap.dedent("""
    # Stands in for a DQN script: records its argv, writes a checkpoint, exits with $FAKE_EXIT (143 = stopped).
    import os, sys
    args = sys.argv[1:]
    run = os.path.join("runs", args[args.index("--run-name") + 1])
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "argv.txt"), "a") as f:
        f.write(" ".join(args) + "\\n")
    code = int(os.environ["FAKE_EXIT"])
    if code in (0, 143):
        open(os.path.join(run, "checkpoint.pt"), "w").close()
    sys.exit(code)
""")


@pytest.fixture
def fake_grid(tmp_path):
    script = tmp_path / "fake_dqn.py"
    script.write_text(FAKE_SCRIPT)
    s = GridSpec("fake", (str(script),), ("CartPole-v1",), (1,), ("--total-timesteps", "10"))
    paths = GridPaths(tmp_path / "grids" / "fake")
    grid.load_or_create_spec(paths, s)
    return grid.Runner(s, paths, sys.executable, max_attempts=2), grid.expand_grid(s)[0]


def test_runner_resumes_an_interrupted_cell_and_then_skips_it(fake_grid, monkeypatch):
    runner, cell = fake_grid
    paths = runner.paths
    monkeypatch.setenv("FAKE_EXIT", "143")  # stopped by SIGTERM: checkpointed
    assert runner.run_cell(cell, 1) == "interrupted"
    assert paths.checkpoint(cell).exists() and not paths.done(cell).exists()
    state = json.loads(paths.state(cell).read_text())
    assert (state["status"], state["attempts"], state["failures"], state["returncode"]) == ("interrupted", 1, 0, 143)

    monkeypatch.setenv("FAKE_EXIT", "0")
    assert runner.run_cell(cell, 1) == "done"
    argv = (paths.run_dir(cell) / "argv.txt").read_text().splitlines()
    assert "--resume" not in argv[0] and f"--resume runs/{cell.run_name}/checkpoint.pt" in argv[1]
    assert paths.done(cell).exists()
    assert runner.run_cell(cell, 1) == Action.SKIP_DONE.value
    assert len((paths.run_dir(cell) / "argv.txt").read_text().splitlines()) == 2  # not run again
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
    assert runner.run_cell(cell, 1) == Action.SKIP_FAILED.value  # max_attempts=2
    assert not runner.paths.done(cell).exists()


def test_runner_starts_nothing_after_a_stop(fake_grid, monkeypatch):
    runner, cell = fake_grid
    monkeypatch.setenv("FAKE_EXIT", "0")
    runner.stop.set()
    assert runner.run_cell(cell, 1) == "not started"
    assert not runner.paths.run_dir(cell).exists()


# ---------------------------------------------------------------------------------------------------------------------
# atari_short
# ---------------------------------------------------------------------------------------------------------------------
def test_atari_short_cells_and_steady_sps():
    cells = atari_short.wanted_cells("BreakoutNoFrameskip-v4")
    assert [(c.script, c.seed) for c in cells] == [("dqn_atari.py", 1), ("dqn_atari.py", 2), ("dqn_atari.py", 3),
                                                   ("dqn_atari_dueling_per.py", 1), ("dqn_atari_dueling_per.py", 2)]
    assert all(c.run_name.endswith("__atari_short_breakout") for c in cells)
    # 100 steps/s while training; the 998 s pause (a resumption) is left out
    assert atari_short.steady_sps([(0, 0.0), (100, 1.0), (200, 2.0), (300, 1000.0), (400, 1001.0)]) == 100.0


def test_atari_short_skips_recorded_cells_reports_and_refuses_another_protocol(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(atari_short, "RESULTS_DIR", tmp_path)
    runs = [{"script": c.script, "env_id": c.env_id, "seed": c.seed, "final_eval_return": 10.0 + c.seed,
             "eval": [[50_000, 1.0], [100_000, 10.0 + c.seed]]}
            for env_id in atari_short.PLAN for c in atari_short.wanted_cells(env_id)]
    runs.append({"script": "stable-baselines3 2.9.2 DQN", "env_id": "BreakoutNoFrameskip-v4", "seed": 1,
                 "final_eval_return": 8.0, "eval": [[50_000, 2.0], [100_000, 8.0]]})
    out = tmp_path / "atari_short.json"
    record = {"protocol": {"flags": list(atari_short.PROTOCOL)}, "random": {e: {"mean": 2.0} for e in atari_short.PLAN},
              "runs": runs}
    out.write_text(json.dumps(record))
    assert atari_short.main(atari_short.Args(dry_run=True, out=out)) == 0
    assert "to run: nothing" in capsys.readouterr().out
    empty = tmp_path / "empty.json"  # --only: one implementation's missing cells
    assert atari_short.main(atari_short.Args(dry_run=True, out=empty, only="sb3")) == 0
    assert capsys.readouterr().out.strip() == "to run: SB3 BreakoutNoFrameskip-v4 seed 1"
    assert atari_short.main(atari_short.Args(dry_run=True, out=empty, only="dqn_atari_dueling_per.py")) == 0
    assert capsys.readouterr().out.count("__dqn_atari_dueling_per__") == 4
    assert atari_short.main(atari_short.Args(record_only=True, out=out)) == 0  # nothing to record: table and plot
    table = (tmp_path / "atari_short.md").read_text()
    row = next(line for line in table.splitlines() if "| dqn_atari.py " in line)
    # seeds, final mean +- std, per seed, random, mean / random, worst seed / random, the bar
    assert [c.strip() for c in row.strip("|").split("|")][2:] == ["1 2 3", "12.0 +- 0.8", "11.0, 12.0, 13.0", "2.00",
                                                                   "6.0x", "5.5x", "5x"]
    assert (tmp_path / "atari_short_Breakout.png").stat().st_size > 0
    out.write_text(json.dumps({**record, "protocol": {"flags": ["--total-timesteps", "1"]}}))
    assert atari_short.main(atari_short.Args(out=out)) == 2
    assert "other protocol flags" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------------------------
def test_parse_run_name_and_identify():
    assert plot.parse_run_name("ALE-Pong-v5__dqn_atari__3__1700000000") == ("ALE-Pong-v5", "dqn_atari", 3)
    assert plot.parse_run_name("sps-run") is None and plot.parse_run_name("a__b__c") is None
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
    text = plot.scores_markdown({("PongNoFrameskip-v4", "dqn_atari"): scores}, 2, [None, None], [Path("runs")])
    assert "15.0 +- 5.0" in text and "20.25 +- 0.41" in text and "18.9 +- 1.3" in text
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

    assert memory.tensor_bytes(Holder()) == 10 + 16


@pytest.mark.parametrize("script", common.ATARI_SCRIPTS)
def test_replay_bytes_matches_the_scripts_bytes_needed(script):
    result = memory.replay_bytes(script, capacity=1_000, num_envs=1, full_capacity=1_000_000)
    # the PER buffer also holds a scalar max priority (8 bytes) that bytes_needed leaves out
    assert 0 <= result["allocated_bytes"] - result["bytes_needed_at_capacity"] <= 8
    assert 7_000 < result["bytes_per_transition"] < 7_200


@pytest.mark.parametrize("script", common.ATARI_SCRIPTS)
def test_update_cost_harness_takes_updates(script):
    from benchmarks.update_cost import measure_update_cost

    result = measure_update_cost(script, capacity=64, warmup=1, iters=2, blocks=2)
    assert result["iters"] == 2 and result["seconds_per_update"] > 0 and result["n_actions"] == 4


def test_per_diagnose_reads_a_checkpoint(tmp_path):
    import subprocess

    from benchmarks.per_diagnose import diagnose

    subprocess.run([sys.executable, str(common.script_path("dqn_atari_dueling_per.py")), "--learning-starts", "10",
                    "--total-timesteps", "40", "--buffer-size", "64", "--batch-size", "4", "--eval-episodes", "1",
                    "--max-episode-frames", "400", "--checkpoint-buffer", "--run-name", "d", "--no-cuda"],
                   cwd=tmp_path, check=True, capture_output=True)
    d = diagnose(tmp_path / "runs/d/checkpoint.pt", batches=5)
    assert d["global_step"] == 40 and d["beta"] == 1.0 and d["adam_eps"] == 1e-8  # beta reaches 1 at the end
    assert 0 < d["is_weight"]["min"] <= d["is_weight"]["mean"] <= 1
    assert 0 <= d["adam_sqrt_v_hat"]["share_below_eps"] <= 1 and d["adam_sqrt_v_hat"]["p99"] > 0
