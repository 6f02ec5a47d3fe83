"""What dqn_atari.py and dqn_atari_dueling_per.py share: env-id mapping, the frame-deduplicated replay (stacks equal to
the env's, bit for bit), life-loss / reset-step / truncation handling, memory, smoke runs and TD targets."""

import cv2
import numpy as np
import pytest
import torch

from helpers import finished_counts, load_script, read_scalars, run_script

ATARI = ["dqn_atari", "dqn_atari_dueling_per"]


@pytest.fixture(params=ATARI)
def script(request):
    return request.param


@pytest.fixture
def dqn(script):
    return load_script(script)


# ---------------------------------------------------------------- env ids
def test_env_id_mapping(dqn):
    assert dqn.atari_game("BreakoutNoFrameskip-v4") == ("breakout", 0.0)
    assert dqn.atari_game("ALE/Breakout-v5") == ("breakout", 0.25)
    assert dqn.atari_game("SpaceInvadersNoFrameskip-v4") == ("space_invaders", 0.0)
    assert dqn.atari_game("ALE/MontezumaRevenge-v5") == ("montezuma_revenge", 0.25)


@pytest.mark.parametrize("env_id,hint", [("Breakout-v4", "BreakoutNoFrameskip-v4"),
                                         ("BreakotNoFrameskip-v4", "BreakoutNoFrameskip-v4"),
                                         ("ALE/Breakout-ram-v5", "ALE/Breakout-v5"),
                                         ("CartPole-v1", "not an Atari id")])
def test_unsupported_env_id_fails_with_close_matches(dqn, capsys, env_id, hint):
    with pytest.raises(SystemExit) as exit_info:
        dqn.atari_game(env_id)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and hint in err


# ---------------------------------------------------------------- replay memory
def test_memory_per_transition(dqn):
    rb = dqn.ReplayBuffer(1200, num_envs=4, storage=torch.device("cpu"), device=torch.device("cpu"))
    holders = [rb] + ([rb.tree] if hasattr(rb, "tree") else [])  # PER: the sum and min trees too
    stored = sum(t.nbytes for h in holders for t in vars(h).values() if isinstance(t, torch.Tensor) and t.ndim)
    per_transition = stored / 1200
    assert per_transition <= 7200  # bytes; CleanRL stores 28.2 KB, SB3 56.5 KB
    assert dqn.ReplayBuffer.bytes_needed(1200, 4) == stored
    assert 7.0e9 < dqn.ReplayBuffer.bytes_needed(1_000_000, 8) < 7.2e9  # the default 1M buffer in about 7 GB


