"""DQN (Mnih et al. 2015, Nature 518; arXiv:1312.5602) for CartPole-v1 and any gymnasium env with a flat Box
observation and Discrete actions.

    python dqn_cartpole.py --env-id CartPole-v1 --seed 1

As CleanRL's dqn.py: an MLP instead of the CNN, Adam instead of RMSProp, MSE loss. A time-limit truncation bootstraps
from the real final observation (Pardo et al. 2018, arXiv:1712.00378). The defaults are tuned for CartPole-v1 (50k
steps, where CleanRL's dqn.py runs 500k); benchmarks/RESULTS.md measures how fast it solves the task.
"""

import copy
import difflib
import fcntl
import glob
import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, NamedTuple, NoReturn, Optional

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


def make_env(env_id: str, seed: int, render: bool = False):
    def thunk():
        if render:  # SDL's dummy driver draws the same frames without a display, and without Wayland's error line
            os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        env = gym.make(env_id, render_mode="rgb_array") if render else gym.make(env_id)
        env.action_space.seed(seed)
        return env

    return thunk


def check_env(env_id: str) -> tuple[int, int]:
    """(obs size, action count) of env_id; fails in one line unless it has a flat Box obs and Discrete actions."""
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
    """Preallocated ring buffer on `device`, one slot per transition in named, typed fields (README: "Replay layout").
    next_obs is stored beside obs: a few floats, and it keeps a truncated episode's real final observation.
    2 * obs_dim * 4 + 8 + 4 + 1 bytes per transition; CartPole: 45 bytes, 2.25 MB at 50k."""

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

    def load_state_dict(self, state: dict) -> None:
        for name in self.FIELDS:
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(f"its replay's {name} are {tuple(state[name].shape)}, this run's "
                                 f"{tuple(getattr(self, name).shape)}: pass its --buffer-size")
            getattr(self, name).copy_(state[name])
        self.pos, self.size = state["pos"], state["size"]


