"""dqn_cartpole.py: unit tests of its pieces, autoreset/truncation handling end to end, smoke, reproducibility,
learning and play mode. (Bad input, faults and resume for all scripts: test_reliability.py.)"""

import os
import pty
import select
import subprocess
import sys
import time

import cv2
import gymnasium as gym
import numpy as np
import pytest
import torch

from helpers import (ROOT, finished_counts, load_script, read_scalars, read_summary, read_tags, run_main,
                     run_script)

dqn = load_script("dqn_cartpole")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------- pieces
@pytest.mark.parametrize("device", DEVICES)
def test_replay_buffer_add_sample_and_wrap_around(device):
    rb = dqn.ReplayBuffer(capacity=5, obs_dim=3, device=torch.device(device), gamma=0.99)
    obs = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    rb.add(obs[:4], obs[:4] + 100, np.arange(4), np.arange(4) * 0.5, np.array([0, 1, 0, 0], dtype=bool))
    assert (rb.pos, rb.size) == (4, 4)
    rb.add(obs[4:], obs[4:] + 100, np.arange(4, 7), np.arange(4, 7) * 0.5, np.zeros(3, dtype=bool))
    # 7 transitions into 5 slots: rows 5 and 6 overwrote the two oldest (0 and 1), in ring order.
    assert (rb.pos, rb.size) == (2, 5)
    assert rb.actions.tolist() == [5, 6, 2, 3, 4]
    assert torch.equal(rb.observations[0].cpu(), torch.tensor(obs[5]))
    assert rb.terminations.tolist() == [False] * 5  # the termination of transition 1 left with it
    data = rb.sample(64)
    for field, dtype in zip(data, [torch.float32, torch.int64, torch.float32, torch.float32, torch.float32,
                                   torch.float32]):
        assert field.dtype == dtype and field.device.type == device and field.shape[0] == 64
    # every sampled row is one stored transition, fields aligned
    assert torch.equal(data.next_observations, data.observations + 100)
    assert torch.equal(data.rewards, data.actions.float() * 0.5)
    assert set(data.actions.tolist()) <= {2, 3, 4, 5, 6}


def test_replay_buffer_never_samples_unwritten_rows():
    rb = dqn.ReplayBuffer(capacity=100, obs_dim=1, device=torch.device("cpu"), gamma=0.99)
    rb.add(np.ones((3, 1)), np.ones((3, 1)), np.array([7, 7, 7]), np.zeros(3), np.zeros(3, dtype=bool))
    assert set(rb.sample(1000).actions.tolist()) == {7}


def test_linear_schedule_endpoints():
    assert dqn.linear_schedule(1.0, 0.05, 1000, 0) == 1.0
    assert dqn.linear_schedule(1.0, 0.05, 1000, 500) == pytest.approx(0.525)
    assert dqn.linear_schedule(1.0, 0.05, 1000, 1000) == pytest.approx(0.05)
    assert dqn.linear_schedule(1.0, 0.05, 1000, 10**6) == 0.05
    assert dqn.linear_schedule(1.0, 0.05, 0, 0) == 0.05  # a schedule shorter than one step (tiny runs) is done


def test_passed_multiple_counts_each_multiple_once_whatever_num_envs():
    assert [s for s in range(1, 31) if dqn.passed_multiple(10, s, 1)] == [10, 20, 30]
    assert [s for s in range(4, 41, 4) if dqn.passed_multiple(10, s, 4)] == [12, 20, 32, 40]
    assert not any(dqn.passed_multiple(0, s, 1) for s in range(1, 50))


