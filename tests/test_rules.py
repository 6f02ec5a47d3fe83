"""The DQN's rules, for each script where they apply (issue 31): target sync, epsilon, evaluation, what the replay
stores, the TD target, PER's loss and priorities, resume, and the Huber and Double fork recipes. Machine-independent:
hand-computed values, scripted envs, and main() watched through the module-level functions it calls.
tests/mutants.py plants a bug for each rule and checks that these tests catch it."""

import inspect
import io

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import SCRIPTS, load_script
from test_atari import record_main
from test_cartpole import CountingEnv  # noqa: F401  (registers tests/Counting-v0)
from test_forks import NewestTag, apply_fork

ATARI = ["dqn_atari", "dqn_atari_dueling_per"]
CPU = torch.device("cpu")
# tiny runs: a few updates and syncs; num_envs > 1 and a sync frequency that is no multiple of it
TINY = {"dqn_cartpole": dict(total_timesteps=40, learning_starts=10, num_envs=2, train_frequency=1,
                             target_network_frequency=5, buffer_size=100, batch_size=4),
        "dqn_atari": dict(total_timesteps=36, learning_starts=6, num_envs=3, train_frequency=2,
                          target_network_frequency=5, buffer_size=60, batch_size=4, max_episode_frames=400)}
TINY["dqn_atari_dueling_per"] = TINY["dqn_atari"]


def params(network: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in network.parameters()]


class Table(nn.Module):
    """Q(s, .) = one fixed row per batch row, whatever the states."""

    def __init__(self, rows):
        super().__init__()
        self.rows = torch.tensor(rows)

    def forward(self, x):
        return self.rows


def make_batch(dqn, **fields) -> tuple:
    """The script's Batch from the fields given; indices 0..B-1 and unit importance weights where it has them."""
    size = len(fields["rewards"])
    defaults = {"indices": torch.arange(size), "weights": torch.ones(size)}
    return dqn.Batch(**{name: fields[name] if name in fields else defaults[name] for name in dqn.Batch._fields})


def quiet_main(dqn, monkeypatch, tmp_path, **flags):
    """main() on a tiny run in tmp_path, evaluation stubbed out (Atari: 8 held-out transitions); returns the
    epsilons evaluate() was called with."""
    monkeypatch.chdir(tmp_path)
    evaluate, eval_epsilons = dqn.evaluate, []

    def stub_evaluate(*args, **kwargs):
        call = inspect.signature(evaluate).bind(*args, **kwargs).arguments
        eval_epsilons.append(call["epsilon"])
        returns = np.zeros(call["episodes"])
        return returns if "env_id" in call else (returns, returns)

    monkeypatch.setattr(dqn, "evaluate", stub_evaluate)
    if hasattr(dqn, "HELD_OUT"):
        monkeypatch.setattr(dqn, "HELD_OUT", 8)
    dqn.main(dqn.Args(**{"eval_frequency": 0, "eval_episodes": 1, "run_name": "r", "cuda": False,
                         "checkpoint_frequency": 0, **flags}))
    return eval_epsilons


