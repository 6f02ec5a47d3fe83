"""Reliability and security of all three scripts: bad input (one line, exit 2, nothing written), SIGKILL and resume,
kills during checkpoint writes, clean SIGINT/SIGTERM stops, non-finite losses, untrusted checkpoints, run paths,
determinism, and resumed runs keeping the schedules of uninterrupted ones."""

import dataclasses
import glob
import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import pytest
import torch
import tyro

from helpers import (ROOT, SCRIPTS, checkpoint_step, finished_counts, load_script, read_scalars, read_summary,
                     run_main, run_script, wait_until)

ATARI = ["dqn_atari", "dqn_atari_dueling_per"]
# short runs: a few hundred env steps of warm-up, then a little training
FAST = {
    "dqn_cartpole": ["--learning-starts", 200, "--eval-episodes", 2, "--eval-frequency", 0],
    "dqn_atari": ["--learning-starts", 200, "--buffer-size", 2000, "--num-envs", 2, "--train-frequency", 8,
                  "--eval-episodes", 1, "--max-episode-frames", 800, "--eval-frequency", 0],
}
FAST["dqn_atari_dueling_per"] = FAST["dqn_atari"]
ENV = {"dqn_cartpole": "CartPole-v1", "dqn_atari": "BreakoutNoFrameskip-v4",
       "dqn_atari_dueling_per": "BreakoutNoFrameskip-v4"}


@pytest.fixture(params=SCRIPTS)
def script(request):
    return request.param


# ---------------------------------------------------------------- bad input
def saved_args(script, **flags) -> dict:
    """The flags a checkpoint records (a resumed run goes on with them)."""
    return dataclasses.asdict(load_script(script).Args(**flags))


def other_game_checkpoint(tmp_path, script):
    path = tmp_path / "other.pt"
    env_id = "PongNoFrameskip-v4" if script in ATARI else "Acrobot-v1"
    torch.save({"env_id": env_id, "n_actions": 6 if script in ATARI else 3, "model": {}, "optimizer": {},
                "args": saved_args(script, env_id=env_id), "global_step": 0}, path)
    return path


def other_script_checkpoint(tmp_path, script):
    path = tmp_path / "other_script.pt"
    other = "dqn_atari.py" if script == "dqn_cartpole" else "dqn_cartpole.py"
    torch.save({"script": other, "env_id": ENV[script], "n_actions": 2, "model": {}, "optimizer": {}}, path)
    return path


def a_directory(tmp_path, script):
    (tmp_path / "runs_copy").mkdir(exist_ok=True)
    return tmp_path / "runs_copy"


def foreign_network_checkpoint(tmp_path, script):
    """A checkpoint of the same env but another network: the dueling one for dqn_atari and vice versa."""
    path = tmp_path / "foreign.pt"
    if script == "dqn_cartpole":
        model = load_script(script).QNetwork(4, 2, (7,)).state_dict()
    else:
        other = load_script("dqn_atari" if script == "dqn_atari_dueling_per" else "dqn_atari_dueling_per")
        model = other.QNetwork(4).state_dict()
    torch.save({"env_id": ENV[script], "n_actions": 2 if script == "dqn_cartpole" else 4, "model": model,
                "optimizer": {}, "args": saved_args(script), "global_step": 0}, path)
    return path


def corrupt_checkpoint(tmp_path, script):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 not really a checkpoint" + os.urandom(64))
    return path


class Payload:
    def __reduce__(self):  # runs at unpickling time without weights_only
        return (os.system, ("touch pwned",))


def malicious_checkpoint(tmp_path, script):
    path = tmp_path / "malicious.pt"
    torch.save({"env_id": ENV[script], "model": Payload()}, path)
    return path


def saved_model(tmp_path, script):
    path = tmp_path / "model.cleanrl_model"
    n_actions = 2 if script == "dqn_cartpole" else 4
    torch.save({"env_id": ENV[script], "n_actions": n_actions, "model": {}}, path)
    return path