def evaluate(q_network: nn.Module, env_id: str, episodes: int, epsilon: float, seed: int, device: torch.device,
             video_path: Optional[str] = None, stop: Callable[[], bool] = lambda: False) -> np.ndarray:
    """Plays `episodes` episodes at once, one per env; returns their returns. The video is episode 0's, rendered by
    its own env; stop() ends the evaluation early."""
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
    """What outlives a step: networks, optimizer, RNGs, counters, evaluations. state_dict() is the checkpoint, one
    dict with the replay, and load_state_dict() its mirror."""

    def __init__(self, args: Args, obs_dim: int, n_actions: int, device: torch.device, rb: ReplayBuffer):
        self.args, self.n_actions, self.device, self.rb = args, n_actions, device, rb
        self.q_network = make_network(obs_dim, n_actions, args.hidden_sizes, device)
        self.optimizer = make_optimizer(self.q_network, args)
        self.target_network = make_network(obs_dim, n_actions, args.hidden_sizes, device)
        self.target_network.load_state_dict(self.q_network.state_dict())
        self.rng = np.random.default_rng(args.seed)  # exploration
        self.global_step, self.n_updates, self.n_target_syncs = 0, 0, 0
        self.best_eval, self.last_eval, self.eval_due = -float("inf"), None, False  # due: owed at global_step
        self.goal_reached_step, self.goal_reached_s = None, None  # --goal-score, in this process
        self.last_finite: Optional[dict] = None  # learner_state() at the last all-finite loss check

    def learner_state(self) -> dict:
        return {"model": self.q_network.state_dict(), "target_model": self.target_network.state_dict(),
                "optimizer": self.optimizer.state_dict(), "global_step": self.global_step, "n_updates": self.n_updates,
                "n_target_syncs": self.n_target_syncs}

    def state_dict(self) -> dict:
        return {**self.learner_state(), "script": SCRIPT, "env_id": self.args.env_id, "n_actions": self.n_actions,
                "hidden_sizes": list(self.args.hidden_sizes), "run_name": self.args.run_name,
                "args": asdict(self.args), "best_eval": self.best_eval, "last_eval": self.last_eval,
                "eval_due": self.eval_due, "numpy_rng": self.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "replay_buffer": self.rb.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.q_network.load_state_dict(state["model"])
        self.target_network.load_state_dict(state["target_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.param_groups[0]["lr"] = self.args.learning_rate  # this run's flags
        self.global_step, self.n_updates = state["global_step"], state["n_updates"]
        self.n_target_syncs, self.best_eval = state["n_target_syncs"], state["best_eval"]
        self.last_eval, self.eval_due = state["last_eval"], state["eval_due"]
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.rb.load_state_dict(state["replay_buffer"])

    def sps(self) -> float:
        return (self.global_step - self.start_step) / max(time.time() - self.start_time, 1e-9)

    def finite(self) -> bool:
        """Whether both networks and Adam's moments hold only finite numbers (one sync point)."""
        tensors = [*self.q_network.parameters(), *self.target_network.parameters(),
                   *(v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def main(args: Args) -> None:
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    args = resume_args(args, checkpoint) if checkpoint else args  # a resumed run goes on with its checkpoint's flags
    validate_args(args)
    obs_dim, n_actions = check_env(args.env_id)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and device.type == "cpu":
        print("warning: --cuda is on (the default) but CUDA is not available; running on the CPU (--no-cuda "
              "silences this)", file=sys.stderr)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    check_memory(args, obs_dim, n_actions, device)
    if args.play:
        return play(args, obs_dim, n_actions, device)

    # ALGO LOGIC: initialize agent here:
    rb = ReplayBuffer(args.buffer_size, obs_dim, device, args.gamma)
    run = RunState(args, obs_dim, n_actions, device, rb)
    if checkpoint:
        try:  # a file that does not fit fails in one line, before anything is written
            run.load_state_dict(checkpoint)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            fail(f"{args.resume!r} is not a checkpoint of this script/flags ({type(error).__name__}: {error})")
    run_dir, lock = open_run_dir(args, checkpoint)  # runs/{run_name}, locked by this process while `lock` is open
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, args.seed + run.global_step + i)
                                     for i in range(args.num_envs)])
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, group=args.wandb_group,
                   sync_tensorboard=True, config=vars(args), name=args.run_name, id=args.run_name, resume="allow",
                   dir=run_dir, save_code=True)
    writer = SummaryWriter(run_dir, purge_step=run.global_step if checkpoint else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % (
        "\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))
    if checkpoint:
        print(f"resumed {args.run_name} at step {run.global_step} from {args.resume}")
    episode_returns, episode_lengths = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=np.int64)
    recent_returns: list[float] = []  # the last 10 episodes' returns, for the progress line
    update_stats = torch.zeros((LOG_EVERY, 2), device=device)  # (td_loss, mean Q) of the last LOG_EVERY updates
    update_steps = [0] * LOG_EVERY  # the env step of each
    run.start_time, run.start_step, run.eval_seconds, last_print = time.time(), run.global_step, 0.0, 0.0

    obs, _ = envs.reset(seed=args.seed + run.global_step)
    autoreset = np.zeros(args.num_envs, dtype=bool)  # True where the next step is NEXT_STEP's reset step
    run.last_finite = copy.deepcopy(run.learner_state())
    stop = []  # the signal that asked the loop to stop
    previous_handlers = {s: signal.signal(s, lambda signum, _: on_signal(signum, stop)) for s in STOP_SIGNALS}
    try:
        while not stop:
            if run.eval_due:  # the step that passed a multiple of eval_frequency, the last one, or an owed evaluation
                if not run.finite():  # sync point: a non-finite network is neither evaluated nor saved
                    end_run(run, writer, f"non-finite weights at step {run.global_step}")
                started = time.time()
                video = f"{run_dir}/videos/eval_step{run.global_step}.mp4" if args.capture_video else None
                returns = evaluate(run.q_network, args.env_id, args.eval_episodes, args.eval_epsilon,
                                   args.seed + 1_000_000 + run.global_step, device, video, stop=lambda: bool(stop))
                if stop:  # a signal cut the evaluation short: it stays due, and a resumed run does it first
                    break
                run.eval_seconds += time.time() - started
                writer.add_scalar("eval/episodic_return", returns.mean(), run.global_step)
                print("\n" * sys.stderr.isatty() + f"step {run.global_step}: eval return {returns.mean():.2f} +- "
                      f"{returns.std():.2f}")
                run.last_eval, run.eval_due = float(returns.mean()), False
                if run.last_eval > run.best_eval:
                    run.best_eval = run.last_eval
                    save_checkpoint(f"{run_dir}/best_model.pt", {"script": SCRIPT, "env_id": args.env_id,
                                    "n_actions": n_actions, "hidden_sizes": list(args.hidden_sizes),
                                    "model": run.q_network.state_dict(), "global_step": run.global_step})
                if args.goal_score is not None and returns.mean() >= args.goal_score:
                    run.goal_reached_step, run.goal_reached_s = run.global_step, time.time() - run.start_time
                    print(f"goal reached: eval mean {returns.mean():.2f} >= {args.goal_score} at step "
                          f"{run.global_step} after {run.goal_reached_s:.1f}s")
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
            episode_returns[is_transition] += rewards[is_transition]
            episode_lengths[is_transition] += 1
            for i in np.flatnonzero(is_transition & (terminations | truncations)):
                recent_returns = (recent_returns + [float(episode_returns[i])])[-10:]
                writer.add_scalar("charts/episodic_return", episode_returns[i], run.global_step)
                writer.add_scalar("charts/episodic_length", episode_lengths[i], run.global_step)
                episode_returns[i], episode_lengths[i] = 0, 0
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
                    data = rb.sample(args.batch_size)  # one gradient step on a uniform batch
                    update_stats[run.n_updates % LOG_EVERY] = train_step(run.q_network, run.target_network,
                                                                         run.optimizer, data)
                    update_steps[run.n_updates % LOG_EVERY] = step
                    run.n_updates += 1
                    if run.n_updates % LOG_EVERY == 0:
                        stats = update_stats.cpu().numpy()  # sync point: once per LOG_EVERY updates
                        if not np.isfinite(stats).all():
                            bad_step = update_steps[int(np.flatnonzero(~np.isfinite(stats).all(axis=1))[0])]
                            end_run(run, writer, f"non-finite loss at step {bad_step}")
                        writer.add_scalar("losses/td_loss", stats[:, 0].mean(), step)
                        writer.add_scalar("losses/q_values", stats[:, 1].mean(), step)
                        writer.add_scalar("charts/SPS", int(run.sps()), step)
                        writer.add_scalar("charts/epsilon", epsilon, step)
                        run.last_finite = copy.deepcopy(run.learner_state())
                if step % args.target_network_frequency == 0:
                    update_target(run.target_network, run.q_network, args.tau)
                    run.n_target_syncs += 1

            run.eval_due = (passed_multiple(args.eval_frequency, run.global_step, args.num_envs)
                            or run.global_step >= args.total_timesteps)  # evaluated at the top of the loop
            if passed_multiple(args.checkpoint_frequency, run.global_step, args.num_envs):
                if not run.finite():  # sync point: a non-finite state is never written over a finite one
                    end_run(run, writer, f"non-finite weights at step {run.global_step}")
                save_checkpoint(f"{run_dir}/checkpoint.pt", run.state_dict())
            if sys.stderr.isatty() and time.time() - last_print > 0.5:  # the progress line, on a terminal only
                last_print, recent = time.time(), f"{np.mean(recent_returns):.1f}" if recent_returns else "-"
                print(f"\r{run.global_step:>9,}/{args.total_timesteps:,} steps | {run.sps():,.0f} SPS | ETA "
                      f"{(args.total_timesteps - run.global_step) / max(run.sps(), 1e-9) / 60:.1f} min | return(10) "
                      f"{recent} | eps {epsilon:.3f}   ", end="", file=sys.stderr, flush=True)
    except Exception as error:  # a crash still leaves a checkpoint and summary.json; the traceback follows
        end_run(run, writer, f"error: {type(error).__name__}: {error}")
        if isinstance(error, OSError):  # a write that failed (a full disk, say) is one line, not a traceback
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
    finally:
        envs.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    end_run(run, writer, f"signal {signal.Signals(stop[0]).name}" if stop else
            "completed" if run.goal_reached_step is None else "goal reached", *stop)


# =====================================================================================================================
# Plumbing: what keeps a run safe, not the algorithm. Input checks, resumed flags, memory, the run folder,
# checkpoints, the one end of every run (summary.json, exit codes), signals, --play, video.
# =====================================================================================================================
HEADROOM = 2**29  # batches, the CUDA context and the rest of the process
ENV_BYTES = 32 * 2**10  # host RAM of one classic-control env in a SyncVectorEnv (6 KB measured for CartPole-v1)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SCRIPT = os.path.basename(__file__)
# the flags a resumed run may change (anything else would change what its checkpoint means)
SAFE_ON_RESUME = ("learning_rate total_timesteps eval_frequency eval_episodes eval_epsilon checkpoint_frequency track "
                  "wandb_project_name wandb_entity wandb_group capture_video save_model exp_name run_name cuda "
                  "goal_score resume play").split()


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr (whatever the message holds) and exit code 2, before anything is written."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    raise SystemExit(2)


def validate_args(args: Args) -> None:
    """Bad flags fail here, before anything is built or written (NaN fails every rule); poor ones get a warning."""
    rules = [("below 2^53", lambda v: v < 2**53, " ".join(f.name for f in fields(Args) if f.type is int)),
             ("positive", lambda v: v > 0, "total_timesteps num_envs buffer_size batch_size train_frequency "
              "eval_episodes target_network_frequency"),
             ("positive and finite", lambda v: 0 < v < float("inf"), "learning_rate"),
             (">= 0", lambda v: v >= 0, "learning_starts eval_frequency checkpoint_frequency"),
             ("in (0, 1]", lambda v: 0 < v <= 1, "exploration_fraction tau"),
             ("in [0, 1]", lambda v: 0 <= v <= 1, "gamma start_e end_e eval_epsilon"),
             ("in [0, 2^32)", lambda v: 0 <= v < 2**32, "seed")]
    for rule, ok, names in rules:
        for name in (name for name in names.split() if not ok(getattr(args, name))):
            fail(f"--{name.replace('_', '-')} must be {rule}, got {str(getattr(args, name))[:40]}")
    for flag, name in [("--exp-name", args.exp_name), ("--run-name", args.run_name)]:
        if name is not None and not (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,99}", name) and ".." not in name):
            fail(f"{flag} {name!r} must be a plain name of at most 100 letters, digits and . _ = + -")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0 or max(args.hidden_sizes) >= 2**31:
        fail(f"--hidden-sizes must be one or more positive layer widths, got {args.hidden_sizes}")
    if args.buffer_size < max(args.batch_size, args.num_envs):
        fail(f"--buffer-size ({args.buffer_size}) must be >= --batch-size ({args.batch_size}) and --num-envs")
    if args.play:
        return
    if args.track and os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun"):
        import wandb  # before any long work: the replay's allocation, the envs

        if not wandb.login(prompt=False, verify=False):
            fail("--track needs a W&B login: run `wandb login`, or set WANDB_MODE=offline to sync later")
    if args.learning_starts >= args.total_timesteps:
        fail(f"--learning-starts ({args.learning_starts}) must be < --total-timesteps ({args.total_timesteps})")
    if args.total_timesteps // args.train_frequency == args.learning_starts // args.train_frequency:
        fail(f"--train-frequency {args.train_frequency} leaves no update between --learning-starts "
             f"{args.learning_starts} and --total-timesteps {args.total_timesteps}; lower it")
    for poor, why in [(args.target_network_frequency > args.total_timesteps, "--target-network-frequency is above "
                       "--total-timesteps: the target network is never synced"),
                      (args.num_envs > args.total_timesteps, "--num-envs is above --total-timesteps: the run "
                       "overshoots to --num-envs steps"),
                      (args.batch_size > args.learning_starts, "--batch-size is above --learning-starts: the first "
                       "batches repeat the few transitions stored")]:
        if poor:
            print(f"warning: {why}", file=sys.stderr)


def resume_args(args: Args, checkpoint: dict) -> Args:
    """A resumed run goes on with its checkpoint's flags. A flag given here (not at its default) that differs is
    applied if SAFE_ON_RESUME lists it, with one notice line, and fails otherwise, naming both values."""
    try:
        saved = Args(**checkpoint["args"])
    except (KeyError, TypeError) as error:
        fail(f"{args.resume!r} is not a checkpoint of this script/flags ({type(error).__name__}: {error})")
    safe = SAFE_ON_RESUME + ["buffer_size"] * (checkpoint.get("replay_buffer") is None)  # an empty buffer refills
    default = Args()
    changed = {name: value for name, value in asdict(args).items()
               if value != getattr(saved, name) and value != getattr(default, name)}
    for name, value in changed.items():
        flag = "--" + name.replace("_", "-")
        if name not in safe or (name == "total_timesteps" and value < checkpoint["global_step"]):
            fail(f"{flag} {value} would change what {args.resume!r} holds (it ran with {flag} {getattr(saved, name)}"
                 f", to step {checkpoint['global_step']}); resume with its value or start a new run")
    notice = [f"--{k.replace('_', '-')} {getattr(saved, k)} -> {v}" for k, v in changed.items() if k != "resume"]
    if notice:
        print(f"resuming with changed flags: {', '.join(notice)}")
    return replace(saved, **{**changed, "resume": args.resume, "play": None})


def check_memory(args: Args, obs_dim: int, n_actions: int, device: torch.device) -> None:
    """Fails early when the replay, the networks (two, with gradients and Adam's two moments) and the envs do not fit
    in free memory, naming the flag that takes the most, before the allocator or the evaluation fails on them."""
    widths = [obs_dim, *args.hidden_sizes, n_actions]
    parts = {"--buffer-size": 0 if args.play else args.buffer_size * (2 * obs_dim * 4 + 8 + 4 + 1),
             "--hidden-sizes": 5 * 4 * sum((a + 1) * b for a, b in zip(widths, widths[1:])),
             "--eval-episodes": (args.eval_episodes + args.num_envs) * ENV_BYTES}
    with open("/proc/meminfo") as f:  # MemAvailable: what the OS can give without swapping
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable")) - HEADROOM
    if device.type == "cuda":  # the replay and the networks live in GPU memory
        free = min(free + parts["--buffer-size"] + parts["--hidden-sizes"], torch.cuda.mem_get_info(device)[0])
    if sum(parts.values()) > free:
        largest = max(parts, key=parts.get)
        fail(f"--buffer-size {args.buffer_size}, --hidden-sizes {' '.join(map(str, args.hidden_sizes))} and "
             f"--eval-episodes {args.eval_episodes} need {sum(parts.values()) / 1e9:.1f} GB but only "
             f"{max(free, 0) / 1e9:.1f} GB is free; {largest} takes {parts[largest] / 1e9:.1f} GB of it: lower it")


def open_run_dir(args: Args, checkpoint: Optional[dict]):
    """Creates runs/{run_name} and its lock (flock, with our pid inside: held while the file is open, released by the
    kernel however the process ends). A run never takes a folder that holds another run's checkpoint."""
    args.run_name = args.run_name or f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{time.time():.0f}"
    run_dir = os.path.join("runs", args.run_name)
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(f"{run_dir}/lock", "a+")
    except OSError as error:
        fail(f"cannot write the run directory {run_dir!r} ({error.strerror})")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        fail(f"{run_dir} is in use by process {lock.read().strip() or '?'} (it holds {run_dir}/lock); wait for it "
             "to end or pass another --run-name")
    own = f"{run_dir}/checkpoint.pt"
    if os.path.exists(own) and not (checkpoint and os.path.samefile(args.resume, own)):
        fail(f"{run_dir} already holds a run; continue it with --resume {own} or pass another --run-name")
    lock.truncate(0)
    print(os.getpid(), file=lock, flush=True)
    for stale in glob.glob(f"{run_dir}/*.tmp*"):  # left by a process killed while writing a checkpoint
        os.remove(stale)
    return run_dir, lock


def save_checkpoint(path: str, state: dict, dump: Callable = torch.save) -> None:
    """Atomic: dump to a temp file, fsync, rename over; a kill or a full disk mid-write leaves the previous file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, play: bool = False) -> dict:
    """Loads with weights_only=True (no code runs from the file). --resume needs a checkpoint of this script; --play
    takes a model too: ours, or a bare q_network.state_dict() as CleanRL saves (.cleanrl_model) and publishes them."""
    if not os.path.isfile(path):
        fail(f"{path!r} is a directory; pass the checkpoint.pt or model file in it" if os.path.isdir(path) else
             f"{path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"cannot load {path!r}: corrupt, not a checkpoint, or holding more than weights, which weights_only "
             f"loading refuses ({type(error).__name__})")
    model = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(model, dict) or not (any(k.endswith(".weight") for k in model) or "env_id" in state):
        fail(f"{path!r} is not a model or checkpoint of {SCRIPT}")
    if state.get("script", SCRIPT) != SCRIPT:
        fail(f"{path!r} was written by {state['script']}, not {SCRIPT}; resume or play it with that script")
    if not play and "optimizer" not in state:
        fail(f"{path!r} is a saved model, not a checkpoint; use --play to evaluate it")
    return state


def end_run(run: RunState, writer: SummaryWriter, reason: str, signum: Optional[int] = None) -> None:
    """The one end of every run: the final checkpoint (never a non-finite learner: its last finite state instead),
    CleanRL's model file, summary.json. Exits 1 after a non-finite learner or a failed write, 128 + n after signal n."""
    args, run_dir, write_error = run.args, f"runs/{run.args.run_name}", None
    if not reason.startswith("non-finite") and not run.finite():  # sync point: weights gone bad between two checks
        reason = f"non-finite weights at step {run.global_step}"
    non_finite = reason.startswith("non-finite")
    state = {**run.state_dict(), **(run.last_finite if non_finite else {})}
    try:
        save_checkpoint(f"{run_dir}/checkpoint.pt", state)
        if args.save_model and not non_finite:  # as CleanRL writes it: a bare q_network.state_dict() for its dqn_eval
            save_checkpoint(f"{run_dir}/{args.exp_name}.cleanrl_model", run.q_network.state_dict())
            print(f"model saved to {run_dir}/{args.exp_name}.cleanrl_model")
        writer.close()  # flushes the TensorBoard events
    except OSError as error:  # a full disk, say: the previous checkpoint stays, and the run ends here
        write_error = f"cannot write {run_dir}: {error.strerror or error}"
        reason = f"error: {write_error}"
    steps, training_s = run.global_step - run.start_step, time.time() - run.start_time - run.eval_seconds
    summary = {"run_name": args.run_name, "script": SCRIPT, "env_id": args.env_id, "stop_reason": reason,
               "env_steps": run.global_step, "gradient_updates": run.n_updates, "target_syncs": run.n_target_syncs,
               "env_steps_this_process": steps, "wall_s": time.time() - run.start_time,
               "training_sps": steps / max(training_s, 1e-9),
               "best_eval_return": run.best_eval if run.best_eval > -float("inf") else None,
               "final_eval_return": run.last_eval, "checkpoint": f"{run_dir}/checkpoint.pt",
               "checkpoint_step": None if write_error else state["global_step"], "resumed_from": args.resume,
               "args": asdict(args), "goal_score": args.goal_score, "goal_reached_step": run.goal_reached_step,
               "goal_reached_s": run.goal_reached_s}  # --goal-score: the step and wall_s when it was reached
    try:
        save_checkpoint(f"{run_dir}/summary.json", summary, lambda obj, f: f.write(json.dumps(obj, indent=1).encode()))
    except OSError as error:
        write_error = write_error or f"cannot write {run_dir}/summary.json: {error.strerror or error}"
    print("\n" * sys.stderr.isatty() + f"finished {args.run_name}: {run.global_step} steps, {run.n_updates} gradient "
          f"updates, {run.n_target_syncs} target syncs in {summary['wall_s']:.1f}s; best eval return "
          f"{run.best_eval:.2f}")
    if write_error:
        print(f"error: {write_error}; {run_dir}/checkpoint.pt keeps the last checkpoint written, if any",
              file=sys.stderr)
        raise SystemExit(1)
    if non_finite:
        print(f"error: {reason.replace('non-finite loss at', 'non-finite TD loss or Q-values at env')}; the last good "
              f"state (step {state['global_step']}) is saved in {run_dir}/checkpoint.pt; lower --learning-rate or "
              "check the rewards", file=sys.stderr)
        raise SystemExit(1)
    if signum is not None or reason.startswith("error: "):
        print(f"stopped by {f'signal {signum}' if signum else 'the error'} at step {run.global_step}; the state is "
              f"saved in {run_dir}/checkpoint.pt; resume with --resume {run_dir}/checkpoint.pt", file=sys.stderr)
    if signum is not None:
        raise SystemExit(128 + signum)


def on_signal(signum: int, stop: list) -> None:
    """The first SIGINT or SIGTERM stops the loop at its next step; the default actions are back for a second one."""
    stop.append(signum)
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_DFL)


def play(args: Args, obs_dim: int, n_actions: int, device: torch.device) -> None:
    """--play: evaluate a saved model (ours, a checkpoint, or a bare state_dict as CleanRL saves and publishes)."""
    state = load_checkpoint(args.play, play=True)
    model, trained_on = state.get("model", state), state.get("env_id")
    widths = [len(v) for k, v in model.items() if k.endswith(".weight")]  # a bare MLP's: hidden layers, then actions
    actions = state.get("n_actions") or widths[-1]
    if actions != n_actions or trained_on not in (None, args.env_id):
        fail(f"{args.play!r} was trained on {trained_on or 'an unnamed env'} ({actions} actions), not {args.env_id} "
             f"({n_actions} actions); pass the --env-id it was trained on")
    if trained_on is None:
        print(f"note: {args.play!r} names no env: its score means something only on the env it was trained on")
    q_network = make_network(obs_dim, n_actions, tuple(state.get("hidden_sizes", widths[:-1])), device)
    try:
        q_network.load_state_dict(model)
    except RuntimeError as error:
        fail(f"{args.play!r} holds another network ({error}); use the script it was trained with")
    video = f"videos/play__{args.env_id.replace('/', '-')}__{args.seed}.mp4" if args.capture_video else None
    returns = evaluate(q_network, args.env_id, args.eval_episodes, args.eval_epsilon, args.seed, device, video)
    print(f"{args.eval_episodes} episodes of {args.play}: mean return {returns.mean():.2f} +- {returns.std():.2f}"
          f" (min {returns.min():.1f}, max {returns.max():.1f})" + (f"; video: {video}" if video else ""))


def write_video(path: str, frames: list[np.ndarray], fps: int = 30) -> None:
    """MP4 through OpenCV (no moviepy); frames are RGB uint8 (H, W, 3)."""
    if not frames:  # a signal stopped the evaluation before its first frame
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, frames[0].shape[1::-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # until the loop: Ctrl-C ends the start at once, writing nothing
    main(tyro.cli(Args))
