"""DQN for CartPole-v1 and any gymnasium env with a flat Box observation and Discrete actions.

Algorithm 1 of Mnih et al. 2015, "Human-level control through deep reinforcement learning" (Nature 518;
preprint arXiv:1312.5602): epsilon-greedy acting, a replay memory, and a periodically synced target network.

    python dqn_cartpole.py --env-id CartPole-v1 --seed 1

Departures from the paper, all as in CleanRL's dqn.py: an MLP instead of the CNN, Adam instead of RMSProp, MSE loss
(no error clipping). A time-limit truncation bootstraps from the real final observation (Pardo et al. 2018,
arXiv:1712.00378); only a true termination cuts the return. Defaults are tuned to solve CartPole-v1 in 50k steps
(benchmarks/RESULTS.md), not CleanRL's 500k.
"""

import copy
import difflib
import glob
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
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
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 2, before anything is written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def validate_args(args: Args) -> None:
    positive = ["total_timesteps", "num_envs", "buffer_size", "batch_size", "train_frequency", "eval_episodes"]
    positive += ["target_network_frequency"]
    for name in positive:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "eval_frequency", "checkpoint_frequency"]:
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        fail(f"--learning-rate must be positive, got {args.learning_rate}")
    for name in ["exploration_fraction", "tau"]:
        if not 0 < getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    for name in ["gamma", "start_e", "end_e", "eval_epsilon"]:
        if not 0 <= getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        fail(f"--hidden-sizes must be one or more positive layer widths, got {args.hidden_sizes}")
    if args.buffer_size < max(args.batch_size, args.num_envs):
        fail(f"--buffer-size ({args.buffer_size}) must be >= --batch-size ({args.batch_size}) and --num-envs")
    if args.learning_starts >= args.total_timesteps and not args.play:
        fail(f"--learning-starts ({args.learning_starts}) must be < --total-timesteps ({args.total_timesteps})")
    for name in ["exp_name", "run_name"]:
        value = getattr(args, name)
        if value is not None and (not RUN_NAME_RE.fullmatch(value) or ".." in value):
            fail(f"--{name.replace('_', '-')} {value!r} must be a plain name (letters, digits, . _ = + -)")


def make_env(env_id: str, seed: int, render: bool = False):
    def thunk():
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