def bare_model(tmp_path, script):
    """A bare q_network.state_dict(), as --save-model and CleanRL write models."""
    path = tmp_path / "bare.cleanrl_model"
    module = load_script(script)
    torch.save((module.QNetwork(4, 2, (8,)) if script == "dqn_cartpole" else module.QNetwork(4)).state_dict(), path)
    return path


def earlier_checkpoint(tmp_path, script, replay_rows: bool = False):
    """A checkpoint as an earlier version wrote it: no last_eval and eval_due (written before summary.json), or with
    replay_rows=True, a replay buffer of float32 rows (before its fields were named and typed). No shim reads either."""
    path, module = tmp_path / "earlier.pt", load_script(script)
    args, cpu = module.Args(cuda=False, buffer_size=1000, run_name="earlier"), torch.device("cpu")
    if script == "dqn_cartpole":
        run = module.RunState(args, 4, 2, cpu, module.ReplayBuffer(1000, 4, cpu, 0.99))
    else:
        run = module.RunState(args, 4, cpu, module.ReplayBuffer(1000, 8, cpu, cpu, 0.99))
    state = {**run.state_dict(), "replay_buffer": None, "global_step": 500}
    if replay_rows:
        state["replay_buffer"] = {"frames": torch.zeros(8, 125, 84, 84, dtype=torch.uint8),
                                  "rows": torch.zeros(8, 125, 4), "pos": 0, "count": 0}
    else:
        del state["last_eval"], state["eval_due"]
    torch.save(state, path)
    return path


def earlier_replay_checkpoint(tmp_path, script):
    return earlier_checkpoint(tmp_path, script, replay_rows=True)


