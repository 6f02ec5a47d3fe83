"""What dqn_atari.py and dqn_atari_dueling_per.py share: env-id mapping, the frame-deduplicated replay (stacks equal to
those the agent acted on, bit for bit), life-loss / serve / reset-step / truncation handling, memory, smoke runs and TD
targets."""

import contextlib
import re
from typing import Optional

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import finished_counts, load_script, read_scalars, read_summary, run_main, run_script

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
    rb = dqn.ReplayBuffer(1200, num_envs=4, storage=torch.device("cpu"), device=torch.device("cpu"), gamma=0.99)
    holders = [rb] + ([rb.tree] if hasattr(rb, "tree") else [])  # PER: the sum and min trees too
    stored = sum(t.nbytes for h in holders for t in vars(h).values() if isinstance(t, torch.Tensor) and t.ndim)
    per_transition = stored / 1200
    assert per_transition <= 7200  # bytes; CleanRL stores 28.2 KB, SB3 56.5 KB
    assert dqn.ReplayBuffer.bytes_needed(1200, 4) == stored
    assert 7.0e9 < dqn.ReplayBuffer.bytes_needed(1_000_000, 8) < 7.2e9  # the default 1M buffer in about 7 GB


def test_buffer_too_large_for_memory_fails_with_the_largest_that_fits(dqn, capsys):
    args = dqn.Args(buffer_size=10**9)
    with pytest.raises(SystemExit) as exit_info:
        dqn.place_replay(args, torch.device("cpu"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    largest = int(err.rsplit("--buffer-size ", 1)[1])
    assert f"needs {dqn.ReplayBuffer.bytes_needed(10**9, args.num_envs) / 1e9:.1f} GB" in err and 0 < largest < 10**9
    # the suggestion fits (1% below it, as free memory moves a little between two readings)
    assert dqn.place_replay(dqn.Args(buffer_size=int(largest * 0.99)), torch.device("cpu")) == torch.device("cpu")


def test_tiny_buffer_keeps_a_stack_per_env(dqn):
    rb = dqn.ReplayBuffer(10, num_envs=8, storage=torch.device("cpu"), device=torch.device("cpu"), gamma=0.99)
    assert rb.per_env == 6  # ceil(10 / 8) = 2 slots could not hold a 4-frame stack and a transition


class FixedQ(torch.nn.Module):
    """Q-values that prefer action 2 in every state; counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tensor([0.0, 1.0, 3.0, 2.0]).expand(len(x), 4)


def test_epsilon_greedy_explores_with_probability_epsilon_else_takes_the_argmax(dqn):
    q_network, rng, obs = FixedQ(), np.random.default_rng(0), np.zeros((4000, 1), dtype=np.uint8)
    act = lambda epsilon: dqn.epsilon_greedy(q_network, obs, epsilon, 4, rng, torch.device("cpu"))  # noqa: E731
    assert (act(0.0) == 2).all()
    calls = q_network.calls
    random_actions = act(1.0)
    assert q_network.calls == calls  # all envs explore: the network is not run
    assert np.bincount(random_actions, minlength=4).min() > 900  # uniform over the 4 actions
    assert abs((act(0.2) != 2).mean() - 0.2 * 3 / 4) < 0.02  # a random action is the greedy one 1/4 of the time


class Recorder:
    """Wraps the script's training env and keeps every obs, action, reward and flag it returned, step by step."""

    def __init__(self, env):
        self.env, self.log = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.log.append(dict(obs=obs.copy(), actions=None, rewards=None, term=None, trunc=None, lives=info["lives"],
                             frames=info["episode_frame_number"].copy()))
        return obs, info

    def send(self, actions):
        self.actions = actions.copy()
        self.env.send(actions)

    def recv(self):
        obs, rewards, term, trunc, info = out = self.env.recv()
        self.log.append(dict(obs=obs.copy(), actions=self.actions, rewards=rewards.copy(), term=term.copy(),
                             trunc=trunc.copy(), lives=info["lives"].copy(),
                             frames=info["episode_frame_number"].copy()))
        return out


acted_on: list[np.ndarray] = []  # the obs a record_main policy acted on in training, one (N, 4, 84, 84) per step


def record_main(dqn, tmp_path, monkeypatch, action: Optional[int] = None, **overrides):
    """Runs the script's own main() on Breakout (unless overridden), recording what the training env returned and
    keeping the script's replay buffer. action=k: a network whose greedy action is always k and no exploration (k=0,
    NOOP: a policy that never presses FIRE itself); the obs it acted on in training are then kept in `acted_on`."""
    monkeypatch.chdir(tmp_path)
    recorders, buffers = [], []
    acted_on.clear()
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

    class ConstantPolicy(dqn.QNetwork):
        def forward(self, x):
            if len(x) == args.num_envs:  # acting in training (evaluation, updates and held-out use other sizes)
                acted_on.append(x.cpu().numpy().copy())
            q_values = super().forward(x)
            return q_values * 0 + F.one_hot(torch.tensor(action), q_values.shape[1])

    monkeypatch.setattr(dqn, "make_env", recording_make_env)
    monkeypatch.setattr(dqn, "ReplayBuffer", KeptBuffer)
    if action is not None:
        monkeypatch.setattr(dqn, "QNetwork", ConstantPolicy)
        overrides = {"start_e": 0.0, "end_e": 0.0, "eval_epsilon": 0.0, **overrides}
    args = dqn.Args(**{**dict(env_id="BreakoutNoFrameskip-v4", eval_episodes=1, run_name="rec", cuda=False,
                              checkpoint_frequency=0), **overrides})
    assert args.num_envs not in (args.eval_episodes, args.batch_size, dqn.HELD_OUT)  # so acted_on is training's
    dqn.main(args)
    return recorders[-1].log, buffers[-1], tmp_path / "runs" / args.run_name


@pytest.fixture
def recorded_run(dqn, tmp_path, monkeypatch):
    """Random actions, 3 envs, a buffer that wraps around 3 times and a 200-step frame cap."""
    return record_main(dqn, tmp_path, monkeypatch, num_envs=3, total_timesteps=1800, buffer_size=600,
                       learning_starts=1700, train_frequency=50, start_e=1.0, end_e=1.0, max_episode_frames=800)


def reset_steps(log) -> np.ndarray:
    """(steps, envs): where the env reset, seen in the obs alone, not in the flags: ale-py pads a new game's first
    stack with zeros, [0, 0, 0, f0], which no frame of a game in progress is (Breakout and Ms. Pac-Man never show a
    black screen)."""
    return np.array([[not obs[-2].any() for obs in entry["obs"]] for entry in log])


def game_overs(log) -> np.ndarray:
    """(steps - 1, envs): where a game ended, as ale-py decided it: the next step was its reset step."""
    return reset_steps(log)[1:]


def serves(log) -> np.ndarray:
    """(steps, envs): the serves, i.e. the steps right after a lost life (a termination that did not end the game)."""
    over = game_overs(log)
    return np.array([np.zeros(len(log[0]["obs"]), dtype=bool)] + [
        log[w - 1]["term"] & ~over[w - 1] if w > 1 else np.zeros_like(over[0]) for w in range(1, len(log))])


def acting_stack(log, serve: np.ndarray, w: int, env: int) -> np.ndarray:
    """The stack an agent acts on after step w (serve: serves(log)): the env's, with frames from before the last
    serve zeroed (a new life starts its stack as a new game does, [0, 0, 0, f0])."""
    stack = log[w]["obs"][env].copy()
    since = next((j for j in range(4) if w - j >= 0 and serve[w - j, env]), None)  # steps since a serve in the stack
    if since is not None:
        stack[:3 - since] = 0
    return stack


def expected_transitions(log, rb):
    """For every slot the buffer holds, what the env says it should contain: (env, slot) -> step index w, for
    slots that are transitions (not the first frame of a game, not too old to have the frames of their obs)."""
    writes = len(log)  # the reset, then one slot per step
    assert rb.pos == writes % rb.per_env and rb.count == min(writes, rb.per_env)
    reset = reset_steps(log)
    # a slot younger than the 4 oldest has every frame of its 4-stack obs (or its game started inside the buffer)
    lowest = 1 if rb.count < rb.per_env else writes - rb.count + 4
    valid = {}
    serve = serves(log)
    for w in range(lowest, writes):
        for env in range(rb.num_envs):
            if not reset[w][env] and not serve[w][env]:  # a game's or a life's first step is not a transition
                valid[(env, w % rb.per_env)] = w
    return valid


def check_stacks(log, rb) -> dict:
    """Asserts that every transition the buffer holds is the env's, bit for bit; returns how many of each kind of
    boundary the check crossed."""
    valid = expected_transitions(log, rb)
    batch = rb.gather(torch.tensor([env * rb.per_env + pos for env, pos in valid], device=rb.storage))
    batch = type(batch)(*(t.cpu() for t in batch))
    over = game_overs(log)
    serve = serves(log)
    kinds = {"life_loss": 0, "game_over": 0, "truncated": 0, "after_reset": 0, "new_life": 0, "capped_life_loss": 0}
    for i, (env, pos) in enumerate(valid):
        w = valid[(env, pos)]
        assert np.array_equal(batch.observations[i].numpy(), acting_stack(log, serve, w - 1, env)), (env, w)
        assert np.array_equal(batch.next_observations[i].numpy(), acting_stack(log, serve, w, env)), (env, w)
        assert batch.actions[i] == log[w]["actions"][env]
        assert batch.rewards[i] == np.sign(log[w]["rewards"][env])  # stored clipped, as the learner uses it
        assert batch.dones[i] == log[w]["term"][env]  # a life loss is terminal, a truncation is not
        assert rb.truncations[env, pos] == log[w]["trunc"][env] and batch.discounts[i] == pytest.approx(rb.gamma)
        ended = w < len(over) and over[w][env]
        kinds["life_loss"] += bool(log[w]["term"][env] and not ended)
        kinds["game_over"] += bool(log[w]["term"][env] and ended)
        kinds["truncated"] += bool(log[w]["trunc"][env])
        kinds["after_reset"] += bool(log[w - 1]["obs"][env][0].max() == 0)  # obs padded with zeros
        # a new life's obs: the env's stack, restarted at the serve
        kinds["new_life"] += not np.array_equal(acting_stack(log, serve, w - 1, env), log[w - 1]["obs"][env])
        kinds["capped_life_loss"] += bool(ended and log[w]["term"][env] and log[w]["lives"][env] > 0)
    return kinds


def test_sampled_stacks_equal_the_acting_stacks_bit_for_bit(recorded_run):
    log, rb, _ = recorded_run
    kinds = check_stacks(log, rb)
    assert min(v for k, v in kinds.items() if k != "capped_life_loss") > 0, kinds  # every kind of boundary checked


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


def logged_scores_match_the_games(log, run_dir):
    """The logged returns are the full, unclipped scores of the games ale-py ended (the last step's game over, which
    the log cannot confirm, excluded); returns how many games ended."""
    over, scores, running = game_overs(log), [], np.zeros(len(log[0]["obs"]))
    for w, entry in enumerate(log[1:-1], start=1):
        running += entry["rewards"]  # 0 on reset steps
        for env in np.flatnonzero(over[w]):
            scores.append(running[env])
            running[env] = 0
    last_step = max(s for s, _ in read_scalars(run_dir, "charts/SPS") + read_scalars(run_dir, "eval/episodic_return"))
    logged = [v for s, v in read_scalars(run_dir, "charts/episodic_return") if s < last_step]
    assert sorted(logged) == sorted(scores)
    return scores


def test_logged_return_is_the_full_unclipped_game_score(recorded_run):
    log, _, run_dir = recorded_run
    scores = logged_scores_match_the_games(log, run_dir)
    assert len(scores) >= 5 and max(scores) > 1  # several bricks: the per-life or clipped variants would differ


# ---------------------------------------------------------------- life loss: the serve and the end of a game
BREAKOUT_FIRE, NOOP, MSPACMAN_RIGHT = 1, 0, 2


def test_noop_policy_is_served_after_every_lost_life_and_loses_its_games(dqn, tmp_path, monkeypatch):
    log, rb, run_dir = record_main(dqn, tmp_path, monkeypatch, action=NOOP, num_envs=2, total_timesteps=700,
                                   buffer_size=4000, learning_starts=690, train_frequency=50)
    over, serve = game_overs(log), serves(log)
    assert len(acted_on) == len(log) - 1  # the policy acted on every step's obs but the last
    life_losses = 0
    for w in range(1, len(log) - 1):
        for env in range(2):
            lost = bool(log[w]["term"][env] and not over[w][env])
            life_losses += lost
            # the step after a lost life is FIRE (the serve), every other step the policy's NOOP
            assert log[w + 1]["actions"][env] == (BREAKOUT_FIRE if lost else NOOP), (w, env)
            # the policy acts on the new life's restarted stack, the one the replay rebuilds
            assert np.array_equal(acted_on[w][env], acting_stack(log, serve, w, env)), (w, env)
            if lost:  # the serve is not a transition, and the next stack holds only its frame
                assert rb.firsts[env, w + 1]
                assert not acted_on[w + 1][env][:3].any() and acted_on[w + 1][env][3].any()
    # without the serve, a NOOP policy stalls after its first lost life until the 108k-frame cap
    assert over.sum() >= 4 and life_losses >= 4 * over.sum()
    assert max(e["frames"].max() for e in log) < 2_000
    assert len(logged_scores_match_the_games(log, run_dir)) == over.sum()


def test_noop_policy_ends_its_evaluation_games_long_before_the_cap(dqn):
    class NoopQNetwork(dqn.QNetwork):
        def forward(self, x):
            return super().forward(x) * 0

    returns, lengths = dqn.evaluate(NoopQNetwork(4), "breakout", 0.0, 108_000, episodes=3, epsilon=0.0, seed=0,
                                    device=torch.device("cpu"))
    assert (0 < lengths).all() and (lengths < 2_000).all(), lengths  # 108,000 frames without the serve


def test_a_game_without_fire_serves_a_noop(dqn, tmp_path, monkeypatch):
    log, rb, _ = record_main(dqn, tmp_path, monkeypatch, action=MSPACMAN_RIGHT, env_id="MsPacmanNoFrameskip-v4",
                             num_envs=1, eval_episodes=2, total_timesteps=450, buffer_size=1000, learning_starts=440,
                             train_frequency=50)
    serve = serves(log)[:, 0]
    assert serve.sum() >= 2  # lives were lost
    # the step after a lost life is NOOP (CleanRL's EpisodicLifeEnv steps NOOP at a lost life), every other the policy's
    assert [e["actions"][0] for e in log[1:]] == [NOOP if s else MSPACMAN_RIGHT for s in serve[1:]]
    assert (rb.firsts[0, 1:len(log)].numpy() == serve[1:]).all()  # the serves, and only they, start a stack


class FakeVectorEnv:
    """What Games reads of an env: its action set."""

    def __init__(self, actions):
        self.ale = type("ALE", (), {"get_action_set": staticmethod(lambda: actions)})()


def test_game_end_and_serve_follow_ale_pys_rules(dqn):
    import ale_py

    A = ale_py.Action
    start = {"lives": np.array([5, 1, 5, 5, 5]), "episode_frame_number": np.full(5, 16)}
    games = dqn.Games(FakeVectorEnv([A.NOOP, A.FIRE, A.RIGHT, A.LEFT]), start, max_frames=100)
    assert games.serve_action == 1
    # env 0: a life lost; 1: a game whose lives never change (Adventure) terminates; 2: a life lost on the step that
    # reaches the cap (ale-py reports terminated only, yet resets); 3: truncated; 4: a life lost in an evaluation env
    # (no life-loss termination)
    terminations = np.array([True, True, True, False, False])
    truncations = np.array([False, False, False, True, False])
    infos = {"lives": np.array([4, 1, 4, 5, 4]), "episode_frame_number": np.array([60, 60, 116, 116, 60])}
    assert games.step(terminations, truncations, infos).tolist() == [False, True, True, True, False]
    assert games.act(np.full(5, 3)).tolist() == [1, 3, 3, 3, 1]  # FIRE only after a lost life that goes on
    assert not games.starts.any()
    # the reset steps of envs 1-3: no game over, no serve; the cap counts from the new game's first frame
    infos = {"lives": np.array([4, 1, 5, 5, 4]), "episode_frame_number": np.array([64, 30, 30, 30, 64])}
    assert not games.step(np.zeros(5, bool), np.zeros(5, bool), infos).any()
    assert games.act(np.full(5, 3)).tolist() == [3] * 5
    # this step started new games (1-3) and new lives (0, 4): each env's stack holds this step's frame alone
    assert games.starts.all()
    assert games.stack(np.ones((5, 4, 2, 2), np.uint8))[:, :, 0, 0].tolist() == [[0, 0, 0, 1]] * 5
    infos = {"lives": np.array([4, 1, 4, 5, 4]), "episode_frame_number": np.array([68, 129, 129, 34, 68])}
    assert games.step(np.array([False, False, True, False, False]), np.zeros(5, bool), infos).tolist() == [
        False, False, False, False, False]  # 99 frames into the new games: the cap (100) is not reached yet
    assert games.act(np.full(5, 3)).tolist() == [3, 3, 1, 3, 3]
    assert not games.starts.any()
    assert games.stack(np.ones((5, 4, 2, 2), np.uint8))[:, :, 0, 0].tolist() == [[0, 0, 1, 1]] * 5
    no_fire = dqn.Games(FakeVectorEnv([A.UP, A.NOOP, A.DOWN]), start, max_frames=100)
    no_fire.step(terminations, truncations, {**infos, "lives": np.array([4, 1, 4, 5, 4])})
    assert no_fire.act(np.full(5, 2)).tolist() == [1, 2, 2, 2, 1]  # NOOP where there is no FIRE to serve with


def test_a_game_over_the_rule_cannot_see_is_caught_at_its_reset_step(dqn):
    """Lives down but still above 0 on the step a game ends (no ROM is known to do it; ale-py's flags allow it): the
    rule takes it for a life loss, and ale-py resets on the next step, whose frame counter restarts."""
    import ale_py

    A = ale_py.Action
    games = dqn.Games(FakeVectorEnv([A.NOOP, A.FIRE]), {"lives": np.array([3, 3]), "episode_frame_number":
                                                      np.array([16, 16])}, max_frames=10_000)
    step = {"lives": np.array([2, 3]), "episode_frame_number": np.array([200, 200])}
    assert not games.step(np.array([True, False]), np.zeros(2, bool), step).any()  # looks like a lost life
    assert not games.reset_step.any() and not games.missed.any()
    reset = {"lives": np.array([3, 3]), "episode_frame_number": np.array([20, 204])}  # env 0 was reset
    assert not games.step(np.zeros(2, bool), np.zeros(2, bool), reset).any()
    assert games.reset_step.tolist() == [True, False] and games.missed.tolist() == [True, False]
    assert games.length[0] == 200 - 16  # the game that ended, counted as the cap counts
    assert games.act(np.zeros(2, dtype=np.int64)).tolist() == [0, 0]  # no serve at the start of the new game
    step = {"lives": np.array([3, 3]), "episode_frame_number": np.array([24, 208])}
    assert not games.step(np.zeros(2, bool), np.zeros(2, bool), step).any() and not games.reset_step.any()


def test_a_life_loss_on_the_capped_step_ends_the_game(dqn, tmp_path, monkeypatch):
    """The frame cap chosen so that it falls on the step of env 0's first lost life (found with a first, uncapped
    run of the same deterministic NOOP policy): ale-py reports terminated only, with lives > 0, and resets."""
    flags = dict(num_envs=2, total_timesteps=400, buffer_size=4000, learning_starts=390, train_frequency=50)
    probe, _, _ = record_main(dqn, tmp_path, monkeypatch, action=NOOP, run_name="probe", **flags)
    w = next(w for w, e in enumerate(probe[1:], start=1) if e["term"][0])  # env 0's first life loss
    cap = int(probe[w]["frames"][0] - probe[0]["frames"][0])
    log, rb, run_dir = record_main(dqn, tmp_path, monkeypatch, action=NOOP, max_episode_frames=cap, **flags)
    assert log[w]["term"][0] and not log[w]["trunc"][0] and log[w]["lives"][0] > 0  # the coincidence happened
    assert reset_steps(log)[w + 1][0]  # and ale-py reset the game
    # the reset step is not stored as a transition, and no stack across the two games is wrong
    assert (0, (w + 1) % rb.per_env) not in expected_transitions(log, rb)
    assert rb.firsts[0, (w + 1) % rb.per_env]  # marked as a game's first frame
    assert check_stacks(log, rb)["capped_life_loss"] > 0
    # the game's score was logged as a game over (not merged with the next game's)
    assert len(logged_scores_match_the_games(log, run_dir)) >= 2


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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The SMOKE run of each Atari script, done once and read by the tests below: {script: its folder}."""
    done = {}

    def run(script):
        if script not in done:
            cwd = tmp_path_factory.mktemp(script)
            result = run_main(script, *SMOKE, "--run-name", "smoke", cwd=cwd)
            assert result.returncode == 0, result.stderr
            done[script] = cwd
        return done[script]
    return run


def test_smoke_run_updates_and_syncs(script, smoke):
    tmp_path = smoke(script)
    assert finished_counts(tmp_path / "runs/smoke") == {"steps": 1200, "updates": 200, "target_syncs": 4}
    run_dir = tmp_path / "runs/smoke"
    assert len(read_scalars(run_dir, "losses/td_loss")) == 2
    assert len(read_scalars(run_dir, "eval/avg_max_q")) == 1 and len(read_scalars(run_dir, "eval/td_error")) == 1
    assert read_scalars(run_dir, "charts/episodic_return")
    # summary.json: what a program reads from a run, consistent with its TensorBoard events
    summary = read_summary(run_dir)
    (eval_step, eval_return), = read_scalars(run_dir, "eval/episodic_return")
    assert summary["stop_reason"] == "completed" and summary["run_name"] == "smoke" and eval_step == 1200
    assert summary["final_eval_return"] == summary["best_eval_return"] == pytest.approx(eval_return)
    assert summary["env_steps_this_process"] == 1200 and summary["training_sps"] > 0 and summary["wall_s"] > 0
    assert summary["args"]["total_timesteps"] == 1200 and summary["script"] == f"{script}.py"
    # step 1200 updates, then syncs: the final checkpoint's target is its trained network (tests/test_rules.py checks
    # every sync of a tiny run; target_syncs only counts them)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["target_model"][k], v) for k, v in state["model"].items())
    if script == "dqn_atari_dueling_per":  # the importance-sampling exponent anneals from beta0 towards 1
        beta = [v for _, v in read_scalars(run_dir, "charts/beta")]
        assert beta == sorted(beta) and 0.4 < beta[0] < beta[-1] < 1


def test_same_seed_same_returns_another_seed_others(script, smoke, tmp_path):
    # CPU determinism of the whole run, the learner included: the smoke run again gives the same games
    again = run_main(script, *SMOKE, "--run-name", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    returns = read_scalars(smoke(script) / "runs/smoke", "charts/episodic_return")
    assert len(returns) >= 3 and read_scalars(tmp_path / "runs/again", "charts/episodic_return") == returns
    assert finished_counts(tmp_path / "runs/again")["updates"] == 200
    # another seed plays other games from the start (its first 600 steps suffice to tell)
    other = run_main(script, *SMOKE, "--total-timesteps", 600, "--seed", 2, "--run-name", "other", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    other_returns = read_scalars(tmp_path / "runs/other", "charts/episodic_return")
    assert other_returns and other_returns != [(step, r) for step, r in returns if step <= 600]


@pytest.mark.parametrize("save_model", [False, True])
def test_cleanrl_smoke_flags(script, tmp_path, save_model):
    flags = ["--learning-starts", 10, "--total-timesteps", 16, "--buffer-size", 10, "--batch-size", 4]
    result = run_main(script, *flags, *(["--save-model"] if save_model else []), "--run-name", "tiny",
                        "--eval-episodes", 1, "--max-episode-frames", 400, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert finished_counts(tmp_path / "runs/tiny")["updates"] == 2
    assert (tmp_path / f"runs/tiny/{script}.cleanrl_model").exists() == save_model


def test_play_mode_records_the_evaluated_game_as_video(script, tmp_path):
    flags = ["--learning-starts", 10, "--total-timesteps", 16, "--buffer-size", 10, "--batch-size", 4]
    trained = run_main(script, *flags, "--save-model", "--run-name", "v", "--eval-episodes", 1,
                         "--max-episode-frames", 400, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    played = run_main(script, "--play", tmp_path / f"runs/v/{script}.cleanrl_model", "--eval-episodes", 2,
                        "--eval-epsilon", 0.5, "--max-episode-frames", 2000, "--capture-video", cwd=tmp_path)
    assert played.returncode == 0, played.stderr
    assert "2 episodes of" in played.stdout and re.search(r"mean length [\d,]+ frames", played.stdout)
    assert "left the evaluated game's trajectory" not in played.stderr  # the colour env stayed in lockstep
    (video,) = (tmp_path / "videos").glob("*.mp4")
    capture = cv2.VideoCapture(str(video))
    ok, frame = capture.read()
    assert ok and frame.shape == (210, 160, 3) and capture.get(cv2.CAP_PROP_FRAME_COUNT) > 20


# ---------------------------------------------------------------- --cudagraphs and --compile
def random_replay(dqn, device: torch.device, capacity: int = 400, num_envs: int = 2):
    """A replay buffer filled through add() with random frames, actions, rewards and 2% life losses."""
    kwargs = {"alpha": 0.6, "eps": 1e-6} if hasattr(dqn, "SumTree") else {}
    rb, rng = dqn.ReplayBuffer(capacity, num_envs, device, device, 0.99, **kwargs), np.random.default_rng(0)
    no = np.zeros(num_envs, dtype=bool)
    rb.add(rng.integers(0, 256, (num_envs, 84, 84), dtype=np.uint8), *np.zeros((4, num_envs)), firsts=~no)
    for _ in range(rb.per_env + 10):
        rb.add(rng.integers(0, 256, (num_envs, 84, 84), dtype=np.uint8), rng.integers(4, size=num_envs),
               rng.normal(size=num_envs), rng.random(num_envs) < 0.02, no, firsts=no)
    return rb


def learner(dqn, run, rb, graphs: bool):
    """The script's make_learner as a no-argument update (PER's takes beta)."""
    learn = dqn.make_learner(run, rb, run_args(dqn, batch_size=32), graphs)
    return (lambda: learn(0.4)) if hasattr(dqn, "SumTree") else learn


def run_args(dqn, **overrides):
    return dqn.Args(learning_rate=1e-3, **overrides)  # a large step, so that an update left undone would show


def learner_state(run, rb) -> list[torch.Tensor]:
    tree = [rb.tree.sums, rb.tree.mins, rb.max_priority] if hasattr(rb, "tree") else []
    adam = [v for state in run.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return [*run.q_network.parameters(), *run.target_network.parameters(), *adam, *tree]


class StandInGraph:
    """torch.cuda's graph on the CPU: the capture block runs eagerly (the update it records, on the batch sampled for
    it); a replay does nothing, so only the updates up to the capture can be compared with eager ones."""

    def replay(self):
        pass


class StandInStream:
    def wait_stream(self, other):
        pass


def stand_in_for_cuda_graphs(monkeypatch):
    for name, stand_in in [("CUDAGraph", StandInGraph), ("Stream", StandInStream), ("current_stream", StandInStream),
                           ("stream", lambda stream: contextlib.nullcontext()),
                           ("graph", lambda graph: contextlib.nullcontext())]:
        monkeypatch.setattr(torch.cuda, name, stand_in)


def test_the_graph_paths_warm_ups_and_capture_are_real_counted_updates(dqn, monkeypatch):
    """make_learner's graph path: WARM_UPS eager updates, then the capture of the next one. With torch.cuda's graph
    calls stood in for on the CPU, those WARM_UPS + 1 updates must equal eager updates from the same state and RNG,
    bit for bit (weights, Adam's state, PER's tree): nothing is warmed up and undone, and no batch is skipped."""
    stand_in_for_cuda_graphs(monkeypatch)
    cpu, results = torch.device("cpu"), []
    for graphs in (False, True):
        rb = random_replay(dqn, cpu)
        torch.manual_seed(0)
        run = dqn.RunState(run_args(dqn), 4, cpu, rb)
        learn = learner(dqn, run, rb, graphs)
        stats = torch.stack([learn().clone() for _ in range(dqn.WARM_UPS + 1)])
        if hasattr(rb, "apply_pending_priorities"):  # eagerly the new priorities reach the tree at the next add
            rb.apply_pending_priorities()
        results.append((stats, [t.clone() for t in learner_state(run, rb)]))
    (stats_e, state_e), (stats_g, state_g) = results
    assert torch.equal(stats_e, stats_g) and len(set(stats_e[:, 0].tolist())) == dqn.WARM_UPS + 1
    assert all(torch.equal(a, b) for a, b in zip(state_e, state_g, strict=True))


def test_a_capture_that_fails_propagates_and_leaves_no_pending_graph_memory(dqn, monkeypatch):
    stand_in_for_cuda_graphs(monkeypatch)
    cpu, train_step, calls = torch.device("cpu"), dqn.train_step, []
    rb = random_replay(dqn, cpu)
    run = dqn.RunState(run_args(dqn), 4, cpu, rb)

    def capture_fails(*args, **kwargs):
        stats = train_step(*args, **kwargs)  # PER: its new priorities are pending
        calls.append(1)
        if len(calls) == dqn.WARM_UPS + 1:
            raise RuntimeError("CUDA out of memory")
        return stats
    monkeypatch.setattr(dqn, "train_step", capture_fails)
    learn = learner(dqn, run, rb, graphs=True)
    for _ in range(dqn.WARM_UPS):
        learn()
    with pytest.raises(RuntimeError, match="out of memory"):
        learn()
    assert getattr(rb, "pending", None) is None


def test_a_capturable_adams_checkpoint_loads_and_steps_on_the_cpu(dqn):
    """A --cudagraphs run saves Adam with capturable=True; the CPU run that loads it takes its own setting."""
    cpu = torch.device("cpu")
    rb = random_replay(dqn, cpu)
    run = dqn.RunState(run_args(dqn), 4, cpu, rb)
    learner(dqn, run, rb, graphs=False)()
    state = run.state_dict()
    state["optimizer"]["param_groups"][0]["capturable"] = True
    again = dqn.RunState(run_args(dqn), 4, cpu, rb)
    again.load_state_dict(state)
    assert [g["capturable"] for g in again.optimizer.param_groups] == [False]
    learner(dqn, again, rb, graphs=False)()  # a capturable Adam would refuse CPU state steps


def test_gpu_flags_on_the_cpu_warn_once_and_change_nothing(script, tmp_path):
    flags = ["--learning-starts", 10, "--total-timesteps", 16, "--buffer-size", 10, "--batch-size", 4,
             "--eval-episodes", 1, "--max-episode-frames", 400, "--no-cuda"]
    result = run_main(script, *flags, "--cudagraphs", "--compile", "--run-name", "g", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: --cudagraphs needs the replay in GPU memory, --compile a GPU; ignored") == 1
    assert "CUDA graph" not in result.stdout and finished_counts(tmp_path / "runs/g")["updates"] == 2


# ---------------------------------------------------------------- CUDA (skipped where no GPU is present)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")


@needs_cuda
def test_cuda_graphed_updates_equal_eager_updates(dqn, monkeypatch):
    """50 updates from the same state, each from the same RNG seed: the graph replays the eager update's kernels (PER:
    its sampling and priority write-back too), so losses, weights, Adam's state and PER's sum tree agree to float
    tolerance."""
    cuda, results = torch.device("cuda"), []
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # as the scripts run; else the runs may part
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for graphs in (False, True):
        rb = random_replay(dqn, cuda)
        torch.manual_seed(0)
        run = dqn.RunState(run_args(dqn), 4, cuda, rb, graphs)
        learn, stats = learner(dqn, run, rb, graphs), []
        for i in range(50):
            torch.cuda.manual_seed(i)
            stats.append(learn().clone())
        if hasattr(rb, "apply_pending_priorities"):
            rb.apply_pending_priorities()
        results.append((torch.stack(stats), learner_state(run, rb)))
    (stats_e, state_e), (stats_g, state_g) = results
    assert torch.allclose(stats_e, stats_g, rtol=1e-4, atol=1e-6)
    assert all(torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)
               for a, b in zip(state_e, state_g, strict=True))


@needs_cuda
def test_cuda_graphed_update_never_syncs_with_the_host(dqn):
    cuda = torch.device("cuda")
    rb = random_replay(dqn, cuda)
    learn = learner(dqn, dqn.RunState(run_args(dqn), 4, cuda, rb, True), rb, graphs=True)
    for _ in range(dqn.WARM_UPS + 1):  # the warm-ups, then the capture
        learn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            learn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("flags", [["--cudagraphs"], ["--cudagraphs", "--compile"]])
def test_cuda_graphs_smoke_run(script, tmp_path, flags):
    result = run_script(script, *SMOKE, "--cuda", *flags, "--run-name", "smoke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "learner on cuda, each update one CUDA graph" in result.stdout
    assert finished_counts(tmp_path / "runs/smoke") == {"steps": 1200, "updates": 200, "target_syncs": 4}


@needs_cuda
@pytest.mark.parametrize("storage", ["cuda", "cpu"])  # the buffer on the GPU, or host storage feeding a GPU learner
def test_cuda_stacks_equal_the_acting_stacks_and_sampling_returns_transitions(recorded_run, dqn, script, storage):
    log, cpu_rb, _ = recorded_run
    rb = dqn.ReplayBuffer(600, 3, torch.device(storage), torch.device("cuda"), 0.99)
    rb.load_state_dict(cpu_rb.state_dict())
    assert min(v for k, v in check_stacks(log, rb).items() if k != "capped_life_loss") > 0
    batch = rb.sample(4096) if script == "dqn_atari" else rb.sample(4096, beta=0.4)
    assert batch.observations.device.type == "cuda" and batch.indices.device.type == storage
    slots = {(int(i) // rb.per_env, int(i) % rb.per_env) for i in batch.indices}
    assert slots <= set(expected_transitions(log, rb))


@needs_cuda
def test_cuda_smoke_run(script, tmp_path):
    result = run_script(script, *SMOKE, "--cuda", "--run-name", "smoke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "learner on cuda" in result.stdout
    assert finished_counts(tmp_path / "runs/smoke") == {"steps": 1200, "updates": 200, "target_syncs": 4}
