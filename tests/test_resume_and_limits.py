"""Reliability by class (issue 30): what a resumed run takes from its checkpoint and what it may change, resumes that
would overwrite another run, learning that starts before a transition exists, full disks, W&B without a login,
settings that train poorly, and model files that name no game. Each class is a table of several members."""

import errno
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, SCRIPTS, finished_counts, load_script, read_summary, run_main

ATARI = ["dqn_atari", "dqn_atari_dueling_per"]
FAST = {
    "dqn_cartpole": ["--learning-starts", 200, "--eval-episodes", 2, "--eval-frequency", 0, "--no-cuda"],
    "dqn_atari": ["--learning-starts", 200, "--buffer-size", 2000, "--num-envs", 2, "--train-frequency", 8,
                  "--eval-episodes", 1, "--max-episode-frames", 800, "--eval-frequency", 0, "--no-cuda"],
}
FAST["dqn_atari_dueling_per"] = FAST["dqn_atari"]


@pytest.fixture(params=SCRIPTS)
def script(request):
    return request.param


def first_run(script, tmp_path, name="a", steps=400):
    result = run_main(script, *FAST[script], "--total-timesteps", steps, "--run-name", name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "runs" / name / "checkpoint.pt"


# ---------------------------------------------------------------- a resumed run's flags
def test_a_resume_goes_on_with_the_checkpoints_flags_and_applies_the_safe_changes(script, tmp_path):
    path = first_run(script, tmp_path)
    # only --resume and the changes: every other flag is the checkpoint's, not this script's default
    resumed = run_main(script, "--resume", path, "--total-timesteps", 600, "--learning-rate", 0.05,
                       "--eval-episodes", 1, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming with changed flags: --total-timesteps 400 -> 600, --learning-rate" in resumed.stdout
    ran = read_summary(tmp_path / "runs/a")["args"]
    first = dict(zip(FAST[script][::2], FAST[script][1::2]))
    assert ran["learning_starts"] == 200 and ran["learning_rate"] == 0.05 and ran["total_timesteps"] == 600
    if script in ATARI:
        assert ran["num_envs"] == 2 and ran["buffer_size"] == 2000
        assert ran["train_frequency"] == first["--train-frequency"]
    state = torch.load(path, weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.05]  # in the optimizer too, not only the args
    assert state["global_step"] == 600 and finished_counts(tmp_path / "runs/a")["steps"] == 600


@pytest.mark.parametrize("flags", [["--gamma", "0.5"], ["--batch-size", "7"], ["--target-network-frequency", "3"],
                                   ["--exploration-fraction", "0.5"]])
def test_a_resume_refuses_a_flag_that_changes_what_the_checkpoint_holds(tmp_path, flags, capsys):
    path = first_run("dqn_cartpole", tmp_path)
    before = path.read_bytes()
    result = run_main("dqn_cartpole", "--resume", path, *flags, cwd=tmp_path)
    assert result.returncode == 2 and f"{flags[0]} {flags[1]} would change what" in result.stderr
    assert "(it ran with " in result.stderr and path.read_bytes() == before


@pytest.mark.parametrize("target", ["b", "c"])
def test_a_resume_never_overwrites_another_run(script, tmp_path, target):
    path = first_run(script, tmp_path, "a")
    other = first_run(script, tmp_path, "b") if target == "b" else None
    before = other.read_bytes() if other else None
    result = run_main(script, "--resume", path, "--total-timesteps", 500, "--run-name", target, cwd=tmp_path)
    if target == "b":  # b holds a run: the resume fails as a new run would
        assert result.returncode == 2 and "runs/b already holds a run" in result.stderr
        assert other.read_bytes() == before
    else:  # a new folder: the run goes on there (a branch of a), and a is untouched
        assert result.returncode == 0, result.stderr
        assert torch.load(tmp_path / "runs/c/checkpoint.pt", weights_only=True)["global_step"] == 500
        assert torch.load(path, weights_only=True)["global_step"] == 400


# ---------------------------------------------------------------- learning starts only once a transition exists
@pytest.mark.parametrize("learning_starts", [0, 1, 4, 7])
def test_learning_may_start_before_the_first_vector_step_ends(script, tmp_path, learning_starts):
    flags = ["--learning-starts", learning_starts, "--total-timesteps", 64, "--buffer-size", 200, "--batch-size", 4,
             "--train-frequency", 4, "--eval-episodes", 1, "--eval-frequency", 0, "--no-cuda"]
    flags += ["--num-envs", 8, "--max-episode-frames", 400] if script in ATARI else []
    result = run_main(script, *flags, "--run-name", "zero", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert finished_counts(tmp_path / "runs/zero")["updates"] > 0


# ---------------------------------------------------------------- a full disk
def failing_fsync(monkeypatch, pattern: str, after: int):
    """os.fsync fails with ENOSPC for files whose path holds `pattern`, after `after` successful ones."""
    fsync, calls = os.fsync, []

    def fake(fd):
        if pattern in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(1)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)
    monkeypatch.setattr(os, "fsync", fake)


@pytest.mark.parametrize("pattern,after,frequency", [("checkpoint.pt.tmp", 1, 200),  # a periodic write
                                                     ("checkpoint.pt.tmp", 0, 0),  # the final write
                                                     ("best_model.pt.tmp", 0, 0)])  # the best model
def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_last_checkpoint(script, tmp_path, monkeypatch, pattern,
                                                                            after, frequency):
    failing_fsync(monkeypatch, pattern, after)
    result = run_main(script, *FAST[script], "--total-timesteps", 600, "--checkpoint-frequency", frequency,
                      "--eval-frequency", 0 if "best" not in pattern else 200, "--run-name", "full", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "No space left on device" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not glob.glob(str(tmp_path / "runs/full/*.tmp*"))
    checkpoint = tmp_path / "runs/full/checkpoint.pt"
    if frequency:  # the periodic checkpoint before the disk filled up is whole
        assert torch.load(checkpoint, weights_only=True)["global_step"] == 200
    assert read_summary(tmp_path / "runs/full")["stop_reason"].startswith("error:")


# ---------------------------------------------------------------- --track without a W&B login
def test_track_without_a_wandb_login_fails_in_one_line_and_writes_nothing(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--track", "--run-name", "t", "--no-cuda"],
                            cwd=tmp_path, env={**env, "HOME": str(tmp_path)}, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "wandb login" in errors[0], result.stderr
    assert "WANDB_MODE=offline" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- settings that train poorly: a warning each
POOR = [(dict(target_network_frequency=20_000), "never synced"),
        (dict(num_envs=8, total_timesteps=5, learning_starts=2, buffer_size=100, batch_size=1, train_frequency=1,
              target_network_frequency=1), "overshoots"),
        (dict(batch_size=64, learning_starts=10, buffer_size=100), "repeat the few transitions"),
        (dict(max_episode_frames=1), "every game is truncated")]


@pytest.mark.parametrize("flags,warning", POOR)
def test_a_setting_that_trains_poorly_gets_one_warning_line(script, capsys, flags, warning):
    module = load_script(script)
    if "max_episode_frames" in flags and not hasattr(module.Args, "max_episode_frames"):
        pytest.skip("CartPole has no frame cap")
    module.validate_args(module.Args(**{"total_timesteps": 10_000, "learning_starts": 1_000, "batch_size": 32,
                                        "target_network_frequency": 1_000, **flags}))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and warning in lines[0], lines


def test_settings_that_train_well_get_no_warning(script, capsys):
    module = load_script(script)
    module.validate_args(module.Args())
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- model files that name no game
def play_fake(script, path, monkeypatch, capsys, **flags):
    module, played = load_script(script), []
    monkeypatch.setattr(module, "evaluate", lambda q_network, *a, **k: played.append(q_network) or (
        np.zeros(2) if script == "dqn_cartpole" else (np.zeros(2), np.zeros(2))))
    module.main(module.Args(play=str(path), eval_episodes=2, cuda=False, **flags))
    assert played
    return capsys.readouterr().out


def test_a_model_that_names_no_game_plays_with_a_note(script, tmp_path, monkeypatch, capsys):
    module = load_script(script)
    network = module.QNetwork(4, 2, (8,)) if script == "dqn_cartpole" else module.QNetwork(4)
    torch.save(network.state_dict(), tmp_path / "q_network.pth")  # as CleanRL publishes its models
    out = play_fake(script, tmp_path / "q_network.pth", monkeypatch, capsys)
    assert "names no" in out or "does not name" in out


@pytest.mark.parametrize("script", ATARI)
def test_a_v4_model_plays_on_its_games_v5_id_with_a_note(script, tmp_path, monkeypatch, capsys):
    module = load_script(script)
    torch.save({"env_id": "BreakoutNoFrameskip-v4", "n_actions": 4, "model": module.QNetwork(4).state_dict()},
               tmp_path / "best_model.pt")
    out = play_fake(script, tmp_path / "best_model.pt", monkeypatch, capsys, env_id="ALE/Breakout-v5")
    assert "was trained on BreakoutNoFrameskip-v4" in out and "ALE/Breakout-v5's settings" in out