COMMON_BAD = [
    (["--buffer-size", "16", "--batch-size", "32"], "--buffer-size (16) must be >= --batch-size (32)"),
    (["--buffer-size", "0"], "--buffer-size must be positive"),
    (["--batch-size", "-1"], "--batch-size must be positive"),
    (["--num-envs", "0"], "--num-envs must be positive"),
    (["--total-timesteps", "0"], "--total-timesteps must be positive"),
    (["--train-frequency", "0"], "--train-frequency must be positive"),
    (["--target-network-frequency", "-5"], "--target-network-frequency must be positive"),
    (["--eval-episodes", "0"], "--eval-episodes must be positive"),
    (["--eval-frequency", "-1"], "--eval-frequency must be >= 0"),
    (["--checkpoint-frequency", "-1"], "--checkpoint-frequency must be >= 0"),
    (["--learning-rate", "0"], "--learning-rate must be positive"),
    (["--learning-rate", "inf"], "--learning-rate must be positive and finite, got inf"),
    (["--learning-rate", "nan"], "--learning-rate must be positive and finite, got nan"),
    (["--gamma", "nan"], "--gamma must be in [0, 1], got nan"),
    (["--tau", "nan"], "--tau must be in (0, 1], got nan"),
    (["--seed", "-1"], "--seed must be in [0, 2^32)"),
    (["--seed", str(2**32)], "--seed must be in [0, 2^32)"),
    (["--learning-starts", "100", "--total-timesteps", "100"], "--learning-starts (100) must be < --total-timesteps"),
    (["--exploration-fraction", "0"], "--exploration-fraction must be in (0, 1]"),
    (["--exploration-fraction", "1.5"], "--exploration-fraction must be in (0, 1]"),
    (["--tau", "0"], "--tau must be in (0, 1]"),
    (["--gamma", "1.2"], "--gamma must be in [0, 1]"),
    (["--start-e", "2"], "--start-e must be in [0, 1]"),
    (["--end-e", "-0.1"], "--end-e must be in [0, 1]"),
    (["--eval-epsilon", "1.5"], "--eval-epsilon must be in [0, 1]"),
    (["--run-name", "../escape"], "must be a plain name"),
    (["--run-name", "a/b"], "must be a plain name"),
    (["--run-name", "/tmp/x"], "must be a plain name"),
    (["--exp-name", ".."], "must be a plain name"),
    (["--resume", "missing.pt"], "does not exist"),
    (["--play", "missing.pt"], "does not exist"),
    (["--resume", corrupt_checkpoint], "cannot load"),
    (["--resume", malicious_checkpoint], "cannot load"),
    (["--play", malicious_checkpoint], "cannot load"),
    (["--resume", other_game_checkpoint, "--env-id", "ALE/Breakout-v5"], "would change what"),
    (["--resume", earlier_checkpoint, "--gamma", "0.9"], "--gamma 0.9 would change what"),
    (["--resume", earlier_checkpoint, "--num-envs", "3"], "--num-envs 3 would change what"),
    (["--resume", earlier_checkpoint, "--seed", "7"], "--seed 7 would change what"),
    (["--resume", earlier_checkpoint, "--total-timesteps", "100"], "(it ran with --total-timesteps"),
    (["--resume", other_script_checkpoint], "; resume or play it with that script"),
    (["--resume", a_directory], "is a directory; pass the checkpoint.pt or model file in it"),
    (["--play", a_directory], "is a directory; pass the checkpoint.pt or model file in it"),
    (["--run-name", "r" * 300], "must be a plain name of at most 100"),
    (["--exp-name", "e" * 101], "must be a plain name of at most 100"),
    (["--total-timesteps", str(10**400)], "--total-timesteps must be below 2^53"),
    (["--buffer-size", str(10**400)], "--buffer-size must be below 2^53"),
    (["--learning-starts", "500", "--total-timesteps", "900", "--train-frequency", "1000"], "leaves no update"),
    (["--play", other_game_checkpoint], "was trained on"),
    (["--resume", foreign_network_checkpoint], "is not a checkpoint of this script/flags (RuntimeError: Error(s) in"),
    (["--resume", saved_model], "is a saved model, not a checkpoint"),
    (["--resume", bare_model], "is a saved model, not a checkpoint"),
    (["--resume", earlier_checkpoint], "is not a checkpoint of this script/flags (KeyError: 'last_eval')"),
]
SCRIPT_BAD = {
    "dqn_cartpole": [
        (["--env-id", "CartPol-v1"], "close matches: CartPole-v1"),
        (["--env-id", "NoSuchEnv-v0"], "unknown --env-id"),
        (["--env-id", "Pendulum-v1"], "needs Discrete actions"),
        (["--env-id", "ALE/Pong-v5"], "needs a flat Box"),
        (["--hidden-sizes", "64", "0"], "--hidden-sizes must be one or more positive"),
        (["--buffer-size", "10000000000"], "--buffer-size takes"),
        (["--hidden-sizes", "100000", "100000"], "--hidden-sizes takes"),
        (["--eval-episodes", "10000000"], "--eval-episodes takes"),
        (["--play", "missing.pt", "--eval-episodes", "10000000"], "--eval-episodes takes"),
    ],
    "dqn_atari": [
        (["--env-id", "BreakotNoFrameskip-v4"], "close matches: BreakoutNoFrameskip-v4"),
        (["--env-id", "Breakout-v4"], "not an Atari id this script supports"),
        (["--env-id", "CartPole-v1"], "not an Atari id this script supports"),
        (["--max-episode-frames", "0"], "--max-episode-frames must be positive"),
        (["--buffer-size", str(10**10)], "the largest buffer that fits is --buffer-size"),
        (["--num-envs", "100000"], "the largest --num-envs that fits beside --eval-episodes 10 is"),
        (["--eval-episodes", "100000"], "the largest --eval-episodes that fits is"),
        (["--play", "missing.pt", "--eval-episodes", "100000"], "the largest --eval-episodes that fits is"),
        (["--resume", earlier_replay_checkpoint, "--buffer-size", "5000"],
         "--buffer-size 5000 would change what"),
        (["--resume", earlier_replay_checkpoint, "--buffer-size", "1000"],
         "is not a checkpoint of this script/flags (KeyError: 'actions')"),
    ],
}
SCRIPT_BAD["dqn_atari_dueling_per"] = SCRIPT_BAD["dqn_atari"] + [
    (["--prioritized-replay-alpha", "1.5"], "--prioritized-replay-alpha must be in [0, 1]"),
    (["--prioritized-replay-beta0", "-1"], "--prioritized-replay-beta0 must be in [0, 1]"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be positive"),
]
BAD = [(s, flags, msg) for s in SCRIPTS for flags, msg in COMMON_BAD + SCRIPT_BAD[s]]


def resolve(flags, tmp_path, script):
    return [str(f(tmp_path, script)) if callable(f) else f for f in flags]


@pytest.mark.parametrize("bad_script,flags,message", BAD,
                         ids=[f"{s}:{' '.join(f if isinstance(f, str) else f.__name__ for f in flags)}"
                              for s, flags, _ in BAD])
def test_bad_input_fails_with_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, bad_script, flags,
                                                                 message):
    monkeypatch.chdir(tmp_path)
    dqn = load_script(bad_script)
    with pytest.raises(SystemExit) as exit_info:
        dqn.main(tyro.cli(dqn.Args, args=resolve(flags, tmp_path, bad_script)))
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "videos").exists()
    assert not (tmp_path / "pwned").exists()  # nothing in a checkpoint runs code