def test_buffer_too_large_for_memory_fails_with_the_largest_that_fits(dqn, capsys):
    args = dqn.Args(buffer_size=10**9)
    with pytest.raises(SystemExit) as exit_info:
        dqn.replay_storage(args, torch.device("cpu"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    largest = int(err.rsplit("--buffer-size ", 1)[1])
    assert f"needs {dqn.ReplayBuffer.bytes_needed(10**9, args.num_envs) / 1e9:.1f} GB" in err and 0 < largest < 10**9
    # the suggestion fits (1% below it, as free memory moves a little between two readings)
    assert dqn.replay_storage(dqn.Args(buffer_size=int(largest * 0.99)), torch.device("cpu")) == torch.device("cpu")


def test_tiny_buffer_keeps_a_stack_per_env(dqn):
    rb = dqn.ReplayBuffer(10, num_envs=8, storage=torch.device("cpu"), device=torch.device("cpu"))
    assert rb.per_env == 6  # ceil(10 / 8) = 2 slots could not hold a 4-frame stack and a transition


class Recorder:
    """Wraps the script's training env and keeps every obs, action, reward and flag it returned, step by step."""

    def __init__(self, env):
        self.env, self.log = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.log.append(dict(obs=obs.copy(), actions=None, rewards=None, term=None, trunc=None, lives=info["lives"]))
        return obs, info

    def send(self, actions):
        self.actions = actions.copy()
        self.env.send(actions)

    def recv(self):
        obs, rewards, term, trunc, info = out = self.env.recv()
        self.log.append(dict(obs=obs.copy(), actions=self.actions, rewards=rewards.copy(), term=term.copy(),
                             trunc=trunc.copy(), lives=info["lives"].copy()))
        return out


@pytest.fixture
def recorded_run(dqn, tmp_path, monkeypatch):
    """Runs the script's own main() with random actions on Breakout, 3 envs, a buffer that wraps around 3 times and
    a 200-step frame cap, recording what the env returned and keeping the script's replay buffer."""
    monkeypatch.chdir(tmp_path)
    recorders, buffers = [], []
    make_env = dqn.make_env

    def recording_make_env(*args, **kwargs):
        env = make_env(*args, **kwargs)
        if kwargs.get("train"):
            recorders.append(Recorder(env))
            return recorders[-1]
        return env

    class KeptBuffer(dqn.ReplayBuffer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            buffers.append(self)

    monkeypatch.setattr(dqn, "make_env", recording_make_env)
    monkeypatch.setattr(dqn, "ReplayBuffer", KeptBuffer)
    dqn.main(dqn.Args(env_id="BreakoutNoFrameskip-v4", num_envs=3, total_timesteps=1800, buffer_size=600,
                      learning_starts=1700, train_frequency=50, start_e=1.0, end_e=1.0, max_episode_frames=800,
                      eval_episodes=1, run_name="rec", cuda=False, checkpoint_frequency=0))
    return recorders[-1].log, buffers[-1], tmp_path / "runs/rec"


def expected_transitions(log, rb):
    """For every slot the buffer holds, what the env says it should contain: (env, slot) -> step index w, for
    slots that are transitions (not the first frame of a game, not too old to have the frames of their obs)."""
    writes = len(log)  # the reset, then one slot per step
    assert rb.pos == writes % rb.per_env and rb.count == min(writes, rb.per_env)
    game_over = [np.zeros(rb.num_envs, dtype=bool)] + [(e["term"] & (e["lives"] == 0)) | e["trunc"] for e in log[1:]]
    # a slot younger than the 4 oldest has every frame of its 4-stack obs (or its game started inside the buffer)
    lowest = 1 if rb.count < rb.per_env else writes - rb.count + 4
    valid = {}
    for w in range(lowest, writes):
        for env in range(rb.num_envs):
            if not game_over[w - 1][env]:  # the step after a game over is the reset step: not a transition
                valid[(env, w % rb.per_env)] = w
    return valid


def test_sampled_stacks_equal_the_envs_bit_for_bit(recorded_run):
    log, rb, _ = recorded_run
    valid = expected_transitions(log, rb)
    indices = torch.tensor([env * rb.per_env + pos for env, pos in valid])
    batch = rb.gather(indices)
    kinds = {"life_loss": 0, "game_over": 0, "truncated": 0, "after_reset": 0}
    for i, (env, pos) in enumerate(valid):
        w = valid[(env, pos)]
        assert np.array_equal(batch.observations[i].numpy(), log[w - 1]["obs"][env]), (env, w)
        assert np.array_equal(batch.next_observations[i].numpy(), log[w]["obs"][env]), (env, w)
        assert batch.actions[i] == log[w]["actions"][env]
        assert batch.rewards[i] == log[w]["rewards"][env]
        assert batch.dones[i] == log[w]["term"][env]  # a life loss is terminal, a truncation is not
        kinds["life_loss"] += bool(log[w]["term"][env] and log[w]["lives"][env] > 0)
        kinds["game_over"] += bool(log[w]["term"][env] and log[w]["lives"][env] == 0)
        kinds["truncated"] += bool(log[w]["trunc"][env])
        kinds["after_reset"] += bool(log[w - 1]["obs"][env][0].max() == 0)  # obs padded with zeros
    assert min(kinds.values()) > 0, kinds  # the property was checked on every kind of boundary


def test_sampling_returns_only_transitions(recorded_run, script):
    log, rb, _ = recorded_run
    valid = expected_transitions(log, rb)
    batch = rb.sample(20_000) if script == "dqn_atari" else rb.sample(20_000, beta=0.4)  # PER: all at max priority
    slots = {(int(i) // rb.per_env, int(i) % rb.per_env) for i in batch.indices}
    assert slots <= set(valid)
    assert len(slots) > 0.95 * len(valid)  # and uniformly enough to reach nearly all of them
    # the stacks of sampled rows are those of their slots
    again = rb.gather(batch.indices[:64])
    assert torch.equal(again.observations, batch.observations[:64])


def test_logged_return_is_the_full_unclipped_game_score(recorded_run):
    log, _, run_dir = recorded_run
    scores, running = [], np.zeros(3)
    for entry in log[1:]:
        running += entry["rewards"]  # 0 on reset steps
        for env in np.flatnonzero((entry["term"] & (entry["lives"] == 0)) | entry["trunc"]):
            scores.append(running[env])
            running[env] = 0
    logged = [v for _, v in read_scalars(run_dir, "charts/episodic_return")]
    assert sorted(logged) == sorted(scores) and len(scores) >= 5
    assert max(logged) > 1  # several bricks: the per-life or clipped variants would differ


# ---------------------------------------------------------------- learner pieces
def test_nature_cnn_shapes_and_uint8_input(dqn, script):
    q = dqn.QNetwork(n_actions=6)
    out = q(torch.zeros((2, 4, 84, 84), dtype=torch.uint8))
    assert out.shape == (2, 6)
    # Nature CNN with 6 actions; dueling: the same torso, then 3136 -> 512 -> 1 and 3136 -> 512 -> 6 streams
    expected = {"dqn_atari": 1_687_206, "dqn_atari_dueling_per": 77_984 + 1_606_657 + 1_609_222}[script]
    assert sum(p.numel() for p in q.parameters()) == expected


# ---------------------------------------------------------------- whole runs
SMOKE = ["--learning-starts", 400, "--total-timesteps", 1200, "--buffer-size", 800, "--num-envs", 4,
         "--train-frequency", 4, "--target-network-frequency", 200, "--eval-episodes", 2,
         "--max-episode-frames", 2000, "--eval-frequency", 0, "--exploration-fraction", 1.0]


def test_smoke_run_updates_and_syncs(script, tmp_path):
    result = run_script(script, *SMOKE, "--run-name", "smoke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert finished_counts(result.stdout) == {"steps": 1200, "updates": 200, "target_syncs": 4}
    run_dir = tmp_path / "runs/smoke"
    assert len(read_scalars(run_dir, "losses/td_loss")) == 2
    assert len(read_scalars(run_dir, "eval/avg_max_q")) == 1 and len(read_scalars(run_dir, "eval/td_error")) == 1
    assert read_scalars(run_dir, "charts/episodic_return")
    if script == "dqn_atari_dueling_per":  # the importance-sampling exponent anneals from beta0 towards 1
        beta = [v for _, v in read_scalars(run_dir, "charts/beta")]
        assert beta == sorted(beta) and 0.4 < beta[0] < beta[-1] < 1


@pytest.mark.parametrize("save_model", [False, True])
def test_cleanrl_smoke_flags(script, tmp_path, save_model):
    flags = ["--learning-starts", 10, "--total-timesteps", 16, "--buffer-size", 10, "--batch-size", 4]
    result = run_script(script, *flags, *(["--save-model"] if save_model else []), "--run-name", "tiny",
                        "--eval-episodes", 1, "--max-episode-frames", 400, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert finished_counts(result.stdout)["updates"] == 2
    assert (tmp_path / f"runs/tiny/{script}.cleanrl_model").exists() == save_model


def test_play_mode_records_the_evaluated_game_as_video(script, tmp_path):
    flags = ["--learning-starts", 10, "--total-timesteps", 16, "--buffer-size", 10, "--batch-size", 4]
    trained = run_script(script, *flags, "--save-model", "--run-name", "v", "--eval-episodes", 1,
                         "--max-episode-frames", 400, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    played = run_script(script, "--play", tmp_path / f"runs/v/{script}.cleanrl_model", "--eval-episodes", 2,
                        "--eval-epsilon", 0.5, "--max-episode-frames", 2000, "--capture-video", cwd=tmp_path)
    assert played.returncode == 0, played.stderr
    assert "2 episodes of" in played.stdout
    assert "left the evaluated game's trajectory" not in played.stderr  # the colour env stayed in lockstep
    (video,) = (tmp_path / "videos").glob("*.mp4")
    capture = cv2.VideoCapture(str(video))
    ok, frame = capture.read()
    assert ok and frame.shape == (210, 160, 3) and capture.get(cv2.CAP_PROP_FRAME_COUNT) > 20