def test_td_target_matches_hand_computation():
    target = dqn.QNetwork(obs_dim=2, n_actions=3, hidden_sizes=(4,))
    with torch.no_grad():  # make Q_target(s') = s' @ W + b exactly: one linear layer through ReLU of positive inputs
        for p in target.parameters():
            p.zero_()
        target.network[0].weight.copy_(torch.tensor([[1.0, 0], [0, 1.0], [0, 0], [0, 0]]))
        target.network[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.5, 0.5, 0, 0]]))
    next_obs = torch.tensor([[2.0, 1.0], [0.0, 3.0], [4.0, 4.0]])  # Q_target = [[2,1,1.5],[0,3,1.5],[4,4,4]]
    rewards = torch.tensor([1.0, -1.0, 0.5])
    dones = torch.tensor([0.0, 0.0, 1.0])
    y = dqn.compute_td_target(target, rewards, next_obs, dones, discounts=torch.full((3,), 0.9))
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 2, -1.0 + 0.9 * 3, 0.5]))
    assert not y.requires_grad


def test_target_sync_hard_and_soft():
    torch.manual_seed(0)
    q, target = dqn.QNetwork(3, 2, (8,)), dqn.QNetwork(3, 2, (8,))
    before = [p.clone() for p in target.parameters()]
    dqn.update_target(target, q, tau=0.25)
    for t, b, p in zip(target.parameters(), before, q.parameters()):
        assert torch.allclose(t, 0.25 * p + 0.75 * b)
    dqn.update_target(target, q, tau=1.0)
    for t, p in zip(target.parameters(), q.parameters()):
        assert torch.equal(t, p)


