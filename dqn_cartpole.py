"""DQN for CartPole-v1 and any gymnasium env with a flat Box observation and Discrete actions.

Algorithm 1 of Mnih et al. 2015, "Human-level control through deep reinforcement learning" (Nature 518;
preprint arXiv:1312.5602): epsilon-greedy acting, a replay memory, and a periodically synced target network.

    python dqn_cartpole.py --env-id CartPole-v1 --seed 1

Departures from the paper, all as in CleanRL's dqn.py: an MLP instead of the CNN, Adam instead of RMSProp, MSE loss
(no error clipping). A time-limit truncation bootstraps from the real final observation (Pardo et al. 2018,
arXiv:1712.00378); only a true termination cuts the return. The defaults are a configuration tuned for CartPole-v1
(50k steps, where CleanRL's dqn.py runs 500k); benchmarks/RESULTS.md measures how fast it solves the task.
"""

import copy
import ctypes
import difflib
import fcntl
import glob
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import BinaryIO, Callable, NamedTuple, NoReturn, Optional

import ale_py
import cv2
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available (warns and falls back to the CPU otherwise)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanRL"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    wandb_group: Optional[str] = None
    """the wandb group (e.g. one per benchmark grid)"""
    capture_video: bool = False
    """whether to record the first evaluation episode of each evaluation to runs/{run_name}/videos/*.mp4"""
    save_model: bool = False
    """whether to save the final model to runs/{run_name}/{exp_name}.cleanrl_model"""
    run_name: Optional[str] = None
    """the run directory under runs/ (default: {env_id}__{exp_name}__{seed}__{unix time})"""
    checkpoint_frequency: int = 10_000
    """write runs/{run_name}/checkpoint.pt every this many env steps (0: only on stop or completion)"""
    resume: Optional[str] = None
    """continue training from this checkpoint.pt (model, target, optimizer, replay buffer, step, RNG states)"""
    play: Optional[str] = None
    """instead of training, load this model or checkpoint and evaluate it for --eval-episodes episodes"""

    # Algorithm specific arguments
    env_id: str = "CartPole-v1"
    """the id of the environment"""
    total_timesteps: int = 50_000
    """total env steps of the experiment"""
    num_envs: int = 1
    """the number of parallel game environments"""
    learning_rate: float = 1e-3
    """the learning rate of the optimizer"""
    hidden_sizes: tuple[int, ...] = (128, 128)
    """the hidden layer sizes of the MLP Q-network"""
    buffer_size: int = 50_000
    """the replay memory buffer size"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.01
    """the target network update rate (1.0: hard copy)"""
    target_network_frequency: int = 1
    """the frequency (in env steps) of target network updates"""
    batch_size: int = 128
    """the batch size of sample from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
    exploration_fraction: float = 0.1
    """the fraction of `total-timesteps` it takes from start-e to go end-e"""
    learning_starts: int = 1_000
    """env step to start learning"""
    train_frequency: int = 1
    """the frequency (in env steps) of gradient updates"""
    eval_frequency: int = 2_500
    """evaluate every this many env steps (0: only at the end)"""
    eval_episodes: int = 10
    """the number of evaluation episodes"""
    eval_epsilon: float = 0.0
    """the epsilon of the evaluation policy (0: greedy)"""
    goal_score: Optional[float] = None
    """stop training once the evaluation mean return reaches this (e.g. 475 for CartPole-v1)"""


LOG_EVERY = 100  # gradient updates between loss/Q logs and non-finite checks (each is one CPU-GPU sync)
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


def make_env(env_id: str, seed: int, render: bool = False):
    def thunk():
        if render:
            headless_video()
        env = gym.make(env_id, render_mode="rgb_array") if render else gym.make(env_id)
        env.action_space.seed(seed)
        return env

    return thunk


def check_env(env_id: str) -> tuple[int, int]:
    """Fails with a clear line unless env_id exists with a flat Box observation and Discrete actions."""
    gym.register_envs(ale_py)  # so that an Atari id gets "use dqn_atari.py" rather than "unknown"
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        matches = difflib.get_close_matches(env_id, gym.registry.keys(), n=3)
        fail(f"unknown --env-id {env_id!r} ({e}); close matches: {', '.join(matches) or 'none'}")
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"--env-id {env_id} has action space {act_space}; this DQN needs Discrete actions")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"--env-id {env_id} has observation space {obs_space}; this script needs a flat Box (use dqn_atari.py)")
    return obs_space.shape[0], int(act_space.n)


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    """start_e at t = 0, end_e from t = duration on, linear in between (either direction)."""
    if t >= duration:
        return end_e
    return start_e + (end_e - start_e) * t / duration


def epsilon_greedy(q_network: nn.Module, obs: np.ndarray, epsilon: float, n_actions: int, rng: np.random.Generator,
                   device: torch.device) -> np.ndarray:
    """A random action with probability epsilon, else argmax_a Q(s, a), per env (Mnih et al. 2015, Alg. 1); for
    training, evaluation and --play. The network runs only if some env acts greedily."""
    explore = rng.random(len(obs)) < epsilon
    actions = rng.integers(n_actions, size=len(obs))
    if explore.all():
        return actions
    with torch.inference_mode():
        q_values = q_network(torch.as_tensor(obs, dtype=torch.float32, device=device))  # (N, n_actions)
    return np.where(explore, actions, q_values.argmax(dim=1).cpu().numpy())  # sync point: the env needs host actions