def test_bad_input_in_a_real_process_has_no_traceback(script, tmp_path):
    result = run_script(script, "--env-id", "NoSuchGame-v4", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr


def test_unparseable_flag_exits_2_without_traceback(script, tmp_path):
    result = run_script(script, "--buffer-size", "abc", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--buffer-size" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_unwritable_run_directory(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the runs directory should be")
    dqn = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        dqn.main(dqn.Args(run_name="x", cuda=False, buffer_size=1000))  # the replay is allocated first
    assert exit_info.value.code == 2
    assert "cannot write the run directory 'runs/x'" in capsys.readouterr().err
    assert (tmp_path / "runs").read_text() == "a file where the runs directory should be"


def test_a_new_run_never_overwrites_an_existing_one(script, tmp_path):
    first = run_main(script, *FAST[script], "--total-timesteps", 400, "--run-name", "mine", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "runs/mine/checkpoint.pt").read_bytes()
    again = run_main(script, *FAST[script], "--total-timesteps", 400, "--run-name", "mine", cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run; continue it with --resume" in again.stderr
    assert (tmp_path / "runs/mine/checkpoint.pt").read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_cuda_without_cuda_warns_and_falls_back_to_cpu(tmp_path):
    result = run_main("dqn_cartpole", "--cuda", "--total-timesteps", 300, "--learning-starts", 100,
                        "--eval-episodes", 1, "--run-name", "c", cwd=tmp_path)
    assert result.returncode == 0
    assert ("warning: --cuda is on (the default) but CUDA is not available; running on the CPU "
            "(--no-cuda silences this)") in result.stderr


def test_two_processes_cannot_share_a_run_folder(script, tmp_path):
    # the first holds the folder before it has written any checkpoint (there is none until it ends)
    first = run_script(script, *FAST[script], "--checkpoint-frequency", 0, "--total-timesteps", 10**6,
                       "--run-name", "one", cwd=tmp_path, wait=False)
    lock = tmp_path / "runs/one/lock"
    events = lambda: glob.glob(str(tmp_path / "runs/one/events.out.tfevents*"))  # noqa: E731
    wait_until(lambda: lock.exists() and lock.read_text().strip() == str(first.pid) and events(), first)
    time.sleep(1)  # into its loop, where SIGTERM stops it cleanly (before, the default action kills it)
    second = run_main(script, *FAST[script], "--total-timesteps", 400, "--run-name", "one", cwd=tmp_path)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"error: runs/one is in use by process {first.pid}" in second.stderr
    assert len(glob.glob(str(tmp_path / "runs/one/events.out.tfevents*"))) == 1  # the second wrote nothing there
    assert first.returncode == 128 + signal.SIGTERM
    assert read_summary(tmp_path / "runs/one")["stop_reason"] == "signal SIGTERM"


def test_a_seed_at_the_top_of_its_range_trains_and_evaluates(script, tmp_path):
    # ale-py takes reset seeds as int32 and seeds env i with seed + i: evaluation seeds (seed + 10^6 + step) must
    # still be folded into its range
    result = run_main(script, *FAST[script], "--total-timesteps", 400, "--seed", 2**32 - 1, "--run-name", "top",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_summary(tmp_path / "runs/top")["final_eval_return"] is not None


def test_a_crash_after_training_started_leaves_a_checkpoint_and_a_summary(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dqn = load_script(script)

    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("the evaluation env broke")

    monkeypatch.setattr(dqn, "evaluate", broken_evaluate)
    args = tyro.cli(dqn.Args, args=[str(f) for f in FAST[script]] + ["--total-timesteps", "400", "--run-name", "c",
                                                                        "--checkpoint-frequency", "0", "--no-cuda"])
    with pytest.raises(RuntimeError, match="the evaluation env broke"):
        dqn.main(args)
    state = torch.load(tmp_path / "runs/c/checkpoint.pt", weights_only=True)
    assert state["global_step"] == 400 and state["n_updates"] > 0
    summary = read_summary(tmp_path / "runs/c")
    assert summary["stop_reason"] == "error: RuntimeError: the evaluation env broke"
    assert summary["checkpoint_step"] == summary["env_steps"] == 400


def test_non_finite_weights_are_never_written(script, tmp_path, monkeypatch, capsys):
    # weights that go non-finite between two loss checks (here: a few updates, before the first check) must not reach
    # checkpoint.pt, best_model.pt or the CleanRL model file
    monkeypatch.chdir(tmp_path)
    dqn = load_script(script)
    monkeypatch.setattr(dqn, "make_optimizer", lambda q_network, args, **_: torch.optim.SGD(q_network.parameters(),
                                                                                              lr=float("inf")))
    args = tyro.cli(dqn.Args, args=[str(f) for f in FAST[script]] + ["--total-timesteps", "260", "--run-name", "inf",
                                                                        "--save-model", "--no-cuda"])
    with pytest.raises(SystemExit) as exit_info:
        dqn.main(args)
    assert exit_info.value.code == 1
    assert "error: non-finite weights at step 260; the last good state (step 0)" in capsys.readouterr().err
    state = torch.load(tmp_path / "runs/inf/checkpoint.pt", weights_only=True)
    assert state["global_step"] == 0 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (tmp_path / "runs/inf/best_model.pt").exists()
    assert not glob.glob(str(tmp_path / "runs/inf/*.cleanrl_model"))
    assert read_summary(tmp_path / "runs/inf")["stop_reason"] == "non-finite weights at step 260"


def test_a_signal_while_the_envs_are_built_ends_the_process_at_once(tmp_path):
    # building 96 ale-py envs takes many seconds in one C++ call, which would defer a Python signal handler
    proc = run_script("dqn_atari", "--num-envs", 96, "--buffer-size", 2000, "--run-name", "b", "--no-cuda",
                      cwd=tmp_path, wait=False, env={"PYTHONUNBUFFERED": "1"})
    wait_until(lambda: "replay:" in (proc.stdout.readline() or ""), proc, timeout=120)  # next: building the envs
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    started = time.time()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGTERM and time.time() - started < 2.0
    # nothing a later run of the name trips over: the folder holds at most the lock of a process that is gone
    assert {p.name for p in (tmp_path / "runs/b").iterdir()} <= {"lock"}


# ---------------------------------------------------------------- checkpoints and faults
@pytest.mark.parametrize("writer", SCRIPTS)
def test_checkpoint_write_is_atomic(tmp_path, writer):
    dqn = load_script(writer)
    path = str(tmp_path / "checkpoint.pt")
    dqn.save_checkpoint(path, {"global_step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        dqn.save_checkpoint(path, {"global_step": 2, "junk": Unpicklable()})
    assert torch.load(path, weights_only=True) == {"global_step": 1}


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    # a large replay buffer makes every checkpoint a ~100 MB write; kill the process while one is in flight
    proc = run_script("dqn_cartpole", "--buffer-size", 2_500_000, "--checkpoint-frequency", 300, "--learning-starts",
                      100, "--total-timesteps", 10**6, "--eval-frequency", 0, "--run-name", "k", cwd=tmp_path,
                      wait=False)
    path = tmp_path / "runs/k/checkpoint.pt"
    wait_until(lambda: checkpoint_step(path) is not None, proc)
    wait_until(lambda: glob.glob(f"{path}.tmp*"), proc, poll=0.001)  # a new checkpoint is being written
    proc.kill()
    proc.wait()
    assert glob.glob(f"{path}.tmp*")  # the kill did land mid-write
    step = checkpoint_step(path)
    assert step is not None and step % 300 == 0
    resumed = run_main("dqn_cartpole", "--resume", path, "--buffer-size", 2_500_000, "--learning-starts", 100,
                         "--total-timesteps", step + 100, "--eval-frequency", 0, "--eval-episodes", 1, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed k at step {step}" in resumed.stdout
    assert not glob.glob(f"{path}.tmp*")  # the half-written file was cleaned up


def test_sigkill_then_resume_loses_at_most_one_checkpoint_interval(script, tmp_path):
    every = 200
    proc = run_script(script, *FAST[script], "--checkpoint-frequency", every, "--total-timesteps", 10**6,
                      "--run-name", "k", cwd=tmp_path, wait=False)
    path = tmp_path / "runs/k/checkpoint.pt"
    wait_until(lambda: (checkpoint_step(path) or 0) >= 2 * every, proc)
    seen = checkpoint_step(path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint_step(path)
    assert step >= seen and step % every == 0
    resumed = run_main(script, *FAST[script], "--resume", path, "--total-timesteps", step + 2 * every,
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed k at step {step}" in resumed.stdout
    assert finished_counts(tmp_path / "runs/k")["steps"] == step + 2 * every
    assert checkpoint_step(path) == step + 2 * every


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_a_final_checkpoint_and_flushed_logs(script, tmp_path, signum):
    proc = run_script(script, *FAST[script], "--checkpoint-frequency", 200, "--total-timesteps", 10**6,
                      "--run-name", "s", cwd=tmp_path, wait=False)
    path = tmp_path / "runs/s/checkpoint.pt"
    wait_until(lambda: (checkpoint_step(path) or 0) >= 600, proc)  # training has started (learning starts at 200)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    stopped = int(err.split(f"stopped by signal {signum} at step ")[1].split(";")[0])
    assert checkpoint_step(path) == stopped and stopped >= 600
    assert finished_counts(tmp_path / "runs/s")["steps"] == stopped
    assert read_summary(tmp_path / "runs/s")["stop_reason"] == f"signal {signum.name}"
    logged = read_scalars(tmp_path / "runs/s", "charts/episodic_return")
    assert logged and max(step for step, _ in logged) <= stopped  # the writer was flushed on the way out


# ---------------------------------------------------------------- non-finite losses
class NaNRewards(gym.Wrapper):
    """CartPole whose rewards turn NaN after 300 steps."""

    steps = 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        NaNRewards.steps += 1
        return obs, float("nan") if NaNRewards.steps > 300 else reward, terminated, truncated, info


gym.register("tests/NaNCartPole-v1", entry_point=lambda: NaNRewards(gym.make("CartPole-v1")))


def test_non_finite_loss_stops_with_the_step_and_a_last_good_checkpoint(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    dqn = load_script(script)
    if script == "dqn_cartpole":
        NaNRewards.steps = 0
        args = dqn.Args(env_id="tests/NaNCartPole-v1", learning_starts=100, total_timesteps=10**5, cuda=False,
                        run_name="nan", eval_frequency=0)
    else:  # Atari rewards are clipped to their sign and sign(NaN) = 0: make the TD target itself NaN instead
        compute_td_target, calls = dqn.compute_td_target, []

        def nan_after_150_updates(*args, **kwargs):
            calls.append(1)
            return compute_td_target(*args, **kwargs) * (float("nan") if len(calls) > 150 else 1.0)

        monkeypatch.setattr(dqn, "compute_td_target", nan_after_150_updates)
        args = dqn.Args(learning_starts=100, total_timesteps=10**5, cuda=False, run_name="nan", num_envs=2,
                        buffer_size=2000, train_frequency=2, eval_frequency=0, max_episode_frames=800)
    with pytest.raises(SystemExit) as exit_info:
        dqn.main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    bad_step = int(err.split("non-finite TD loss or Q-values at env step ")[1].split(";")[0])
    assert bad_step > 300  # no NaN before step 300 (CartPole: NaN rewards; Atari: the 151st update, at step 402)
    state = torch.load(tmp_path / "runs/nan/checkpoint.pt", weights_only=True)
    assert state["global_step"] < bad_step and f"(step {state['global_step']}) is saved in" in err
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.isfinite(t).all() for t in state["target_model"].values())
    summary = read_summary(tmp_path / "runs/nan")
    assert summary["stop_reason"] == f"non-finite loss at step {bad_step}"
    assert summary["checkpoint_step"] == state["global_step"] < summary["env_steps"]


# ---------------------------------------------------------------- determinism and resume
def test_resumed_run_keeps_the_schedules_of_an_uninterrupted_one(script, tmp_path):
    total = 1600
    flags = [*FAST[script], "--total-timesteps", total, "--checkpoint-frequency", 200, "--eval-frequency", 800,
             *(["--checkpoint-buffer"] if script in ATARI else [])]
    whole = run_main(script, *flags, "--run-name", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    proc = run_script(script, *flags, "--run-name", "cut", cwd=tmp_path, wait=False)
    path = tmp_path / "runs/cut/checkpoint.pt"
    wait_until(lambda: (checkpoint_step(path) or 0) >= 400, proc, poll=0.01)  # well before the eval at 800
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    cut_at = checkpoint_step(path)
    assert proc.returncode == 128 + signal.SIGTERM and 400 <= cut_at < total
    resumed = run_main(script, *flags, "--resume", path, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {cut_at}" in resumed.stdout
    # same final step, same number of updates and target syncs, same epsilon at the same steps, same eval points
    assert finished_counts(tmp_path / "runs/cut") == finished_counts(tmp_path / "runs/whole")
    for tag in ["charts/epsilon", "eval/episodic_return"]:
        whole_steps = dict(read_scalars(tmp_path / "runs/whole", tag))
        cut = read_scalars(tmp_path / "runs/cut", tag)
        assert [step for step, _ in cut] == sorted(whole_steps)
        if tag == "charts/epsilon":
            assert all(value == pytest.approx(whole_steps[step]) for step, value in cut)


def test_resume_restores_the_weights(script, tmp_path):
    first = run_main(script, *FAST[script], "--total-timesteps", 600, "--run-name", "r", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    path = tmp_path / "runs/r/checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    # resume for zero more steps: the checkpoint written on the way out must hold the very weights loaded
    again = run_main(script, *FAST[script], "--resume", path, "--total-timesteps", 600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed r at step 600" in again.stdout
    reloaded = torch.load(path, weights_only=True)
    for key in ["model", "target_model"]:
        assert all(torch.equal(saved[key][k], reloaded[key][k]) for k in saved[key])
    assert reloaded["n_updates"] == saved["n_updates"] and reloaded["global_step"] == 600


@pytest.mark.parametrize("script", ["dqn_cartpole", "dqn_atari"])
def test_an_evaluation_cut_short_by_a_signal_is_done_first_on_resume(script, tmp_path):
    """A signal during the final evaluation leaves the checkpoint at the last step with the evaluation still owed: the
    resumed run must evaluate there (not finish 'completed' without a final score). Simulated on a finished run's
    checkpoint, as a cut evaluation leaves it: eval_due set, no evaluation recorded."""
    finished = run_main(script, *FAST[script], "--total-timesteps", 400, "--run-name", "e", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    path = tmp_path / "runs/e/checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 400 and not state["eval_due"]
    dqn = load_script(script)
    dqn.save_checkpoint(str(path), {**state, "eval_due": True, "last_eval": None, "best_eval": -float("inf")})
    resumed = run_main(script, *FAST[script], "--total-timesteps", 400, "--resume", path, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = read_summary(tmp_path / "runs/e")
    assert summary["stop_reason"] == "completed" and summary["final_eval_return"] is not None
    assert [step for step, _ in read_scalars(tmp_path / "runs/e", "eval/episodic_return")] == [400]
    assert not torch.load(path, weights_only=True)["eval_due"]