def crossed(global_step: int, num_envs: int, frequency: int) -> bool:
    """Whether the last vector step (num_envs env steps) passed a multiple of `frequency` (0: never)."""
    return frequency > 0 and global_step // frequency > (global_step - num_envs) // frequency


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        layers, width = [], obs_dim
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.network = nn.Sequential(*layers, nn.Linear(width, n_actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)  # (B, obs_dim) -> (B, n_actions)


def compute_td_target(target_network: nn.Module, rewards: torch.Tensor, next_observations: torch.Tensor,
                      dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """y = r + gamma * max_a' Q_target(s', a'), cut at a true termination (Mnih et al. 2015, Algorithm 1)."""
    with torch.no_grad():
        target_max = target_network(next_observations).max(dim=1).values  # (B,)
        return rewards + gamma * target_max * (1 - dones)


def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """theta_target <- tau * theta + (1 - tau) * theta_target; tau = 1 is the paper's hard copy."""
    with torch.no_grad():
        for target_param, param in zip(target_network.parameters(), q_network.parameters()):
            target_param.copy_(param) if tau == 1.0 else target_param.lerp_(param, tau)


def train_step(q_network: nn.Module, target_network: nn.Module, optimizer: torch.optim.Optimizer, data: "Batch",
               gamma: float) -> torch.Tensor:
    """One gradient step on a batch; returns (td_loss, mean Q) as a (2,) tensor on the device, without a host sync."""
    td_target = compute_td_target(target_network, data.rewards, data.next_observations, data.dones, gamma)
    old_val = q_network(data.observations).gather(1, data.actions[:, None]).squeeze(1)  # Q(s, a), (B,)
    loss = F.mse_loss(td_target, old_val)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return torch.stack((loss.detach(), old_val.detach().mean()))


class Batch(NamedTuple):
    observations: torch.Tensor  # (B, obs_dim) float32
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32
    next_observations: torch.Tensor  # (B, obs_dim) float32
    dones: torch.Tensor  # (B,) float32, 1 only for a true termination (truncation bootstraps)


class ReplayBuffer:
    """Preallocated ring buffer on `device`, one float32 row per transition: [obs, next_obs, action, reward, done].

    One row per transition makes an add one slice write and a sample one gather (no deque of tuples). A flat
    observation is a few floats, so storing next_obs beside obs is cheaper than rebuilding it and keeps the real final
    observation of a truncated episode (NEXT_STEP autoreset replaces it in the env's next obs).
    """

    def __init__(self, capacity: int, obs_dim: int, device: torch.device):
        self.capacity, self.obs_dim, self.device, self.pos, self.size = capacity, obs_dim, device, 0, 0
        self.rows = torch.zeros((capacity, 2 * obs_dim + 3), dtype=torch.float32, device=device)

    def add(self, obs: np.ndarray, next_obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, dones: np.ndarray):
        """Adds k transitions (numpy arrays with a leading k axis), overwriting the oldest once full."""
        rows = np.concatenate([obs, next_obs, np.stack([actions, rewards, dones], axis=1)], axis=1, dtype=np.float32)
        rows = torch.from_numpy(rows).to(self.device)
        k = len(rows)
        first = min(k, self.capacity - self.pos)  # rows that fit before the ring wraps; the rest go to the front
        self.rows[self.pos : self.pos + first] = rows[:first]
        self.rows[: k - first] = rows[first:]
        self.pos = (self.pos + k) % self.capacity
        self.size = min(self.size + k, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        rows = self.rows[torch.randint(self.size, (batch_size,), device=self.device)]  # (B, 2 * obs_dim + 3)
        d = self.obs_dim
        return Batch(rows[:, :d], rows[:, -3].long(), rows[:, -2], rows[:, d : 2 * d], rows[:, -1])

    def state_dict(self) -> dict:
        return {"pos": self.pos, "size": self.size, "rows": self.rows.cpu()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not isinstance(state, dict) or getattr(state.get("rows"), "shape", None) != self.rows.shape:
            fail("the checkpoint's replay buffer has another --buffer-size or observation size; resume with the same")
        self.rows.copy_(state["rows"])
        self.pos, self.size = state["pos"], state["size"]


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic write: a kill mid-write leaves the previous file intact (write a temp file, fsync, rename over)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, env_id: str, n_actions: int, bare_ok: bool = False) -> dict:
    """Loads with weights_only=True (no code runs from the file) and fails clearly on a wrong or broken file.
    bare_ok (--play): a bare q_network.state_dict() is a model too, as CleanRL saves (.cleanrl_model) and publishes
    (q_network.pth) them; its action count is read from its last layer."""
    if not os.path.isfile(path):
        fail(f"{path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot load {path!r}: corrupt, not a checkpoint, or holding more than weights, which weights_only "
             f"loading refuses ({type(e).__name__})")
    weights = [v for k, v in state.items() if k.endswith(".weight")] if isinstance(state, dict) else []
    if weights and all(isinstance(v, torch.Tensor) for v in state.values()):
        if not bare_ok:
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


def write_video(path: str, frames: list[np.ndarray], fps: int = 30) -> None:
    """MP4 through OpenCV (no moviepy); frames are RGB uint8 (H, W, 3)."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def evaluate(q_network: nn.Module, env_id: str, episodes: int, epsilon: float, seed: int, device: torch.device,
             video_path: Optional[str] = None, stop: Callable[[], bool] = lambda: False) -> np.ndarray:
    """Plays `episodes` episodes at once, one per env (so long episodes are not under-counted); returns their returns.

    `stop()` true ends the evaluation early (a signal arrived); the returns are then incomplete.
    """
    envs = gym.vector.SyncVectorEnv([make_env(env_id, seed + i, render=video_path is not None and i == 0)
                                     for i in range(episodes)])
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    returns, finished, frames = np.zeros(episodes), np.zeros(episodes, dtype=bool), []
    while not finished.all() and not stop():
        if video_path is not None and not finished[0]:
            frames.append(envs.envs[0].render())
        with torch.inference_mode():
            q_values = q_network(torch.as_tensor(obs, dtype=torch.float32, device=device))
        actions = q_values.argmax(dim=1).cpu().numpy()  # sync point: the env needs host actions
        actions = np.where(rng.random(episodes) < epsilon, rng.integers(envs.single_action_space.n, size=episodes),
                           actions)
        obs, rewards, terminations, truncations, _ = envs.step(actions)
        returns += rewards * ~finished  # an env that already finished has autoreset: ignore its new episode
        finished |= terminations | truncations
    envs.close()
    if video_path is not None:
        write_video(video_path, frames)
    return returns


def main(args: Args) -> None:
    validate_args(args)
    obs_dim, n_actions = check_env(args.env_id)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.resume, args.env_id, n_actions)
        if "optimizer" not in checkpoint:
            fail(f"{args.resume!r} is a saved model, not a checkpoint; use --play to evaluate it")
    if args.cuda and not torch.cuda.is_available():
        print("warning: --cuda is on (the default) but CUDA is not available; running on the CPU "
              "(--no-cuda silences this)", file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    if args.play:
        state = load_checkpoint(args.play, args.env_id, n_actions, bare_ok=True)
        q_network = QNetwork(obs_dim, n_actions, tuple(state["hidden_sizes"])).to(device)
        load_weights(q_network, state["model"], args.play)
        video_path = None
        if args.capture_video:
            os.makedirs("videos", exist_ok=True)
            video_path = os.path.join("videos", f"play__{args.env_id.replace('/', '-')}__{args.seed}.mp4")
        returns = evaluate(q_network, args.env_id, args.eval_episodes, args.eval_epsilon, args.seed, device,
                           video_path)
        print(f"{args.eval_episodes} episodes of {args.play}: mean return {returns.mean():.2f} +- {returns.std():.2f}"
              f" (min {returns.min():.1f}, max {returns.max():.1f})" + (f"; video: {video_path}" if video_path else ""))
        return

    run_name = (args.run_name or (checkpoint or {}).get("run_name")
                or f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir = os.path.join("runs", run_name)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    if not checkpoint and os.path.exists(checkpoint_path):  # never overwrite a run's checkpoint with a new run
        fail(f"{run_dir} already holds a run; continue it with --resume {checkpoint_path} or pass another --run-name")
    check_writable(run_dir)

    # ALGO LOGIC: initialize agent here:
    q_network = QNetwork(obs_dim, n_actions, args.hidden_sizes).to(device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)
    target_network = QNetwork(obs_dim, n_actions, args.hidden_sizes).to(device)
    target_network.load_state_dict(q_network.state_dict())
    rng = np.random.default_rng(args.seed)  # exploration; its state is checkpointed

    global_step, n_updates, n_target_syncs, best_eval = 0, 0, 0, -float("inf")
    if checkpoint:
        try:
            load_weights(q_network, checkpoint["model"], args.resume)
            load_weights(target_network, checkpoint["target_model"], args.resume)
            optimizer.load_state_dict(checkpoint["optimizer"])
            rng.bit_generator.state = checkpoint["numpy_rng"]
            torch.set_rng_state(checkpoint["torch_rng"])
            global_step, n_updates = checkpoint["global_step"], checkpoint["n_updates"]
            n_target_syncs, best_eval = checkpoint["n_target_syncs"], checkpoint["best_eval"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            fail(f"{args.resume!r} is not a complete checkpoint of this script ({type(e).__name__}: {e})")
    rb = ReplayBuffer(args.buffer_size, obs_dim, device)
    if checkpoint:
        rb.load_state_dict(checkpoint.get("replay_buffer"))

    os.makedirs(run_dir, exist_ok=True)
    for stale in glob.glob(f"{checkpoint_path}.tmp*"):  # left by a process killed while writing a checkpoint
        os.remove(stale)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, group=args.wandb_group,
                   sync_tensorboard=True, config=vars(args), name=run_name, id=run_name, resume="allow",
                   dir=run_dir, save_code=True)
    writer = SummaryWriter(run_dir, purge_step=checkpoint["global_step"] if checkpoint else None)
    writer.add_text("hyperparameters",
                    "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))
    if checkpoint:
        print(f"resumed {run_name} at step {global_step} from {args.resume}")

    def good_fields() -> dict:
        return {"model": q_network.state_dict(), "target_model": target_network.state_dict(),
                "optimizer": optimizer.state_dict(), "global_step": global_step, "n_updates": n_updates,
                "n_target_syncs": n_target_syncs}

    def training_state() -> dict:
        return {"env_id": args.env_id, "n_actions": n_actions, "hidden_sizes": list(args.hidden_sizes),
                "run_name": run_name, "args": asdict(args), **good_fields(), "replay_buffer": rb.state_dict(),
                "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "best_eval": best_eval}

    def save_model(path: str) -> None:
        save_checkpoint(path, {"env_id": args.env_id, "n_actions": n_actions, "hidden_sizes": list(args.hidden_sizes),
                               "model": q_network.state_dict(), "global_step": global_step})

    # SIGINT/SIGTERM end the loop at the next step; a second signal kills at once (checkpoint writes are atomic).
    stop_signal = []

    def request_stop(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, args.seed + global_step + i) for i in range(args.num_envs)])
    obs, _ = envs.reset(seed=args.seed + global_step)
    autoreset = np.zeros(args.num_envs, dtype=bool)  # True where the next step is NEXT_STEP's reset step
    episode_returns, episode_lengths = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=np.int64)
    recent_returns: list[float] = []
    update_stats = torch.zeros((LOG_EVERY, 2), device=device)  # (td_loss, mean Q) per update, read every LOG_EVERY
    update_steps = [0] * LOG_EVERY  # the env step of each of those updates
    good_state = copy.deepcopy(good_fields())  # the last learner state whose losses were all finite
    start_time, start_step, last_print = time.time(), global_step, 0.0
    is_tty = sys.stderr.isatty()
    while global_step < args.total_timesteps and not stop_signal:
        # ALGO LOGIC: put action logic here
        epsilon = linear_schedule(args.start_e, args.end_e, int(args.exploration_fraction * args.total_timesteps),
                                  global_step)
        explore = rng.random(args.num_envs) < epsilon
        actions = rng.integers(n_actions, size=args.num_envs)
        if not explore.all():
            with torch.inference_mode():
                q_values = q_network(torch.as_tensor(obs, device=device))
            actions = np.where(explore, actions, q_values.argmax(dim=1).cpu().numpy())  # sync point: host actions

        # TRY NOT TO MODIFY: execute the game and log data.
        next_obs, rewards, terminations, truncations, _ = envs.step(actions)
        real = ~autoreset  # a reset step (action ignored, reward 0) is not a transition
        episode_returns[real] += rewards[real]
        episode_lengths[real] += 1
        for i in np.flatnonzero(real & (terminations | truncations)):
            recent_returns = (recent_returns + [float(episode_returns[i])])[-10:]
            writer.add_scalar("charts/episodic_return", episode_returns[i], global_step)
            writer.add_scalar("charts/episodic_length", episode_lengths[i], global_step)
            episode_returns[i], episode_lengths[i] = 0, 0

        # NEXT_STEP autoreset: next_obs of an ended episode is its real final observation, so a truncation bootstraps
        # from it and only `terminations` are stored as dones.
        rb.add(obs[real], next_obs[real], actions[real], rewards[real], terminations[real])
        autoreset = terminations | truncations
        obs = next_obs
        global_step += args.num_envs

        # ALGO LOGIC: training. Visit every env step this vector step covered, so that updates per env step stay
        # 1/train_frequency and target syncs every target_network_frequency steps whatever num_envs is.
        for step in range(global_step - args.num_envs + 1, global_step + 1):
            if step <= args.learning_starts:
                continue
            if step % args.train_frequency == 0:
                data = rb.sample(args.batch_size)
                update_stats[n_updates % LOG_EVERY] = train_step(q_network, target_network, optimizer, data,
                                                                 args.gamma)
                update_steps[n_updates % LOG_EVERY] = step
                n_updates += 1
                if n_updates % LOG_EVERY == 0:
                    stats = update_stats.cpu().numpy()  # sync point: once per LOG_EVERY updates
                    if not np.isfinite(stats).all():
                        bad_step = update_steps[int(np.flatnonzero(~np.isfinite(stats).all(axis=1))[0])]
                        save_checkpoint(checkpoint_path, {**training_state(), **good_state})
                        writer.close()
                        print(f"error: non-finite TD loss or Q-values at env step {bad_step}; the last good state "
                              f"(step {good_state['global_step']}) is saved in {checkpoint_path}; lower "
                              "--learning-rate or check the rewards", file=sys.stderr)
                        raise SystemExit(1)
                    good_state = copy.deepcopy(good_fields())
                    writer.add_scalar("losses/td_loss", stats[:, 0].mean(), step)
                    writer.add_scalar("losses/q_values", stats[:, 1].mean(), step)
                    sps = int((global_step - start_step) / (time.time() - start_time))
                    writer.add_scalar("charts/SPS", sps, step)
                    writer.add_scalar("charts/epsilon", epsilon, step)
            if step % args.target_network_frequency == 0:
                update_target(target_network, q_network, args.tau)
                n_target_syncs += 1

        done_training = global_step >= args.total_timesteps
        if crossed(global_step, args.num_envs, args.eval_frequency) or done_training:
            video_path = None
            if args.capture_video:
                os.makedirs(os.path.join(run_dir, "videos"), exist_ok=True)
                video_path = os.path.join(run_dir, "videos", f"eval_step{global_step}.mp4")
            returns = evaluate(q_network, args.env_id, args.eval_episodes, args.eval_epsilon,
                               args.seed + 1_000_000 + global_step, device, video_path,
                               stop=lambda: bool(stop_signal))
            if stop_signal:  # a signal cut the evaluation short: stop without logging it
                break
            writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
            print(("\n" if is_tty else "")
                  + f"step {global_step}: eval return {returns.mean():.2f} +- {returns.std():.2f}")
            if returns.mean() > best_eval:
                best_eval = float(returns.mean())
                save_model(os.path.join(run_dir, "best_model.pt"))
            if args.goal_score is not None and returns.mean() >= args.goal_score:
                print(f"goal reached: eval mean {returns.mean():.2f} >= {args.goal_score} at step {global_step} "
                      f"after {time.time() - start_time:.1f}s")
                break
        if crossed(global_step, args.num_envs, args.checkpoint_frequency):
            save_checkpoint(checkpoint_path, training_state())
        if is_tty and time.time() - last_print > 0.5:
            last_print = time.time()
            sps = (global_step - start_step) / (last_print - start_time)
            recent = f"{np.mean(recent_returns):.1f}" if recent_returns else "-"
            print(f"\r{global_step:>9,}/{args.total_timesteps:,} steps | {sps:,.0f} SPS | "
                  f"ETA {(args.total_timesteps - global_step) / max(sps, 1e-9) / 60:.1f} min | "
                  f"return(10) {recent} | eps {epsilon:.3f}   ", end="", file=sys.stderr, flush=True)

    envs.close()
    for signum, handler in previous_handlers.items():
        signal.signal(signum, handler)
    if is_tty:
        print(file=sys.stderr)
    save_checkpoint(checkpoint_path, training_state())
    if args.save_model:  # as CleanRL writes it: a bare q_network.state_dict(), which its QNetwork and dqn_eval load
        model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        save_checkpoint(model_path, q_network.state_dict())
        print(f"model saved to {model_path}")
    writer.close()
    print(f"finished {run_name}: {global_step} steps, {n_updates} gradient updates, {n_target_syncs} target syncs "
          f"in {time.time() - start_time:.1f}s; best eval return {best_eval:.2f}")
    if stop_signal:
        print(f"stopped by signal {stop_signal[0]} at step {global_step}; resume with --resume {checkpoint_path}",
              file=sys.stderr)
        raise SystemExit(128 + stop_signal[0])


if __name__ == "__main__":
    main(tyro.cli(Args))