# ---------------------------------------------------------------- target sync and epsilon, seen in main()
@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """main() on a TINY run with target rate tau, watched: each update and sync as (kind, global_step, ok), ok
    meaning an update saw the target as the last sync left it and a sync gave tau * online + (1 - tau) * before;
    each training action's (global_step, epsilon); evaluate()'s epsilons. Cached per (script, tau)."""
    done = {}

    def run(script, tau):
        if (script, tau) in done:
            return done[script, tau]
        dqn, runs, frozen = load_script(script), [], []
        seen = {"events": [], "epsilons": []}
        train_step, update_target, epsilon_greedy = dqn.train_step, dqn.update_target, dqn.epsilon_greedy

        class KeptRun(dqn.RunState):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                runs.append(self)
                frozen[:] = params(self.target_network)

        def watched_train_step(q_network, target_network, *rest):
            unchanged = all(torch.equal(t, f) for t, f in zip(target_network.parameters(), frozen, strict=True))
            seen["events"].append(("update", runs[-1].global_step, unchanged))
            return train_step(q_network, target_network, *rest)

        def watched_update_target(target_network, q_network, rate):
            before = params(target_network)
            update_target(target_network, q_network, rate)
            pairs = list(zip(target_network.parameters(), before, q_network.parameters(), strict=True))
            if tau == 1.0:  # a hard sync: the target is the online network, bit for bit
                ok = all(torch.equal(t, p) for t, _, p in pairs)
            else:
                ok = all(torch.allclose(t, b + tau * (p - b), rtol=0, atol=1e-6) for t, b, p in pairs)
            seen["events"].append(("sync", runs[-1].global_step, ok))
            frozen[:] = params(target_network)

        def watched_epsilon_greedy(q_network, obs, epsilon, *rest):
            seen["epsilons"].append((runs[-1].global_step, epsilon))
            return epsilon_greedy(q_network, obs, epsilon, *rest)

        flags = dict(TINY[script], tau=tau, start_e=1.0, end_e=0.2, exploration_fraction=0.5, eval_epsilon=0.3)
        with pytest.MonkeyPatch.context() as monkeypatch:
            for name, value in [("RunState", KeptRun), ("train_step", watched_train_step),
                                ("update_target", watched_update_target), ("epsilon_greedy", watched_epsilon_greedy)]:
                monkeypatch.setattr(dqn, name, value)
            seen["eval_epsilons"] = quiet_main(dqn, monkeypatch, tmp_path_factory.mktemp(script), **flags)
        done[script, tau] = seen, runs[-1].args
        return done[script, tau]
    return run


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_target_syncs_at_each_multiple_of_its_frequency_and_is_frozen_between(observed, script, tau):
    seen, args = observed(script, tau)
    expected = []  # after learning starts, env step s updates every train_frequency, syncs every target frequency
    for s in range(args.learning_starts + 1, args.total_timesteps + 1):
        vector_step_end = -(-s // args.num_envs) * args.num_envs  # the global_step of the vector step holding s
        expected += [("update", vector_step_end)] * (s % args.train_frequency == 0)
        expected += [("sync", vector_step_end)] * (s % args.target_network_frequency == 0)
    assert [event[:2] for event in seen["events"]] == expected
    assert all(ok for kind, _, ok in seen["events"] if kind == "sync"), "a sync did not give tau-weighted weights"
    assert all(ok for kind, _, ok in seen["events"] if kind == "update"), "the target moved between syncs"


@pytest.mark.parametrize("script", SCRIPTS)
def test_update_target_is_a_hard_copy_at_tau_1_and_a_soft_update_below(script):
    dqn = load_script(script)
    torch.manual_seed(0)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = params(target)
    dqn.update_target(target, online, 0.25)
    for t, b, p in zip(target.parameters(), before, online.parameters(), strict=True):
        assert torch.allclose(t, 0.75 * b + 0.25 * p) and not torch.allclose(t, p)
    dqn.update_target(target, online, 1.0)
    assert all(torch.equal(t, p) for t, p in zip(target.parameters(), online.parameters(), strict=True))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_loop_acts_at_the_scheduled_epsilon_and_evaluates_at_its_own(observed, script):
    seen, args = observed(script, 1.0)
    duration = args.total_timesteps // 2  # exploration_fraction 0.5
    assert [t for t, _ in seen["epsilons"]] == list(range(0, args.total_timesteps, args.num_envs))
    for t, epsilon in seen["epsilons"]:  # start_e at 0, linear to end_e at the duration, end_e after it
        assert epsilon == pytest.approx(np.interp(t, [0, duration], [args.start_e, args.end_e])), t
    assert seen["eval_epsilons"] == [args.eval_epsilon]


# ---------------------------------------------------------------- evaluation: each game once and in full
class ScriptedGames:
    """What evaluate() reads of ale-py's vector env, playing scripted games: env i's first game scores first[i] (one
    unclipped reward a step), every later game 1000 a step for 2 steps. As in ale-py, the step after a game over is
    its reset step (reward 0, the frame counter restarts)."""

    def __init__(self, first: list[list[float]]):
        import ale_py

        self.first, self.steps = first, 0
        self.single_action_space = gym.spaces.Discrete(4)
        actions = [ale_py.Action.NOOP, ale_py.Action.FIRE, ale_py.Action.RIGHT, ale_py.Action.LEFT]
        self.ale = type("ALE", (), {"get_action_set": staticmethod(lambda: actions)})()

    def _out(self):
        obs = np.zeros((len(self.first), 4, 84, 84), dtype=np.uint8)
        return obs, {"lives": np.full(len(self.first), 3), "episode_frame_number": self.frames.copy()}

    def reset(self, seed=None):
        n = len(self.first)
        self.game, self.t, self.frames = np.zeros(n, int), np.zeros(n, int), np.full(n, 8)
        self.reset_next = np.zeros(n, bool)
        return self._out()

    def step(self, actions):
        self.steps += 1
        rewards, terminations = np.zeros(len(self.first)), np.zeros(len(self.first), bool)
        for i in range(len(self.first)):
            if self.reset_next[i]:
                self.game[i], self.t[i], self.frames[i], self.reset_next[i] = self.game[i] + 1, 0, 8, False
                continue
            game = self.first[i] if self.game[i] == 0 else [1000.0, 1000.0]
            rewards[i], self.t[i], self.frames[i] = game[self.t[i]], self.t[i] + 1, self.frames[i] + 4
            terminations[i] = self.reset_next[i] = self.t[i] == len(game)
        obs, infos = self._out()
        return obs, rewards, terminations, np.zeros(len(self.first), bool), infos

    def close(self):
        pass


def watch_epsilons(dqn, monkeypatch) -> list[float]:
    epsilon_greedy, epsilons = dqn.epsilon_greedy, []

    def watched(q_network, obs, epsilon, *rest):
        epsilons.append(epsilon)
        return epsilon_greedy(q_network, obs, epsilon, *rest)
    monkeypatch.setattr(dqn, "epsilon_greedy", watched)
    return epsilons


@pytest.mark.parametrize("script", ATARI)
def test_an_atari_evaluation_counts_each_game_once_in_full_unclipped(script, monkeypatch):
    dqn = load_script(script)
    first = [[0, 5, 0], [30, 0, 0, 0, 200, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]]
    envs = ScriptedGames(first)
    monkeypatch.setattr(dqn, "make_env", lambda *args, **kwargs: envs)
    epsilons = watch_epsilons(dqn, monkeypatch)
    returns, lengths = dqn.evaluate(Table([[0.0, 1.0, 0.0, 0.0]] * 3), "breakout", 0.0, 108_000, episodes=3,
                                    epsilon=0.3, seed=0, device=CPU, stop=lambda: envs.steps > 40)
    # env 0's second game ended (and its third scored) while env 2 played on: neither counts
    assert returns.tolist() == [5, 230, 4] and lengths.tolist() == [4 * 3, 4 * 7, 4 * 12]
    assert envs.steps == 12 and set(epsilons) == {0.3}


class ScriptedEpisodes(gym.Env):
    """The env seeded s: its first episode lasts 3 + 2 s steps, reward t at step t, and ends by termination (s even)
    or truncation (s odd); every later episode: 2 steps of reward 1000."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seed_, self.episode = (seed, 0) if seed is not None else (self.seed_, self.episode + 1)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        length = 3 + 2 * self.seed_ if self.episode == 0 else 2
        end = self.t == length
        reward = float(self.t) if self.episode == 0 else 1000.0
        odd = self.episode == 0 and self.seed_ % 2 == 1
        return np.zeros(2, np.float32), reward, end and not odd, end and odd, {}


gym.register("tests/ScriptedEpisodes-v0", entry_point=ScriptedEpisodes)


def test_a_cartpole_evaluation_counts_each_episode_once_in_full(monkeypatch):
    dqn = load_script("dqn_cartpole")
    epsilons, calls = watch_epsilons(dqn, monkeypatch), []
    returns = dqn.evaluate(Table([[0.0, 1.0]] * 3), "tests/ScriptedEpisodes-v0", 3, 0.3, seed=0, device=CPU,
                           stop=lambda: len(calls.append(1) or calls) > 40)
    assert returns.tolist() == [1 + 2 + 3, sum(range(1, 6)), sum(range(1, 8))]  # the truncated one too, in full
    assert len(calls) == 7 and set(epsilons) == {0.3}  # 7 steps: then every env had finished


@pytest.mark.parametrize("script", ATARI)
def test_the_atari_envs_report_the_unclipped_score(script):
    dqn = load_script(script)
    for train in (True, False):  # Space Invaders: 5 to 30 points an invader
        envs, rng, rewards = dqn.make_env("space_invaders", 2, 0.0, 2000, train=train), np.random.default_rng(0), []
        envs.reset(seed=0)
        while len(rewards) < 400 and max(rewards, default=0) <= 1:
            rewards.extend(envs.step(rng.integers(envs.single_action_space.n, size=2))[1])
        envs.close()
        assert max(rewards) > 1, train


# ---------------------------------------------------------------- what the replay stores
def tagged_replay(dqn, steps, gamma=0.7):
    """A 1-env replay fed (reward, terminated, truncated, first) per slot, each slot's frame tagged with its number."""
    kwargs = {"alpha": 0.6, "eps": 1e-6} if hasattr(dqn, "SumTree") else {}
    rb = dqn.ReplayBuffer(64, 1, CPU, CPU, gamma, **kwargs)
    for slot, (reward, terminated, truncated, first) in enumerate(steps):
        rb.add(np.full((1, 84, 84), slot, dtype=np.uint8), np.array([slot % 2]), np.array([float(reward)]),
               np.array([bool(terminated)]), np.array([bool(truncated)]), np.array([bool(first)]))
    return rb


@pytest.mark.parametrize("script", ATARI)
def test_the_atari_replay_clips_rewards_and_bootstraps_a_truncation(script):
    dqn = load_script(script)
    steps = [(0, 0, 0, 1), (5, 0, 0, 0), (-3, 1, 0, 0), (0, 0, 0, 1), (0.25, 0, 1, 0), (0, 0, 0, 1), (-0.5, 0, 0, 0)]
    rb = tagged_replay(dqn, steps)
    batch = rb.gather(torch.tensor([1, 2, 4, 6]))
    assert batch.rewards.tolist() == [1, -1, 1, -1]  # sign(r), as the learner uses them
    assert batch.actions.tolist() == [1, 0, 0, 0] and batch.dones.tolist() == [0, 1, 0, 0]  # a life loss ends
    assert batch.discounts.tolist() == pytest.approx([0.7] * 4)
    td_target, _, _ = dqn.td_terms(NewestTag(), NewestTag(), batch)
    # the truncated slot 4 bootstraps from its real final frame (tag 4), as every non-terminal one does
    assert td_target.tolist() == pytest.approx([1 + 0.7 * 0.01, -1, 1 + 0.7 * 0.04, -1 + 0.7 * 0.06])


def test_the_cartpole_replay_stores_the_executed_action_and_only_terminations_as_dones(tmp_path, monkeypatch):
    dqn = load_script("dqn_cartpole")
    quiet_main(dqn, monkeypatch, tmp_path, env_id="tests/Counting-v0", num_envs=2, total_timesteps=60,
               learning_starts=50, buffer_size=100, batch_size=4, start_e=0.5, end_e=0.5)
    replay = torch.load(tmp_path / "runs/r/checkpoint.pt", weights_only=True)["replay_buffer"]
    n = replay["size"]
    obs, next_obs = replay["observations"][:n], replay["next_observations"][:n]
    actions, rewards, terminations = replay["actions"][:n], replay["rewards"][:n], replay["terminations"][:n]
    assert torch.equal(next_obs[:, :2], obs[:, :2] + torch.tensor([0.0, 1.0]))  # one step of one episode each
    assert torch.equal(actions.float(), next_obs[:, 2]) and torch.equal(rewards, next_obs[:, 1])  # what the env did
    assert set(actions.tolist()) == {0, 1}
    terminal = (next_obs[:, 0] % 2 == 0) & (next_obs[:, 1] == 5)
    truncated = (next_obs[:, 0] % 2 == 1) & (next_obs[:, 1] == 7)  # the TimeLimit's
    assert torch.equal(terminations, terminal)  # a truncation is not a done
    assert terminal.any() and truncated.any()


def test_the_atari_replay_stores_what_the_env_did_the_serve_included(tmp_path, monkeypatch):
    dqn = load_script("dqn_atari")
    monkeypatch.setattr(dqn, "evaluate", lambda *args, **kwargs: (np.zeros(1), np.zeros(1)))
    monkeypatch.setattr(dqn, "HELD_OUT", 8)
    log, rb, _ = record_main(dqn, tmp_path, monkeypatch, action=0, num_envs=2, total_timesteps=160, buffer_size=1000,
                             learning_starts=150, train_frequency=4, max_episode_frames=160)
    written = range(1, len(log))  # slot w: step w's action, clipped reward and flags
    for field, key in [("actions", "actions"), ("terminations", "term"), ("truncations", "trunc")]:
        stored = getattr(rb, field)[:, 1:len(log)].numpy().T
        assert (stored == np.array([log[w][key] for w in written])).all(), field
    assert (rb.rewards[:, 1:len(log)].numpy().T == np.sign([log[w]["rewards"] for w in written])).all()
    served = rb.actions[:, 1:len(log)] == 1  # FIRE, which the NOOP policy never chooses itself
    assert served.any() and rb.truncations.any()


# ---------------------------------------------------------------- the TD target
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_td_target_is_cut_by_dones_and_discounted_by_the_batchs_discount(script):
    dqn = load_script(script)
    q = Table([[1.0, 4.0, 2.0], [3.0, 0.0, -1.0], [5.0, 5.0, 6.0], [0.0, 2.0, 1.0]])  # max 4, 3, 6, 2
    batch = make_batch(dqn, observations=torch.zeros(4, 1), actions=torch.tensor([0, 2, 1, 1]),
                       rewards=torch.tensor([1.0, -1.0, 0.5, 0.0]), next_observations=torch.zeros(4, 1),
                       dones=torch.tensor([0.0, 0.0, 1.0, 0.0]), discounts=torch.tensor([0.5, 0.25, 0.9, 0.125]))
    td_target, q_values, q_taken = dqn.td_terms(q, q, batch)
    assert td_target.tolist() == pytest.approx([1 + 0.5 * 4, -1 + 0.25 * 3, 0.5, 0.125 * 2])
    assert q_taken.tolist() == [1.0, -1.0, 5.0, 2.0] and not td_target.requires_grad


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_sampled_batch_carries_gamma_as_its_discount(script):
    dqn = load_script(script)
    if script == "dqn_cartpole":
        rb = dqn.ReplayBuffer(8, 1, CPU, gamma=0.7)
        rb.add(np.zeros((4, 1), np.float32), np.ones((4, 1), np.float32), np.arange(4), np.ones(4),
               np.array([0, 1, 0, 0], dtype=bool))
        batch = rb.sample(64)
        assert torch.equal(batch.dones, (batch.actions == 1).float())
    else:
        rb = tagged_replay(dqn, [(0, 0, 0, 1), (1, 0, 0, 0), (1, 1, 0, 0), (0, 0, 0, 0)])
        batch = rb.sample(64) if script == "dqn_atari" else rb.sample(64, 0.4)
    assert batch.discounts.tolist() == pytest.approx([0.7] * 64)


def double_tables():
    online = Table([[1.0, 5.0, 2.0], [3.0, 0.0, 9.0]])  # argmax: action 1, action 2
    target = Table([[7.0, 2.0, 4.0], [1.0, 8.0, 6.0]])  # its own max would be 7 and 8
    return online, target


def test_the_double_target_takes_the_online_argmax_and_the_target_value():
    dqn = load_script("dqn_atari_dueling_per")
    online, target = double_tables()
    batch = make_batch(dqn, observations=torch.zeros(2, 1), actions=torch.tensor([0, 0]),
                       rewards=torch.tensor([1.0, -1.0]), next_observations=torch.zeros(2, 1),
                       dones=torch.zeros(2), discounts=torch.full((2,), 0.5))
    td_target, _, _ = dqn.td_terms(online, target, batch)
    assert td_target.tolist() == pytest.approx([1 + 0.5 * 2.0, -1 + 0.5 * 6.0])
    td_target, _, _ = dqn.td_terms(online, target, batch._replace(dones=torch.tensor([1.0, 0.0])))
    assert td_target.tolist() == pytest.approx([1, -1 + 0.5 * 6.0])  # a terminal row does not bootstrap


# ---------------------------------------------------------------- PER: the loss and the priorities written back
def linear_batch(dqn, rewards, weights, actions):
    """A batch for Q(x) = W x on 2-d states, all rows terminal: y = r."""
    x = torch.tensor([[1.0, 0.5], [0.5, -1.0], [2.0, 1.0], [-1.0, 1.5]])
    return make_batch(dqn, observations=x, actions=torch.tensor(actions), rewards=torch.tensor(rewards),
                      next_observations=x, dones=torch.ones(4), discounts=torch.full((4,), 0.9),
                      indices=torch.tensor([3, 1, 4, 2]), weights=torch.tensor(weights))


def by_hand(W, batch):
    """(loss, dL/dW, delta) of mean_i w_i huber(Q(x_i, a_i) - y_i) for Q(x) = W x; y = r (terminal rows)."""
    weights = getattr(batch, "weights", torch.ones(len(batch.rewards)))  # dqn_atari.py: unweighted
    x, a, y, w = (t.double().numpy() for t in (batch.observations, batch.actions, batch.rewards, weights))
    a = a.astype(int)
    delta = (W[a] * x).sum(1) - y
    loss = (w * np.where(abs(delta) <= 1, 0.5 * delta**2, abs(delta) - 0.5)).mean()
    grad = np.zeros_like(W)
    for i in range(len(x)):
        grad[a[i]] += w[i] * np.clip(delta[i], -1, 1) * x[i] / len(x)
    return loss, grad, delta


def linear_q(W):
    q = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        q.weight.copy_(torch.tensor(W))
    return q


W0 = np.array([[0.5, -0.25], [1.0, 2.0], [-1.5, 0.5]])


@pytest.mark.parametrize("max_grad_norm", [1e6, 0.05])
def test_per_takes_an_importance_weighted_huber_step_clipped_to_max_grad_norm(max_grad_norm):
    per = load_script("dqn_atari_dueling_per")
    rb = per.ReplayBuffer(8, 1, CPU, CPU, 0.9, alpha=0.5, eps=0.5)
    batch = linear_batch(per, rewards=[0.2, 3.0, -0.5, 0.0], weights=[1.0, 0.5, 0.25, 0.125], actions=[0, 1, 2, 1])
    q = linear_q(W0)
    loss, grad, delta = by_hand(W0, batch)
    assert (abs(delta) > 1).any() and (abs(delta) < 1).any()  # both sides of the Huber loss
    stats = per.train_step(q, linear_q(W0), torch.optim.SGD(q.parameters(), lr=1.0), rb, batch, max_grad_norm)
    assert stats[0].item() == pytest.approx(loss, rel=1e-5)
    step = W0 - q.weight.detach().double().numpy()  # SGD at lr 1: the (clipped) gradient
    if max_grad_norm > 1:
        np.testing.assert_allclose(step, grad, rtol=1e-5, atol=1e-7)
    else:
        assert np.linalg.norm(grad) > 2 * max_grad_norm
        np.testing.assert_allclose(step, grad * max_grad_norm / np.linalg.norm(grad), rtol=1e-4, atol=1e-6)


def test_per_writes_back_abs_delta_plus_eps_to_the_alpha_for_the_sampled_rows():
    per = load_script("dqn_atari_dueling_per")
    rb = per.ReplayBuffer(8, 1, CPU, CPU, 0.9, alpha=0.5, eps=0.5)
    batch = linear_batch(per, rewards=[0.2, 3.0, -0.5, 0.0], weights=[1.0] * 4, actions=[0, 1, 2, 1])
    q = linear_q(W0)
    _, _, delta = by_hand(W0, batch)  # before the step: the TD errors the update computed
    per.train_step(q, linear_q(W0), torch.optim.SGD(q.parameters(), lr=0.1), rb, batch, 10.0)
    rb.apply_pending_priorities()
    leaves = rb.tree.leaves(batch.indices).numpy()
    np.testing.assert_allclose(leaves, (abs(delta) + 0.5) ** 0.5, rtol=1e-6)
    assert rb.tree.leaves(torch.tensor([0, 5])).tolist() == [0, 0]  # no other slot


# ---------------------------------------------------------------- resume
def filled_replay(dqn, script, size=40):
    if script == "dqn_cartpole":
        rb, rng = dqn.ReplayBuffer(size, 4, CPU, 0.99), np.random.default_rng(0)
        rb.add(rng.normal(size=(size, 4)).astype(np.float32), rng.normal(size=(size, 4)).astype(np.float32),
               rng.integers(2, size=size), rng.normal(size=size), rng.random(size) < 0.1)
        return rb
    kwargs = {"alpha": 0.6, "eps": 1e-6} if hasattr(dqn, "SumTree") else {}
    rb, rng = dqn.ReplayBuffer(size, 2, CPU, CPU, 0.99, **kwargs), np.random.default_rng(0)
    for t in range(size // 2):
        rb.add(rng.integers(0, 256, (2, 84, 84), dtype=np.uint8), rng.integers(4, size=2), rng.normal(size=2),
               rng.random(2) < 0.1, np.zeros(2, bool), np.full(2, t == 0))
    return rb


def new_run(dqn, script, rb, args):
    return dqn.RunState(args, 4, 2, CPU, rb) if script == "dqn_cartpole" else dqn.RunState(args, 4, CPU, rb)


def replay_state(rb) -> dict:
    return {k: v.clone() for k, v in rb.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("script,with_replay", [("dqn_cartpole", True), ("dqn_atari", True), ("dqn_atari", False),
                                                ("dqn_atari_dueling_per", True),
                                                ("dqn_atari_dueling_per", False)])
def test_a_checkpoint_restores_adam_the_rngs_and_the_replay(script, with_replay):
    dqn = load_script(script)
    flags = dict(batch_size=4, learning_starts=30) | ({"checkpoint_buffer": with_replay} if script in ATARI else {})
    args = dqn.Args(**flags)
    rb = filled_replay(dqn, script)
    run = new_run(dqn, script, rb, args)
    for _ in range(2):
        if script == "dqn_cartpole":
            dqn.train_step(run.q_network, run.target_network, run.optimizer, rb.sample(4))
        else:
            learn = dqn.make_learner(run, rb, args, graphs=False)
            learn(0.4) if script == "dqn_atari_dueling_per" else learn()
    run.rng.random(3)
    run.global_step, run.n_updates = 100, 2
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)  # as a checkpoint file holds it
    saved_replay = replay_state(rb)
    draws = run.rng.random(4), torch.rand(4)
    fresh_rb = type(rb)(*restart_args(dqn, script, rb))
    fresh = new_run(dqn, script, fresh_rb, args)
    torch.manual_seed(99)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert np.array_equal(fresh.rng.random(4), draws[0]) and torch.equal(torch.rand(4), draws[1])
    adam, restored = run.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert adam and restored.keys() == adam.keys()
    assert all(torch.equal(restored[i][k], adam[i][k]) for i in adam for k in adam[i])
    if with_replay:  # PER: its sum tree and max priority too
        assert all(torch.equal(v, saved_replay[k]) for k, v in replay_state(fresh_rb).items())
        assert getattr(fresh, "learning_from", 0) == 0
    else:  # an empty replay: no update until it holds learning_starts new steps
        assert len(fresh_rb) == 0 and fresh.learning_from == 100 + 30


def restart_args(dqn, script, rb):
    """The constructor arguments of an empty replay like rb."""
    if script == "dqn_cartpole":
        return rb.capacity, rb.obs_dim, CPU, rb.gamma
    extra = (rb.alpha, rb.eps) if hasattr(rb, "tree") else ()
    return (rb.per_env * rb.num_envs, rb.num_envs, CPU, CPU, rb.gamma, *extra)


@pytest.mark.parametrize("script", ATARI)
def test_a_resume_without_the_replay_refills_learning_starts_steps_before_updating(script, tmp_path, monkeypatch):
    dqn = load_script(script)
    train_step, runs, updates = dqn.train_step, [], []

    class KeptRun(dqn.RunState):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)

    def watched_train_step(*args):
        updates.append(runs[-1].global_step)
        return train_step(*args)
    monkeypatch.setattr(dqn, "RunState", KeptRun)
    monkeypatch.setattr(dqn, "train_step", watched_train_step)
    quiet_main(dqn, monkeypatch, tmp_path, **{**TINY[script], "total_timesteps": 12})
    assert updates == [9, 12, 12] and torch.load("runs/r/checkpoint.pt", weights_only=True)["replay_buffer"] is None
    updates.clear()
    dqn.main(dqn.Args(resume="runs/r/checkpoint.pt", total_timesteps=30))
    # env steps 13-18 refill the buffer; updates at the even steps 20-30, in vector steps ending at 21, 24, 27, 30
    assert updates == [21, 24, 24, 27, 30, 30]


# ---------------------------------------------------------------- the fork recipes compute what they say
def test_the_huber_recipe_takes_a_huber_step(tmp_path):
    apply_fork("huber", tmp_path)
    fork = load_script("dqn_atari", tmp_path)
    batch = linear_batch(fork, rewards=[0.2, 3.0, -0.5, 0.0], weights=[1.0] * 4, actions=[0, 1, 2, 1])
    q = linear_q(W0)
    loss, grad, delta = by_hand(W0, batch)
    assert (abs(delta) > 1).any() and (abs(delta) < 1).any()
    stats = fork.train_step(q, linear_q(W0), torch.optim.SGD(q.parameters(), lr=1.0), batch)
    assert stats[0].item() == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(W0 - q.weight.detach().double().numpy(), grad, rtol=1e-5, atol=1e-7)


def test_the_double_recipe_computes_the_double_target(tmp_path):
    apply_fork("double_dqn", tmp_path)
    fork = load_script("dqn_atari", tmp_path)
    online, target = double_tables()
    batch = make_batch(fork, observations=torch.zeros(2, 1), actions=torch.tensor([0, 0]),
                       rewards=torch.tensor([1.0, -1.0]), next_observations=torch.zeros(2, 1),
                       dones=torch.tensor([0.0, 1.0]), discounts=torch.full((2,), 0.5))
    td_target, _, _ = fork.td_terms(online, target, batch)
    assert td_target.tolist() == pytest.approx([1 + 0.5 * 2.0, -1])


# ---------------------------------------------------------------- the mutant check stays applicable
def test_every_mutant_still_applies_and_names_a_rule_test():
    """tests/mutants.py's edits each occur exactly once in their file, and each names a test of this file: a change to
    the scripts that moves a mutant's text fails here, not silently in the mutant check."""
    import mutants

    assert len(mutants.MUTANTS) >= 12 and mutants.pattern_errors(mutants.MUTANTS) == []
    for m in mutants.MUTANTS:
        name = m.tests[0].removeprefix(mutants.RULES)
        assert callable(globals().get("test_" + name)), m.name