# ---------------------------------------------------------------- autoreset and truncation, end to end
class CountingEnv(gym.Env):
    """obs = [episode, t, the action just taken (-1 after a reset)]; reward t; even episodes terminate at t = 5, odd
    ones run into the TimeLimit at t = 7 (tests/test_rules.py reads the action)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.episode = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return self._obs(-1), {}

    def step(self, action):
        self.t += 1
        return self._obs(action), float(self.t), self.episode % 2 == 0 and self.t == 5, False, {}

    def _obs(self, action):
        return np.array([self.episode, self.t, action], dtype=np.float32)


gym.register("tests/Counting-v0", entry_point=CountingEnv, max_episode_steps=7)


@pytest.mark.parametrize("num_envs", [1, 3])
def test_reset_steps_are_not_stored_and_truncation_bootstraps(tmp_path, monkeypatch, num_envs):
    monkeypatch.chdir(tmp_path)
    total = 120
    dqn.main(dqn.Args(env_id="tests/Counting-v0", num_envs=num_envs, total_timesteps=total, learning_starts=40,
                      buffer_size=1000, batch_size=8, eval_frequency=0, eval_episodes=1, run_name="count",
                      cuda=False, checkpoint_frequency=0))
    state = torch.load(tmp_path / "runs/count/checkpoint.pt", weights_only=True)
    n = state["replay_buffer"]["size"]
    replay = {name: field[:n] for name, field in state["replay_buffer"].items() if torch.is_tensor(field)}
    obs, next_obs, rewards, dones = (replay["observations"], replay["next_observations"], replay["rewards"],
                                     replay["terminations"].float())
    # no stored transition crosses an episode boundary (that would be the reset step)
    assert torch.equal(next_obs[:, 0], obs[:, 0]) and torch.equal(next_obs[:, 1], obs[:, 1] + 1)
    assert torch.equal(rewards, next_obs[:, 1])
    terminal = (next_obs[:, 0] % 2 == 0) & (next_obs[:, 1] == 5)
    truncated = (next_obs[:, 0] % 2 == 1) & (next_obs[:, 1] == 7)
    assert terminal.any() and truncated.any()
    assert torch.equal(dones, terminal.float())  # truncation stores done = 0 and keeps the real final obs
    # every env step is stored except one reset step per finished episode
    per_env_steps = total // num_envs
    cycle = 5 + 7 + 2  # two episodes (5 and 7 transitions) plus their two reset steps
    full, rest = divmod(per_env_steps, cycle)
    resets = 2 * full + (rest > 5) + (rest > 5 + 1 + 7)
    assert n == num_envs * (per_env_steps - resets)
    returns = [v for _, v in read_scalars(tmp_path / "runs/count", "charts/episodic_return")]
    assert set(returns) == {15.0, 28.0}  # 1+..+5 and 1+..+7: the reset step's reward is not counted


# ---------------------------------------------------------------- whole runs
SMOKE = ["--total-timesteps", 600, "--learning-starts", 100, "--eval-frequency", 300, "--eval-episodes", 2,
         "--target-network-frequency", 100, "--batch-size", 32, "--buffer-size", 1000, "--tau", 1]  # hard syncs


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The SMOKE run, done once and read by the tests below: its folder."""
    cwd = tmp_path_factory.mktemp("smoke")
    result = run_main("dqn_cartpole", *SMOKE, "--run-name", "smoke", "--save-model", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, result


def test_smoke_run_updates_syncs_and_logs(smoke):
    tmp_path, result = smoke
    counts = finished_counts(tmp_path / "runs/smoke")
    assert counts == {"steps": 600, "updates": 500, "target_syncs": 5}
    run_dir = tmp_path / "runs/smoke"
    tags = read_tags(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/epsilon",
                "losses/td_loss", "losses/q_values", "eval/episodic_return", "text:hyperparameters/text_summary"]:
        assert tag in tags
    assert len(read_scalars(run_dir, "eval/episodic_return")) == 2
    assert len(read_scalars(run_dir, "losses/td_loss")) == 5
    for name in ["checkpoint.pt", "best_model.pt", "dqn_cartpole.cleanrl_model"]:
        assert (run_dir / name).is_file()
    # step 600 updates, then syncs: the final checkpoint's target is its trained network (tests/test_rules.py checks
    # every sync of a tiny run; target_syncs only counts them)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["target_model"][k], v) for k, v in state["model"].items())
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal


def test_same_seed_same_returns_another_seed_others(smoke, tmp_path):
    # CPU determinism of the whole run, the learner included: the smoke run again gives the same episodes
    again = run_main("dqn_cartpole", *SMOKE, "--run-name", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    returns = read_scalars(smoke[0] / "runs/smoke", "charts/episodic_return")
    assert len(returns) > 20 and read_scalars(tmp_path / "runs/again", "charts/episodic_return") == returns
    other = run_main("dqn_cartpole", *SMOKE, "--total-timesteps", 300, "--seed", 2, "--run-name", "other",
                     cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    other_returns = read_scalars(tmp_path / "runs/other", "charts/episodic_return")
    assert other_returns and other_returns != [(step, r) for step, r in returns if step <= 300]


def test_progress_display_on_a_terminal(tmp_path):
    leader, follower = pty.openpty()  # stderr is a terminal: the script shows its one-line progress display
    proc = run_script("dqn_cartpole", "--total-timesteps", 2000, "--learning-starts", 500, "--eval-episodes", 1,
                      "--run-name", "tty", cwd=tmp_path, wait=False, stderr=follower)
    os.close(follower)  # the child keeps its copy; reading the leader fails (EIO) once the child has exited
    shown, deadline = b"", time.time() + 300
    # read while the child runs: a pty holds only a few KB, a child writing into a full one would block
    while select.select([leader], [], [], max(deadline - time.time(), 0))[0]:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=10) == 0
    line = [part for part in shown.decode().split("\r") if "steps |" in part][-1]  # the last redraw
    for field in ["/2,000 steps", "SPS", "ETA", "return(10)", "eps"]:
        assert field in line, shown


def test_cleanrl_smoke_flags(tmp_path):
    result = run_main("dqn_cartpole", "--learning-starts", 10, "--total-timesteps", 16, "--buffer-size", 10,
                        "--batch-size", 4, "--run-name", "tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert finished_counts(tmp_path / "runs/tiny")["updates"] == 6


@pytest.mark.parametrize("env_id", ["Acrobot-v1", "MountainCar-v0"])
def test_other_flat_discrete_envs_train(tmp_path, monkeypatch, env_id, capsys):
    monkeypatch.chdir(tmp_path)
    dqn.main(dqn.Args(env_id=env_id, total_timesteps=300, learning_starts=100, num_envs=2, eval_episodes=1,
                      eval_frequency=0, run_name="other", cuda=False))
    assert finished_counts(tmp_path / "runs/other")["updates"] == 200


def test_learns_cartpole_well_above_random(tmp_path):
    # A uniformly random policy scores about 22 on CartPole-v1. Mostly waiting for learning (one update per step):
    # the default settings reach 100 within 10k steps, so the run may take that long, but --goal-score ends it at the
    # first evaluation (every 2.5k steps, 5 episodes) that does.
    result = run_main("dqn_cartpole", "--total-timesteps", 10_000, "--eval-frequency", 2_500, "--eval-episodes", 5,
                      "--goal-score", 100, "--run-name", "learn", "--checkpoint-frequency", 0, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    best = max(v for _, v in read_scalars(tmp_path / "runs/learn", "eval/episodic_return"))
    assert best >= 100


def test_play_mode_evaluates_a_saved_model_and_writes_video(tmp_path):
    assert run_main("dqn_cartpole", *SMOKE, "--run-name", "p", "--save-model", cwd=tmp_path).returncode == 0
    model = tmp_path / "runs/p/dqn_cartpole.cleanrl_model"
    result = run_script("dqn_cartpole", "--play", model, "--eval-episodes", 3, "--capture-video", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 episodes of" in result.stdout and "mean return" in result.stdout
    videos = list((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 1
    capture = cv2.VideoCapture(str(videos[0]))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) >= 8 and capture.read()[0]


def test_capture_video_without_xdg_runtime_dir_prints_no_error_line(tmp_path):
    # Without a login session (no XDG_RUNTIME_DIR), SDL, which gymnasium starts to render, prints "error:
    # XDG_RUNTIME_DIR is invalid or not set" unless the script keeps it off the display; people read an "error:" line
    # as the script's. run_script can only add variables, so the environment is built here without those two.
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "SDL_VIDEODRIVER")}
    cmd = [sys.executable, str(ROOT / "dqn_cartpole.py"), "--capture-video", "--total-timesteps", "50",
           "--learning-starts", "49", "--eval-episodes", "1", "--run-name", "v", "--no-cuda"]
    result = subprocess.run(cmd, cwd=tmp_path, env={**env, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("error:")], result.stderr
    videos = list((tmp_path / "runs/v/videos").glob("*.mp4"))
    assert len(videos) == 1 and cv2.VideoCapture(str(videos[0])).read()[0]


def test_track_with_wandb_offline(tmp_path):
    result = run_script("dqn_cartpole", "--learning-starts", 10, "--total-timesteps", 200, "--track",
                        "--run-name", "tracked", "--eval-episodes", 1, cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "runs/tracked/wandb").glob("offline-run-*"))


def test_write_video_of_no_frames_writes_nothing(tmp_path):
    """A signal can stop an evaluation before its first frame: no video, and no crash on the way to the checkpoint."""
    dqn.write_video(str(tmp_path / "v.mp4"), [])
    assert not (tmp_path / "v.mp4").exists()


def test_goal_score_stops_the_run_and_summary_json_says_where(tmp_path, monkeypatch):
    """--goal-score: the run stops at the first evaluation whose mean reaches it (scripted evaluations: means 5, 9.95
    and 10 for goal 10), and summary.json (which `benchmarks.measure cartpole-solve` reads) names the reason, the step
    and the time."""
    scripted = [np.array([4.0, 6.0]), np.array([9.0, 10.9]), np.array([10.0, 10.0]), np.array([50.0, 50.0])]
    monkeypatch.setattr(dqn, "evaluate", lambda *args, **kwargs: scripted.pop(0))
    monkeypatch.chdir(tmp_path)
    dqn.main(dqn.Args(learning_starts=50, eval_frequency=100, eval_episodes=2, total_timesteps=5000, goal_score=10,
                      run_name="goal", cuda=False))
    summary = read_summary(tmp_path / "runs/goal")
    assert summary["stop_reason"] == "goal reached" and summary["goal_score"] == 10
    assert summary["goal_reached_step"] == summary["env_steps"] == 300 and summary["goal_reached_s"] > 0
    assert summary["final_eval_return"] == 10 and len(scripted) == 1