def passed_multiple(frequency: int, global_step: int, num_envs: int) -> bool:
    """Whether the last vector step (num_envs env steps, ending at global_step) passed a multiple of `frequency`
    (0: never): periodic work keeps its schedule whatever num_envs is."""
    return frequency > 0 and global_step // frequency > (global_step - num_envs) // frequency


class QNetwork(nn.Module):
    """CleanRL's dqn.py MLP (two hidden layers of 120 and 84 there), with the hidden widths a flag."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        layers, width = [], obs_dim
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.network = nn.Sequential(*layers, nn.Linear(width, n_actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)  # (B, obs_dim) -> (B, n_actions)


def td_terms(q_network: nn.Module, target_network: nn.Module,
             data: "Batch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one TD computation: the TD target y (B,), Q(s, .) (B, A) and Q(s, a) (B,) of the actions taken."""
    td_target = compute_td_target(target_network, data.rewards, data.next_observations, data.dones, data.discounts)
    q_values = q_network(data.observations)  # (B, n_actions)
    return td_target, q_values, q_values.gather(1, data.actions[:, None]).squeeze(1)


def compute_td_target(target_network: nn.Module, rewards: torch.Tensor, next_observations: torch.Tensor,
                      dones: torch.Tensor, discounts: torch.Tensor) -> torch.Tensor:
    """y = r + gamma * max_a' Q_target(s', a'), cut at a true termination (Mnih et al. 2015, Algorithm 1); gamma is
    the batch's discount."""
    with torch.no_grad():
        target_max = target_network(next_observations).max(dim=1).values  # (B,)
        return rewards + discounts * target_max * (1 - dones)


def make_network(obs_dim: int, n_actions: int, hidden_sizes: tuple[int, ...], device: torch.device) -> QNetwork:
    """The Q-network on its device: training and --play."""
    return QNetwork(obs_dim, n_actions, hidden_sizes).to(device)


def make_optimizer(q_network: nn.Module, args: Args) -> torch.optim.Optimizer:
    """Adam (CleanRL's choice over the paper's RMSProp), fused: one kernel for all parameters."""
    return torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)


def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """theta_target <- tau * theta + (1 - tau) * theta_target; tau = 1 is the paper's hard copy."""
    with torch.no_grad():
        for target_param, param in zip(target_network.parameters(), q_network.parameters()):
            target_param.copy_(param) if tau == 1.0 else target_param.lerp_(param, tau)


def train_step(q_network: nn.Module, target_network: nn.Module, optimizer: torch.optim.Optimizer,
               data: "Batch") -> torch.Tensor:
    """One gradient step on a batch; returns (td_loss, mean Q) as a (2,) tensor on the device, without a host sync."""
    td_target, _, q_taken = td_terms(q_network, target_network, data)
    loss = F.mse_loss(td_target, q_taken)  # (y - Q(s, a))^2: CleanRL's MSE, not the paper's clipped error
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return torch.stack((loss.detach(), q_taken.detach().mean()))


class Batch(NamedTuple):
    observations: torch.Tensor  # (B, obs_dim) float32
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32
    next_observations: torch.Tensor  # (B, obs_dim) float32
    dones: torch.Tensor  # (B,) float32, 1 only for a true termination (truncation bootstraps)
    discounts: torch.Tensor  # (B,) float32: gamma, the discount of the bootstrap one step ahead


class ReplayBuffer:
    """Preallocated ring buffer on `device`, one slot per transition in named, typed fields: obs, next obs, action,
    reward, termination.

    A slot per transition makes an add one slice write per field and a sample one gather (no deque of tuples). A flat
    observation is a few floats, so storing next_obs beside obs is cheaper than rebuilding it and keeps the real final
    observation of a truncated episode (NEXT_STEP autoreset replaces it in the env's next obs). Transitions of all envs
    are interleaved, so an n-step fork would store each env's steps in order, as dqn_atari.py's replay does.
    Memory: 2 * obs_dim * 4 + 8 + 4 + 1 bytes per transition; CartPole: 45 bytes, 2.25 MB at 50k.
    """

    FIELDS = ("observations", "next_observations", "actions", "rewards", "terminations")  # one value per slot each

    def __init__(self, capacity: int, obs_dim: int, device: torch.device, gamma: float):
        self.capacity, self.obs_dim, self.device, self.gamma = capacity, obs_dim, device, gamma
        self.pos, self.size = 0, 0  # the next slot written, and how many hold a transition
        self.observations = torch.zeros((capacity, obs_dim), dtype=torch.float32, device=device)
        self.next_observations = torch.zeros((capacity, obs_dim), dtype=torch.float32, device=device)
        self.actions = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.terminations = torch.zeros(capacity, dtype=torch.bool, device=device)

    def add(self, obs: np.ndarray, next_obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
            terminations: np.ndarray) -> None:
        """Adds k transitions (numpy arrays with a leading k axis), overwriting the oldest once full."""
        k = len(obs)
        first = min(k, self.capacity - self.pos)  # slots that fit before the ring wraps; the rest go to the front
        for name, values in zip(self.FIELDS, (obs, next_obs, actions, rewards, terminations)):
            field, values = getattr(self, name), torch.from_numpy(values).to(self.device)
            field[self.pos : self.pos + first] = values[:first]
            field[: k - first] = values[first:]
        self.pos = (self.pos + k) % self.capacity
        self.size = min(self.size + k, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        i = torch.randint(self.size, (batch_size,), device=self.device)  # (B,) uniform over stored transitions
        rewards = self.rewards[i]
        return Batch(self.observations[i], self.actions[i], rewards, self.next_observations[i],
                     self.terminations[i].float(), torch.full_like(rewards, self.gamma))

    def state_dict(self) -> dict:
        return {**{name: getattr(self, name).cpu() for name in self.FIELDS}, "pos": self.pos, "size": self.size}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not isinstance(state, dict) or any(getattr(state.get(name), "shape", None) != getattr(self, name).shape
                                              for name in self.FIELDS):
            fail("the checkpoint's replay buffer has another --buffer-size or observation size, or an earlier "
                 "version's layout; resume with the same flags, or start a new run")
        for name in self.FIELDS:
            getattr(self, name).copy_(state[name])
        self.pos, self.size = state["pos"], state["size"]


def evaluate(q_network: nn.Module, env_id: str, episodes: int, epsilon: float, seed: int, device: torch.device,
             video_path: Optional[str] = None, stop: Callable[[], bool] = lambda: False) -> np.ndarray:
    """Plays `episodes` episodes at once, one per env (so long episodes are not under-counted); returns their returns.

    The video is episode 0's, rendered by its own env. `stop()` true ends the evaluation early (a signal arrived);
    the returns are then incomplete.
    """
    envs = gym.vector.SyncVectorEnv([make_env(env_id, seed + i, render=video_path is not None and i == 0)
                                     for i in range(episodes)])
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    returns, finished, frames = np.zeros(episodes), np.zeros(episodes, dtype=bool), []
    while not finished.all() and not stop():
        if video_path is not None and not finished[0]:
            frames.append(envs.envs[0].render())
        actions = epsilon_greedy(q_network, obs, epsilon, envs.single_action_space.n, rng, device)
        obs, rewards, terminations, truncations, _ = envs.step(actions)
        returns += rewards * ~finished  # an env that already finished has autoreset: ignore its new episode
        finished |= terminations | truncations
    envs.close()
    if video_path is not None:
        write_video(video_path, frames)
    return returns


class RunState:
    """Everything of a run that outlives a step and a checkpoint restores, except the replay: networks, optimizer,
    the exploration RNG, counters and the best and last evaluation returns."""

    def __init__(self, args: Args, obs_dim: int, n_actions: int, device: torch.device):
        self.q_network = make_network(obs_dim, n_actions, args.hidden_sizes, device)
        self.optimizer = make_optimizer(self.q_network, args)
        self.target_network = make_network(obs_dim, n_actions, args.hidden_sizes, device)
        self.target_network.load_state_dict(self.q_network.state_dict())
        self.rng = np.random.default_rng(args.seed)  # exploration
        self.n_actions, self.device = n_actions, device
        self.global_step, self.n_updates, self.n_target_syncs = 0, 0, 0
        self.best_eval, self.last_eval = -float("inf"), None
        self.eval_due = False  # an evaluation is owed at global_step (set after the step; a signal may cut it short)
        self.last_finite: Optional[dict] = None  # a copy of the last learner state whose losses were all finite

    def optimizer_tensors(self) -> list[torch.Tensor]:
        """The optimizer's state tensors: Adam's moments and step (none before its first step)."""
        return [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]

    def finite(self) -> bool:
        """Whether both networks and the optimizer's moments hold only finite numbers (one sync point)."""
        tensors = [*self.q_network.parameters(), *self.target_network.parameters(), *self.optimizer_tensors()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def learner_state(self) -> dict:
        """The learner alone: what a non-finite loss rolls back to."""
        return {"model": self.q_network.state_dict(), "target_model": self.target_network.state_dict(),
                "optimizer": self.optimizer.state_dict(), "global_step": self.global_step,
                "n_updates": self.n_updates, "n_target_syncs": self.n_target_syncs}

    def state_dict(self) -> dict:
        return {**self.learner_state(), "best_eval": self.best_eval, "last_eval": self.last_eval,
                "eval_due": self.eval_due,
                "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict, path: str) -> None:
        load_weights(self.q_network, state["model"], path)
        load_weights(self.target_network, state["target_model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step, self.n_updates = state["global_step"], state["n_updates"]
        self.n_target_syncs, self.best_eval, self.last_eval = (state["n_target_syncs"], state["best_eval"],
                                                                state["last_eval"])
        self.eval_due = state["eval_due"]
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])


def main(args: Args) -> None:
    validate_args(args)
    with StopOnSignal() as stop:  # until stop.arm(), a signal ends the process at once: nothing is written before it
        obs_dim, n_actions = check_env(args.env_id)
        checkpoint = load_checkpoint(args.resume, args.env_id, n_actions) if args.resume else None
        device = pick_device(args)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        if args.play:
            return play(args, obs_dim, n_actions, device)
        files = RunFiles(args, checkpoint)

        # ALGO LOGIC: initialize agent here:
        run = RunState(args, obs_dim, n_actions, device)
        if checkpoint:
            restore(run, checkpoint, args)
        rb = ReplayBuffer(args.buffer_size, obs_dim, device, args.gamma)
        if checkpoint:
            rb.load_state_dict(checkpoint.get("replay_buffer"))
        envs = gym.vector.SyncVectorEnv([make_env(args.env_id, args.seed + run.global_step + i)
                                         for i in range(args.num_envs)])
        files.create()  # the run folder, locked by this process until it ends
        log = Log(args, files, run, resumed=checkpoint is not None)
        # from here on a signal stops the loop cleanly, and a crash still leaves a checkpoint and summary.json
        stop.arm(on_crash=lambda error: end_run(run, rb, log, f"error: {type(error).__name__}: {error}"))

        obs, _ = envs.reset(seed=args.seed + run.global_step)
        autoreset = np.zeros(args.num_envs, dtype=bool)  # True where the next step is NEXT_STEP's reset step
        run.last_finite = copy.deepcopy(run.learner_state())
        while not stop:
            if run.eval_due:  # the step that passed a multiple of eval_frequency, the last one, or an owed evaluation
                if not run.finite():  # sync point: a non-finite network is neither evaluated nor saved
                    end_run(run, rb, log, f"non-finite weights at step {run.global_step}")
                started = time.time()
                returns = evaluate(run.q_network, args.env_id, args.eval_episodes, args.eval_epsilon,
                                   args.seed + 1_000_000 + run.global_step, device,
                                   files.eval_video(run.global_step), stop=lambda: bool(stop))
                if stop:  # a signal cut the evaluation short: it stays due, and a resumed run does it first
                    break
                log.evaluation(returns, time.time() - started)
                run.last_eval, run.eval_due = float(returns.mean()), False
                if run.last_eval > run.best_eval:
                    run.best_eval = run.last_eval
                    files.save_model("best_model.pt", run)
                if args.goal_score is not None and returns.mean() >= args.goal_score:
                    log.goal_reached(returns.mean())
                    break
            if run.global_step >= args.total_timesteps:
                break
            # ALGO LOGIC: epsilon-greedy action (Mnih et al. 2015, Alg. 1)
            epsilon = linear_schedule(args.start_e, args.end_e, int(args.exploration_fraction * args.total_timesteps),
                                      run.global_step)
            actions = epsilon_greedy(run.q_network, obs, epsilon, n_actions, run.rng, device)

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs, rewards, terminations, truncations, _ = envs.step(actions)
            is_transition = ~autoreset  # a reset step (action ignored, reward 0) is not a transition
            log.episodes(rewards, is_transition, is_transition & (terminations | truncations))
            # NEXT_STEP autoreset: next_obs of an ended episode is its real final observation, so a truncation
            # bootstraps from it and only `terminations` are stored as dones.
            rb.add(obs[is_transition], next_obs[is_transition], actions[is_transition], rewards[is_transition],
                   terminations[is_transition])
            autoreset = terminations | truncations
            obs = next_obs
            run.global_step += args.num_envs

            # ALGO LOGIC: training. Visit every env step this vector step covered, so that updates per env step stay
            # 1/train_frequency and target syncs every target_network_frequency steps whatever num_envs is.
            for step in range(run.global_step - args.num_envs + 1, run.global_step + 1):
                if step <= args.learning_starts:
                    continue
                if step % args.train_frequency == 0:
                    data = rb.sample(args.batch_size)
                    log.update(train_step(run.q_network, run.target_network, run.optimizer, data), step)
                    run.n_updates += 1
                    if run.n_updates % LOG_EVERY == 0:
                        bad_step = log.read_updates(step, epsilon)  # sync point: once per LOG_EVERY updates
                        if bad_step is not None:
                            end_run(run, rb, log, f"non-finite loss at step {bad_step}")
                        run.last_finite = copy.deepcopy(run.learner_state())
                if step % args.target_network_frequency == 0:
                    update_target(run.target_network, run.q_network, args.tau)
                    run.n_target_syncs += 1

            run.eval_due = (passed_multiple(args.eval_frequency, run.global_step, args.num_envs)
                            or run.global_step >= args.total_timesteps)  # evaluated at the top of the loop
            if passed_multiple(args.checkpoint_frequency, run.global_step, args.num_envs):
                if not run.finite():  # sync point: a non-finite state is never written over a finite one
                    end_run(run, rb, log, f"non-finite weights at step {run.global_step}")
                save_checkpoint(files.checkpoint, files.checkpoint_state(run, rb))
            log.progress(epsilon)
        envs.close()
    end_run(run, rb, log, f"signal {signal.Signals(stop.signum).name}" if stop.signum is not None else
            "completed" if log.goal_reached_step is None else "goal reached", stop.signum)


# =====================================================================================================================
# Plumbing: what keeps a run safe and observable, not the algorithm. Input checks, device, run files and checkpoints,
# video, logging and progress, summary.json, signals, --play.
# =====================================================================================================================


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 2, before anything is written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def validate_args(args: Args) -> None:
    """Bad flags fail here, before anything is built or written."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag(name)} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in [0, 2^32), got {args.seed}")
    positive = ["total_timesteps", "num_envs", "buffer_size", "batch_size", "train_frequency", "eval_episodes",
                "target_network_frequency", "learning_rate"]
    unit = ["gamma", "start_e", "end_e", "eval_epsilon"]
    rules = [("must be positive", lambda v: v > 0, positive),
             ("must be >= 0", lambda v: v >= 0, ["learning_starts", "eval_frequency", "checkpoint_frequency"]),
             ("must be in (0, 1]", lambda v: 0 < v <= 1, ["exploration_fraction", "tau"]),
             ("must be in [0, 1]", lambda v: 0 <= v <= 1, unit)]
    for rule, ok, names in rules:
        for name in names:
            if not ok(getattr(args, name)):
                fail(f"{flag(name)} {rule}, got {getattr(args, name)}")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        fail(f"--hidden-sizes must be one or more positive layer widths, got {args.hidden_sizes}")
    if args.buffer_size < max(args.batch_size, args.num_envs):
        fail(f"--buffer-size ({args.buffer_size}) must be >= --batch-size ({args.batch_size}) and --num-envs")
    if args.learning_starts >= args.total_timesteps and not args.play:
        fail(f"--learning-starts ({args.learning_starts}) must be < --total-timesteps ({args.total_timesteps})")
    for name in ["exp_name", "run_name"]:
        value = getattr(args, name)
        if value is not None and (not RUN_NAME_RE.fullmatch(value) or ".." in value):
            fail(f"{flag(name)} {value!r} must be a plain name (letters, digits, . _ = + -)")


def pick_device(args: Args) -> torch.device:
    if args.cuda and not torch.cuda.is_available():
        print("warning: --cuda is on (the default) but CUDA is not available; running on the CPU "
              "(--no-cuda silences this)", file=sys.stderr)
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


class RunFiles:
    """runs/{run_name}/: checkpoint.pt, best_model.pt, summary.json, TensorBoard events, videos/. Checked before
    anything is allocated: a new run never overwrites another run's checkpoint."""

    def __init__(self, args: Args, checkpoint: Optional[dict]):
        self.args = args
        self.run_name = (args.run_name or (checkpoint or {}).get("run_name")
                         or f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}")
        self.run_dir = os.path.join("runs", self.run_name)
        self.checkpoint = os.path.join(self.run_dir, "checkpoint.pt")
        self.resuming, self.lock_path = checkpoint is not None, os.path.join(self.run_dir, "lock")
        if os.path.exists(self.lock_path):  # early, writing nothing; create() takes the lock for real
            with open(self.lock_path) as lock:
                self.take(lock, fcntl.LOCK_SH)
        self.check_new()
        check_writable(self.run_dir)

    def take(self, lock, mode: int) -> None:
        """flock(lock, mode) or fail, naming the process that holds the run folder (its pid is in the file)."""
        try:
            fcntl.flock(lock, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            fail(f"{self.run_dir} is in use by process {lock.read().strip() or '?'} (it holds {self.lock_path}); "
                 "wait for it to end or pass another --run-name")

    def check_new(self) -> None:
        if not self.resuming and os.path.exists(self.checkpoint):
            fail(f"{self.run_dir} already holds a run; continue it with --resume {self.checkpoint} or pass another "
                 "--run-name")

    def create(self) -> None:
        """Creates the folder and locks it for this process's life with flock, which the kernel releases when the
        process ends however it ends: a second process fails, and a killed run can be resumed at once."""
        os.makedirs(self.run_dir, exist_ok=True)
        self.lock = open(self.lock_path, "a+")  # kept open: closing it would release the lock
        self.take(self.lock, fcntl.LOCK_EX)
        self.check_new()  # a run of this name may have started, checkpointed and ended since the early check
        self.lock.truncate(0)
        self.lock.write(f"{os.getpid()}\n")
        self.lock.flush()
        for stale in glob.glob(f"{self.checkpoint}.tmp*"):  # left by a process killed while writing a checkpoint
            os.remove(stale)

    def checkpoint_state(self, run: RunState, rb: ReplayBuffer) -> dict:
        return {"env_id": self.args.env_id, "n_actions": run.n_actions, "hidden_sizes": list(self.args.hidden_sizes),
                "run_name": self.run_name, "args": asdict(self.args), **run.state_dict(),
                "replay_buffer": rb.state_dict()}

    def save_model(self, name: str, run: RunState) -> None:
        save_checkpoint(os.path.join(self.run_dir, name), {
            "env_id": self.args.env_id, "n_actions": run.n_actions, "hidden_sizes": list(self.args.hidden_sizes),
            "model": run.q_network.state_dict(), "global_step": run.global_step})

    def eval_video(self, global_step: int) -> Optional[str]:
        if not self.args.capture_video:
            return None
        os.makedirs(os.path.join(self.run_dir, "videos"), exist_ok=True)
        return os.path.join(self.run_dir, "videos", f"eval_step{global_step}.mp4")


def restore(run: RunState, checkpoint: dict, args: Args) -> None:
    try:
        run.load_state_dict(checkpoint, args.resume)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        fail(f"{args.resume!r} is not a complete checkpoint of this script ({type(e).__name__}: {e})")


def save_checkpoint(path: str, state: dict, dump: Callable[[dict, BinaryIO], object] = torch.save) -> None:
    """Atomic write of dump(state, file): a kill mid-write leaves the previous file intact (write a temp file, fsync,
    rename over)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, env_id: str, n_actions: int, play: bool = False) -> dict:
    """Loads with weights_only=True (no code runs from the file) and fails clearly on a wrong or broken file.
    --resume needs a checkpoint; for --play a model is enough, and a bare q_network.state_dict() is a model too, as
    CleanRL saves (.cleanrl_model) and publishes (q_network.pth) them; its action count and hidden widths are read
    from its layers."""
    if not os.path.isfile(path):
        fail(f"{path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot load {path!r}: corrupt, not a checkpoint, or holding more than weights, which weights_only "
             f"loading refuses ({type(e).__name__})")
    weights = [v for k, v in state.items() if k.endswith(".weight")] if isinstance(state, dict) else []
    if weights and all(isinstance(v, torch.Tensor) for v in state.values()):
        if not play:
            fail(f"{path!r} is a saved model, not a checkpoint; use --play to evaluate it")
        if weights[-1].shape[0] != n_actions:
            fail(f"{path!r} holds a network with {weights[-1].shape[0]} actions, but {env_id} has {n_actions}; "
                 "pass the --env-id it was trained on")
        return {"env_id": env_id, "n_actions": n_actions, "model": state,
                "hidden_sizes": [w.shape[0] for w in weights[:-1]]}  # CleanRL's MLP: 120, 84
    if not isinstance(state, dict) or "model" not in state or "env_id" not in state:
        fail(f"{path!r} is not a model or checkpoint written by {os.path.basename(__file__)}")
    if state["env_id"] != env_id or state["n_actions"] != n_actions:
        fail(f"{path!r} was trained on {state['env_id']} ({state['n_actions']} actions), not {env_id} "
             f"({n_actions} actions); pass --env-id {state['env_id']}")
    if not play and "optimizer" not in state:
        fail(f"{path!r} is a saved model, not a checkpoint; use --play to evaluate it")
    return state


def check_writable(run_dir: str) -> None:
    """Fails early, writing nothing, unless run_dir is, or can be made, a writable directory."""
    existing = run_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        fail(f"cannot write the run directory {run_dir!r}: {existing!r} is not a writable directory")


def load_weights(module: nn.Module, state_dict: dict, path: str) -> None:
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = str(e).splitlines()  # 'Error(s) in loading state_dict for QNetwork:', then what differs
        reason = (lines[1] if len(lines) > 1 else lines[0]).strip()
        fail(f"{path!r} holds another network ({reason[:100]}); use the script and flags it was trained with")


def headless_video() -> None:
    """Videos draw on an off-screen pygame Surface (render_mode="rgb_array"), yet gymnasium starts SDL's video
    subsystem first, whose Wayland probe prints "error: XDG_RUNTIME_DIR is invalid or not set in the environment."
    on a machine without a session, a line users read as ours. SDL's dummy driver opens no display and draws the
    same frames; an SDL_VIDEODRIVER the user set is kept."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def write_video(path: str, frames: list[np.ndarray], fps: int = 30) -> None:
    """MP4 through OpenCV (no moviepy); frames are RGB uint8 (H, W, 3)."""
    if not frames:  # a signal stopped the evaluation before its first frame
        return
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


class Log:
    """Where a run reports, and all it does: TensorBoard (CleanRL's tags; synced to W&B with --track), the terminal (a
    progress line on a tty), and runs/{run_name}/summary.json, written for programs by end_run however the run ends
    (completed, goal reached, a signal, a non-finite loss, a crash). It changes no state of the run."""

    def __init__(self, args: Args, files: RunFiles, run: RunState, resumed: bool):
        self.args, self.files, self.run = args, files, run
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, group=args.wandb_group,
                       sync_tensorboard=True, config=vars(args), name=files.run_name, id=files.run_name,
                       resume="allow", dir=files.run_dir, save_code=True)
        self.writer = SummaryWriter(files.run_dir, purge_step=run.global_step if resumed else None)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % (
            "\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))
        if resumed:
            print(f"resumed {files.run_name} at step {run.global_step} from {args.resume}")
        self.episode_returns = np.zeros(args.num_envs)
        self.episode_lengths = np.zeros(args.num_envs, dtype=np.int64)
        self.recent_returns: list[float] = []  # the last 10 episodes' returns, for the progress line
        self.update_stats = torch.zeros((LOG_EVERY, 2), device=run.device)  # (td_loss, mean Q) per update
        self.update_steps = [0] * LOG_EVERY  # the env step of each of those updates
        self.start_time, self.start_step, self.last_print, self.eval_seconds = time.time(), run.global_step, 0.0, 0.0
        self.goal_reached_step: Optional[int] = None  # when the eval mean reached --goal-score, in this process
        self.goal_reached_s: Optional[float] = None
        self.is_tty = sys.stderr.isatty()

    def sps(self) -> float:
        return (self.run.global_step - self.start_step) / max(time.time() - self.start_time, 1e-9)

    def episodes(self, rewards: np.ndarray, is_transition: np.ndarray, ended: np.ndarray) -> None:
        """Adds a step's rewards to each env's episode; logs the return and length of each episode that ended."""
        self.episode_returns[is_transition] += rewards[is_transition]
        self.episode_lengths[is_transition] += 1
        for i in np.flatnonzero(ended):
            self.recent_returns = (self.recent_returns + [float(self.episode_returns[i])])[-10:]
            self.writer.add_scalar("charts/episodic_return", self.episode_returns[i], self.run.global_step)
            self.writer.add_scalar("charts/episodic_length", self.episode_lengths[i], self.run.global_step)
            self.episode_returns[i], self.episode_lengths[i] = 0, 0

    def update(self, stats: torch.Tensor, step: int) -> None:
        """Keeps one update's (td_loss, mean Q) on the device, read every LOG_EVERY updates."""
        self.update_stats[self.run.n_updates % LOG_EVERY] = stats
        self.update_steps[self.run.n_updates % LOG_EVERY] = step

    def read_updates(self, step: int, epsilon: float) -> Optional[int]:
        """Reads the last LOG_EVERY updates' stats (one host sync) and logs them; returns the env step of the first
        non-finite one, None if all are finite."""
        stats = self.update_stats.cpu().numpy()
        if not np.isfinite(stats).all():
            return self.update_steps[int(np.flatnonzero(~np.isfinite(stats).all(axis=1))[0])]
        self.writer.add_scalar("losses/td_loss", stats[:, 0].mean(), step)
        self.writer.add_scalar("losses/q_values", stats[:, 1].mean(), step)
        self.writer.add_scalar("charts/SPS", int(self.sps()), step)
        self.writer.add_scalar("charts/epsilon", epsilon, step)
        return None

    def evaluation(self, returns: np.ndarray, seconds: float) -> None:
        step = self.run.global_step
        self.eval_seconds += seconds
        self.writer.add_scalar("eval/episodic_return", returns.mean(), step)
        print(("\n" if self.is_tty else "") + f"step {step}: eval return {returns.mean():.2f} +- {returns.std():.2f}")

    def goal_reached(self, eval_mean: float) -> None:
        self.goal_reached_step, self.goal_reached_s = self.run.global_step, time.time() - self.start_time
        print(f"goal reached: eval mean {eval_mean:.2f} >= {self.args.goal_score} at step {self.goal_reached_step} "
              f"after {self.goal_reached_s:.1f}s")

    def progress(self, epsilon: float) -> None:
        if not self.is_tty or time.time() - self.last_print <= 0.5:
            return
        self.last_print, sps, run = time.time(), self.sps(), self.run
        recent = f"{np.mean(self.recent_returns):.1f}" if self.recent_returns else "-"
        print(f"\r{run.global_step:>9,}/{self.args.total_timesteps:,} steps | {sps:,.0f} SPS | "
              f"ETA {(self.args.total_timesteps - run.global_step) / max(sps, 1e-9) / 60:.1f} min | "
              f"return(10) {recent} | eps {epsilon:.3f}   ", end="", file=sys.stderr, flush=True)

    def summary(self, stop_reason: str, training_s: float, checkpoint_step: Optional[int] = None) -> None:
        """runs/{run_name}/summary.json: what a program needs from a run, without parsing printed lines. training_s:
        this process's seconds in the training loop, evaluations left out (and the final checkpoint after it)."""
        run, wall_s = self.run, time.time() - self.start_time
        steps = run.global_step - self.start_step
        summary = {"run_name": self.files.run_name, "script": os.path.basename(__file__), "env_id": self.args.env_id,
                   "stop_reason": stop_reason, "env_steps": run.global_step, "gradient_updates": run.n_updates,
                   "target_syncs": run.n_target_syncs, "env_steps_this_process": steps, "wall_s": wall_s,
                   "training_sps": steps / max(training_s, 1e-9),
                   "best_eval_return": run.best_eval if run.best_eval > -float("inf") else None,
                   "final_eval_return": run.last_eval, "checkpoint": self.files.checkpoint,
                   "checkpoint_step": run.global_step if checkpoint_step is None else checkpoint_step,
                   "resumed_from": self.args.resume, "args": asdict(self.args),
                   # --goal-score: the step and the seconds (wall_s's clock, as the printed line) it was reached at
                   "goal_score": self.args.goal_score, "goal_reached_step": self.goal_reached_step,
                   "goal_reached_s": self.goal_reached_s}
        save_checkpoint(os.path.join(self.files.run_dir, "summary.json"), summary,
                        dump=lambda obj, f: f.write(json.dumps(obj, indent=1).encode()))


def end_run(run: RunState, rb: ReplayBuffer, log: Log, reason: str, signum: Optional[int] = None) -> None:
    """The one end of every run (completed, a signal, a non-finite loss, a crash): the final checkpoint, CleanRL's
    model file, summary.json, the last lines. A non-finite learner is never written: the checkpoint then holds the
    last finite state and the process exits 1; a signal exits 128 + its number; after a crash the caller re-raises."""
    files, args = log.files, log.args
    training_s = time.time() - log.start_time - log.eval_seconds
    finite = run.finite()  # sync point
    if log.is_tty:
        print(file=sys.stderr)
    state = files.checkpoint_state(run, rb)
    if not finite and not reason.startswith("non-finite"):  # weights that went bad between two loss checks
        reason = f"non-finite weights at step {run.global_step}"
    if reason.startswith("non-finite"):  # roll the learner back to its last finite state
        state.update(run.last_finite)
    save_checkpoint(files.checkpoint, state)
    # as CleanRL writes it: a bare q_network.state_dict(), which its dqn_eval loads
    if args.save_model and not reason.startswith("non-finite"):
        model_path = os.path.join(files.run_dir, f"{args.exp_name}.cleanrl_model")
        save_checkpoint(model_path, run.q_network.state_dict())
        print(f"model saved to {model_path}")
    try:
        log.writer.close()
    except Exception as error:  # a broken event file must not cost the summary
        print(f"warning: closing the TensorBoard writer failed ({type(error).__name__}: {error})", file=sys.stderr)
    log.summary(reason, training_s, checkpoint_step=state["global_step"])
    print(f"finished {files.run_name}: {run.global_step} steps, {run.n_updates} gradient updates, "
          f"{run.n_target_syncs} target syncs in {time.time() - log.start_time:.1f}s; best eval return "
          f"{run.best_eval:.2f}")
    if reason.startswith("non-finite"):
        print(f"error: {reason.replace('non-finite loss at', 'non-finite TD loss or Q-values at env')}; the last good "
              f"state (step {state['global_step']}) is saved in {files.checkpoint}; lower --learning-rate or check "
              "the rewards", file=sys.stderr)
        raise SystemExit(1)
    if signum is not None:
        print(f"stopped by signal {int(signum)} at step {run.global_step}; resume with --resume "
              f"{files.checkpoint}", file=sys.stderr)
        raise SystemExit(128 + signum)
    if reason.startswith("error: "):
        print(f"the state at step {run.global_step} is saved in {files.checkpoint}; resume with --resume "
              f"{files.checkpoint}", file=sys.stderr)


class StopOnSignal:
    """SIGINT and SIGTERM. Before arm() (the start: checks, replay allocation, building the envs) they end the process
    at once, by their default action, since nothing is written yet and a long C++ call (ale-py building many envs)
    would defer a Python handler. After arm() the first ends the training loop at its next step (the run then
    checkpoints and exits 128 + signal) and a second kills at once wherever the process is: the kernel restores the
    default action as it delivers the first (SA_RESETHAND), before Python's handler can run. An exception inside the
    armed block ends the run through on_crash, then propagates. True once a signal has arrived."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopOnSignal":
        self.signum: Optional[int] = None
        self.on_crash: Optional[Callable[[Exception], None]] = None
        self.previous = {s: signal.signal(s, signal.SIG_DFL) for s in self.SIGNALS}
        return self

    def arm(self, on_crash: Callable[[Exception], None]) -> None:
        self.on_crash = on_crash
        for signum in self.SIGNALS:
            signal.signal(signum, self.request)
            reset_on_delivery(signum)

    def request(self, signum, frame) -> None:
        self.signum = signum
        for other in self.SIGNALS:  # where SA_RESETHAND is not available, and for the other signal
            signal.signal(other, signal.SIG_DFL)

    def __bool__(self) -> bool:
        return self.signum is not None

    def __exit__(self, exc_type, exc, traceback) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if isinstance(exc, Exception) and self.on_crash is not None:
            self.on_crash(exc)  # checkpoint and summary.json first; the traceback follows


class Sigaction(ctypes.Structure):
    """struct sigaction of Linux's C libraries (glibc, musl): handler, a 1024-bit signal mask, flags, restorer."""

    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


def reset_on_delivery(signum: int) -> None:
    """Adds SA_RESETHAND to the handler Python installed for signum (Linux only; elsewhere StopOnSignal.request
    restores the default action, once Python gets to run it)."""
    if not sys.platform.startswith("linux"):
        return
    libc, action = ctypes.CDLL(None, use_errno=True), Sigaction()
    if libc.sigaction(signum, None, ctypes.byref(action)) == 0:
        action.flags |= 0x80000000  # SA_RESETHAND
        libc.sigaction(signum, ctypes.byref(action), None)


def play(args: Args, obs_dim: int, n_actions: int, device: torch.device) -> None:
    """--play: evaluate a saved model (ours, a checkpoint, or a bare state_dict as CleanRL saves and publishes)."""
    state = load_checkpoint(args.play, args.env_id, n_actions, play=True)
    q_network = make_network(obs_dim, n_actions, tuple(state["hidden_sizes"]), device)
    load_weights(q_network, state["model"], args.play)
    video_path = None
    if args.capture_video:
        os.makedirs("videos", exist_ok=True)
        video_path = os.path.join("videos", f"play__{args.env_id.replace('/', '-')}__{args.seed}.mp4")
    returns = evaluate(q_network, args.env_id, args.eval_episodes, args.eval_epsilon, args.seed, device, video_path)
    print(f"{args.eval_episodes} episodes of {args.play}: mean return {returns.mean():.2f} +- {returns.std():.2f}"
          f" (min {returns.min():.1f}, max {returns.max():.1f})" + (f"; video: {video_path}" if video_path else ""))


if __name__ == "__main__":
    main(tyro.cli(Args))
