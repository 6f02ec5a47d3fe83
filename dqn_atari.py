"""Nature DQN on Atari through ale-py 0.12's native vector env, with a frame-deduplicated replay memory.

Mnih et al. 2015, "Human-level control through deep reinforcement learning" (Nature 518; preprint arXiv:1312.5602):
the Nature CNN, epsilon-greedy acting, replay memory, a target network synced every C steps, and the preprocessing of
its Methods section (30 no-op starts, frameskip 4 with max-pooling, 84x84 grayscale, stack of 4, rewards clipped to
their sign, a life loss terminal for bootstrapping). v5 ids add sticky actions (Machado et al. 2018, arXiv:1709.06009).

    python dqn_atari.py --env-id BreakoutNoFrameskip-v4

Defaults are CleanRL's published dqn_atari.py configuration, which departs from the paper in: Adam (lr 1e-4) instead
of RMSProp, MSE instead of the clipped error, 10M steps, learning starts at 80k, epsilon 1 -> 0.01 over 10% of the
run. As in CleanRL, a lost life is followed by a serve that the learner never sees: CleanRL hides NOOP, FIRE and
action 2 inside a reset (its FireResetEnv sits outside its EpisodicLifeEnv; ale-py alone serves only at reset); here
the step after a lost life plays FIRE (NOOP in games without it), is not stored as a transition, and starts the new
life's frame stack, as a reset starts a game's. The logged return is the full-game, unclipped score (CleanRL's
RecordEpisodeStatistics wraps the raw env). Departures from CleanRL: 8 envs step in parallel (CleanRL: 1; updates stay
one per 4 env steps, target syncs every 1000 env steps) and they step in ale-py's threads while the learner trains
(when a core is free for them), so an update sees the buffer up to the previous vector step; replay stores every frame
once and rebuilds the stacks when sampling (7.07 KB per transition instead of 28.2 KB); the serve is one counted env
step, and a restarted stack is zero-padded, [0, 0, 0, f], as ale-py and SB3 pad at reset (CleanRL repeats f four
times); evaluation is separate: full games, epsilon 0.05, as in the paper. Until this serve was hidden and the stack
restarted, this script took off 25-50k env steps later than its peers on Breakout (benchmarks/RESULTS.md section 12).
On a GPU, --cudagraphs replays each update as one CUDA graph (opt-in, not yet measured: README, GPU notes).
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
import warnings
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
from ale_py.vector_env import AtariVectorEnv
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
    checkpoint_frequency: int = 500_000
    """write runs/{run_name}/checkpoint.pt every this many env steps (0: only on stop or completion)"""
    checkpoint_buffer: bool = False
    """also put the replay buffer in checkpoints (about 7 GB at 1M); without it a resumed run refills it first"""
    resume: Optional[str] = None
    """continue training from this checkpoint.pt (model, target, optimizer, step, RNG states, buffer if saved)"""
    play: Optional[str] = None
    """instead of training, load this model or checkpoint and evaluate it for --eval-episodes episodes"""

    # Algorithm specific arguments
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of the environment: XNoFrameskip-v4 (no sticky actions) or ALE/X-v5 (sticky actions 0.25)"""
    total_timesteps: int = 10_000_000
    """total env steps (agent steps, 4 frames each) of the experiment"""
    num_envs: int = 8
    """the number of parallel game environments (ale-py threads); updates stay one per train_frequency env steps"""
    learning_rate: float = 1e-4
    """the learning rate of the optimizer"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (transitions, over all envs)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 1.0
    """the target network update rate (1.0: hard copy)"""
    target_network_frequency: int = 1_000
    """the frequency (in env steps) of target network updates"""
    batch_size: int = 32
    """the batch size of sample from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
    exploration_fraction: float = 0.10
    """the fraction of `total-timesteps` it takes from start-e to go end-e"""
    learning_starts: int = 80_000
    """env step to start learning"""
    train_frequency: int = 4
    """the frequency (in env steps) of gradient updates"""
    max_episode_frames: int = 108_000
    """episodes are truncated (and bootstrapped) after this many frames: 30 minutes of play"""
    eval_frequency: int = 250_000
    """evaluate every this many env steps (0: only at the end)"""
    eval_episodes: int = 10
    """the number of evaluation episodes (full games, played in parallel)"""
    eval_epsilon: float = 0.05
    """the epsilon of the evaluation policy (Mnih et al. 2015: 0.05)"""
    channels_last: bool = True
    """keep conv weights channels-last (NHWC), which CPU convolution kernels run faster; same results up to rounding"""
    cudagraphs: bool = False
    """on a GPU, capture each update (forward, backward, Adam) in a CUDA graph: opt-in until measured faster"""
    compile: bool = False
    """on a GPU, torch.compile the networks (before any capture): opt-in until measured faster"""


STACK = 4  # frames per observation
FRAME_BYTES = 84 * 84  # one uint8 grayscale frame
LOG_EVERY = 100  # gradient updates between loss/Q logs and non-finite checks (each is one CPU-GPU sync)
HELD_OUT = 512  # transitions kept aside at learning start for DeepMind's average max-Q and TD-error curves
CANDIDATES = 8  # uniform sampling draws this many slots per batch row and keeps the first that is a transition
HORIZON = 1  # env steps a transition's return spans: the TD target bootstraps this many steps ahead (n-step: > 1)
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")
ENV_BYTES = 2 * 2**20  # host RAM of one ale-py emulator with its frame buffers (1.3 to 1.9 MB each, 8 to 256 envs)


def atari_game(env_id: str) -> tuple[str, float]:
    """Maps a gymnasium id to (ALE game, sticky-action probability): XNoFrameskip-v4 -> 0.0, ALE/X-v5 -> 0.25."""
    gym.register_envs(ale_py)
    supported = [k for k in gym.registry if "-ram" not in k and (
        k.endswith("NoFrameskip-v4") or (k.startswith("ALE/") and k.endswith("-v5")))]
    if env_id not in supported:
        matches = difflib.get_close_matches(env_id, supported, n=3, cutoff=0.5)
        fail(f"--env-id {env_id!r} is not an Atari id this script supports (XNoFrameskip-v4 or ALE/X-v5); "
             f"close matches: {', '.join(matches) or 'none'}")
    kwargs = gym.spec(env_id).kwargs
    return kwargs["game"], kwargs["repeat_action_probability"]


def make_env(game: str, num_envs: int, sticky: float, max_frames: int, train: bool, rgb: bool = False):
    """ale-py's C++ vector env with Nature preprocessing, rewards unclipped (the learner clips, logs see the score).

    train=True: a life loss is `terminated` (no bootstrapping) but the game goes on, as CleanRL's EpisodicLifeEnv;
    ale-py's own episodic_life would restart the game at every life loss. train=False: full games, for evaluation.
    rgb=True gives full-size colour frames of the same emulator trajectory, for videos.
    """
    image = dict(grayscale=False, img_height=210, img_width=160, stack_num=1) if rgb else {}
    return AtariVectorEnv(game, num_envs, repeat_action_probability=sticky, max_num_frames_per_episode=max_frames,
                          frameskip=4, maxpool=True, noop_max=30, use_fire_reset=True, episodic_life=False,
                          life_loss_info=train, reward_clipping=False, **image)


class Games:
    """Where each env's game ends and when to serve, by ale-py's own rules; one per vector env, updated every step.

    ale-py resets a game on the step after its game over (NEXT_STEP autoreset). With life_loss_info it reports
    `terminated` at every life loss too, and when a life loss falls on the step that reaches the frame cap it reports
    only `terminated` (lives > 0), yet resets. So a life is lost when the lives went down and are still > 0 before the
    cap; any other termination, a truncation or the cap reached is a game over (games whose lives never change, e.g.
    Adventure, end at their first termination). A game over that this rule cannot tell from a life loss (lives down
    but above 0 on the step a game ends) is caught at its reset step, where the frame counter goes back. ale-py
    presses FIRE only at reset; CleanRL's FireResetEnv serves after every lost life too, so the step after a life
    loss plays a serve: FIRE in games whose action set has it, else NOOP (CleanRL's EpisodicLifeEnv steps NOOP when
    it hides a life loss inside a reset). As the peers' resets do, the serve's obs starts the new life: its step is
    not a transition, and the stacks that follow restart from its frame, zero-padded as ale-py pads a new game's.
    """

    def __init__(self, envs: AtariVectorEnv, infos: dict, max_frames: int):
        action_set = list(envs.ale.get_action_set())
        serve = ale_py.Action.FIRE if ale_py.Action.FIRE in action_set else ale_py.Action.NOOP
        self.serve_action = action_set.index(serve)
        self.max_frames = max_frames
        self.lives = infos["lives"].copy()
        self.frames = infos["episode_frame_number"].copy()
        self.start = self.frames.copy()  # the frame cap counts from the frame a game starts at (after its no-ops)
        self.reset_next = np.zeros(len(self.lives), dtype=bool)  # the next step is a reset step (a game ended)
        self.reset_step = np.zeros(len(self.lives), dtype=bool)  # the last step was a reset step: not a transition
        self.missed = np.zeros(len(self.lives), dtype=bool)  # ... whose game over the last step did not report
        self.ended = np.zeros(len(self.lives), dtype=bool)  # a game's score is complete: game over or missed
        self.length = np.zeros(len(self.lives), dtype=np.int64)  # frames played in the game, counted as the cap is
        self.serve = np.zeros(len(self.lives), dtype=bool)  # the next step is the first after a life loss
        self.starts = np.ones(len(self.lives), dtype=bool)  # the last step's obs starts a game or a life
        self.age = np.zeros(len(self.lives), dtype=np.int64)  # steps since that start, up to STACK - 1

    def act(self, actions: np.ndarray) -> np.ndarray:
        """The actions to execute: the serve where a life was just lost, the agent's elsewhere."""
        return np.where(self.serve, self.serve_action, actions)

    def stack(self, obs: np.ndarray) -> np.ndarray:
        """The obs to act on, (N, 4, 84, 84): the env's stack with the frames from before its game's or life's start
        zeroed (a no-op except within STACK - 1 steps of a serve), the stack the replay rebuilds for that step."""
        keep = np.arange(STACK) >= STACK - 1 - self.age[:, None]  # (N, 4)
        return obs * keep[:, :, None, None]

    def step(self, terminations: np.ndarray, truncations: np.ndarray, infos: dict) -> np.ndarray:
        """Takes a step's flags; returns where a game ended on it (its env's next step is the reset step). Then
        `reset_step` marks the reset steps, `missed` those that ended a game the last step did not report, `ended`
        where a game's score is complete (a game over now, or a missed one), `length` that game's frames, and `starts`
        the steps whose obs starts a game (a reset step) or a life (the serve): not transitions."""
        lives, frames = infos["lives"], infos["episode_frame_number"]
        self.reset_step = self.reset_next | (frames < self.frames)  # reset() restarts the frame counter
        self.missed = self.reset_step & ~self.reset_next
        self.length = np.where(self.missed, self.frames - self.start, frames - self.start)
        self.start = np.where(self.reset_step, frames, self.start)  # a reset step's obs is the new game's first
        capped = frames - self.start >= self.max_frames
        life_lost = (lives < self.lives) & (lives > 0) & ~capped
        game_over = ~self.reset_step & (truncations | (terminations & ~life_lost) | capped)
        self.starts = self.reset_step | self.serve  # self.serve: this step was the serve
        self.age = np.where(self.starts, 0, np.minimum(self.age + 1, STACK - 1))
        self.serve = ~self.reset_step & life_lost
        self.lives, self.frames, self.reset_next = lives.copy(), frames.copy(), game_over
        self.ended = game_over | self.missed
        return game_over


def env_seed(seed: int, num_envs: int) -> int:
    """A reset seed ale-py accepts for num_envs envs: it seeds env i with seed + i as a C++ int32, so a run seed plus
    an offset (the step, the evaluation's) is folded into [0, 2^31 - num_envs); seeds below that are unchanged."""
    return seed % (2**31 - num_envs)


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
        q_values = q_network(torch.from_numpy(obs).to(device))  # (N, n_actions)
    return np.where(explore, actions, q_values.argmax(dim=1).cpu().numpy())  # sync point: the env needs host actions


def passed_multiple(frequency: int, global_step: int, num_envs: int) -> bool:
    """Whether the last vector step (num_envs env steps, ending at global_step) passed a multiple of `frequency`
    (0: never): periodic work keeps its schedule whatever num_envs is."""
    return frequency > 0 and global_step // frequency > (global_step - num_envs) // frequency


class QNetwork(nn.Module):
    """The Nature CNN (Mnih et al. 2015, Methods: 'Model architecture')."""

    def __init__(self, n_actions: int):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(STACK, 32, 8, stride=4), nn.ReLU(),  # (B, 32, 20, 20)
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),  # (B, 64, 9, 9)
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),  # (B, 64, 7, 7)
            nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, n_actions),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x / 255.0)  # (B, 4, 84, 84) uint8 -> (B, n_actions); frames stay uint8 until here


def td_terms(q_network: nn.Module, target_network: nn.Module,
             data: "Batch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one TD computation, for learning and for the held-out curves: the TD target y (B,), Q(s, .) (B, A) and
    Q(s, a) (B,) of the actions taken."""
    td_target = compute_td_target(target_network, data.rewards, data.next_observations, data.dones, data.discounts)
    q_values = q_network(data.observations)  # (B, n_actions)
    return td_target, q_values, q_values.gather(1, data.actions[:, None]).squeeze(1)


def compute_td_target(target_network: nn.Module, rewards: torch.Tensor, next_observations: torch.Tensor,
                      dones: torch.Tensor, discounts: torch.Tensor) -> torch.Tensor:
    """y = r + gamma * max_a' Q_target(s', a'), cut at a termination or life loss (Mnih et al. 2015, Alg. 1); r is
    clipped in the replay, gamma is the batch's discount (gamma^k for a k-step return)."""
    with torch.no_grad():
        target_max = target_network(next_observations).max(dim=1).values  # (B,)
        return rewards + discounts * target_max * (1 - dones)


def make_network(n_actions: int, device: torch.device, args: Args) -> QNetwork:
    """The Q-network on its device, conv weights channels-last if asked (faster CPU kernels): training and --play."""
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    return QNetwork(n_actions).to(device, memory_format=memory_format)


def make_optimizer(q_network: nn.Module, args: Args) -> torch.optim.Optimizer:
    """Adam (CleanRL's choice over the papers' RMSProp), fused: one kernel for all parameters."""
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


def make_learner(run: "RunState", rb: "ReplayBuffer", args: Args, graphs: bool) -> Callable[[], torch.Tensor]:
    """One update: sample a batch, train_step on it; returns its (td_loss, mean Q). With `graphs` (--cudagraphs on a
    GPU that holds the replay) train_step is captured in a CUDA graph at the first update and replayed after each new
    batch is copied into the graph's inputs: one launch for the forward, backward and Adam instead of about a hundred
    kernels. Sampling stays eager (its bounds are host ints that change every step; its kernels are queued, never
    waited for)."""
    def update(data: Batch) -> torch.Tensor:
        return train_step(run.q_network, run.target_network, run.optimizer, data)

    if not graphs:
        return lambda: update(rb.sample(args.batch_size))
    graph, static = torch.cuda.CUDAGraph(), {}

    def replay() -> torch.Tensor:
        data = rb.sample(args.batch_size)
        if not static:  # captured at the first update, whose batch gives the shapes
            static["batch"] = Batch(*(t.clone() for t in data))
            static["stats"] = capture(graph, lambda: update(static["batch"]), run, keep=[])
        for graph_input, value in zip(static["batch"], data):
            graph_input.copy_(value, non_blocking=True)
        graph.replay()
        return static["stats"]  # overwritten by the next replay: Log.update copies it
    return replay


def capture(graph: "torch.cuda.CUDAGraph", update: Callable[[], torch.Tensor], run: "RunState",
            keep: list[torch.Tensor]) -> torch.Tensor:
    """Records update() into `graph`. Capture needs a few eager updates first (Adam's state, library workspaces);
    they leave no trace: the weights, Adam's state, the tensors in `keep` and the CUDA RNG are restored in place, where
    the graph reads them."""
    before = {id(t): (t, t.clone()) for t in [*run.q_network.parameters(), *run.optimizer_tensors(), *keep]}
    rng, side = torch.cuda.get_rng_state(), torch.cuda.Stream()

    def undo_warm_up() -> None:
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for v in (v for v in run.optimizer_tensors() if id(v) not in before):
                v.zero_()  # Adam's moments and step created by the warm-up: as a fresh Adam has them
            for t, saved in before.values():
                t.copy_(saved)
        torch.cuda.set_rng_state(rng)  # the first replay draws what an eager first update would

    for group in run.optimizer.param_groups:
        group["capturable"] = True  # read when step() is captured, not when it replays: checkpoints keep False
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Adam: "capturable=True but step() is running without graph capture"
            for _ in range(3):
                update()
        undo_warm_up()
        run.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's memory pool
        with torch.cuda.graph(graph):  # records, runs nothing: the first replay is the first update
            stats = update()
    except BaseException:
        undo_warm_up()  # a crash checkpoint holds the state from before the warm-up
        raise
    finally:
        for group in run.optimizer.param_groups:
            group["capturable"] = False
    return stats


class Batch(NamedTuple):
    observations: torch.Tensor  # (B, 4, 84, 84) uint8
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32, clipped to their sign: the return of the transition's HORIZON steps
    next_observations: torch.Tensor  # (B, 4, 84, 84) uint8: the stack the TD target bootstraps from
    dones: torch.Tensor  # (B,) float32: termination or life loss (a truncation bootstraps)
    discounts: torch.Tensor  # (B,) float32: gamma^k for a bootstrap k env steps ahead (gamma at HORIZON 1)
    indices: torch.Tensor  # (B,) int64 slot: env * per-env capacity + position, on the replay's storage device


class ReplayBuffer:
    """Frame-deduplicated replay: each env's stream stores every 84x84 frame once, stacks are rebuilt when sampling.

    Slot (env, p) holds the newest frame of the obs the env returned at one step, and that step's action, reward
    (clipped to its sign, as the learner uses it; the logged scores keep the raw ones), termination (a life loss
    included), truncation, and `firsts`: the first frame of a game or a life (a reset step, a serve), not a transition.
    The transition in slot p starts from the stack ending at p-1 and spans the HORIZON steps p .. p+HORIZON-1
    (Dopamine's update_horizon; 1 here); a frame older than a first within a stack belongs to the previous game or
    life and is zeroed, as the env pads at reset.
    Memory: 84*84 + 8 + 4 + 3 = 7071 bytes per transition, 7.07 GB at 1M (stacked obs and next obs would take 56 KB).
    """

    FIELDS = ("frames", "actions", "rewards", "terminations", "truncations", "firsts")  # one value per slot each

    def __init__(self, capacity: int, num_envs: int, storage: torch.device, device: torch.device, gamma: float):
        self.per_env = self.slots_per_env(capacity, num_envs)
        self.num_envs, self.storage, self.device, self.gamma = num_envs, storage, device, gamma
        # not pinned: the pinned allocator would round 7.07 GB up to about 8.6 GB, and gather() pins each batch anyway
        slots = (num_envs, self.per_env)
        self.frames = torch.zeros((*slots, 84, 84), dtype=torch.uint8, device=storage)
        self.actions = torch.zeros(slots, dtype=torch.int64, device=storage)
        self.rewards = torch.zeros(slots, dtype=torch.float32, device=storage)
        self.terminations = torch.zeros(slots, dtype=torch.bool, device=storage)
        self.truncations = torch.zeros(slots, dtype=torch.bool, device=storage)
        self.firsts = torch.ones(slots, dtype=torch.bool, device=storage)  # a slot not yet written is no transition
        self.pos, self.count = 0, 0  # the next slot written, and how many slots per env hold data
        # a slot known to hold a sampleable transition (host ints: no sync), as of each of the last HORIZON adds
        self.newest_transitions = [(0, 0)] * HORIZON

    @staticmethod
    def slots_per_env(capacity: int, num_envs: int) -> int:
        """ceil(capacity / num_envs), so the buffer never holds less than asked; at least a stack and a transition
        (plus one) per env."""
        return max(-(-capacity // num_envs), STACK + HORIZON + 1)

    @staticmethod
    def bytes_needed(capacity: int, num_envs: int) -> int:
        return num_envs * ReplayBuffer.slots_per_env(capacity, num_envs) * (FRAME_BYTES + 8 + 4 + 3)

    def add(self, frames: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminations: np.ndarray,
            truncations: np.ndarray, firsts: np.ndarray) -> None:
        """One slot per env: frames (N, 84, 84) uint8, the newest frame of each env's obs; the rest (N,)."""
        rewards = np.sign(rewards).astype(np.float32)  # clipped once, here (Mnih et al. 2015, Methods)
        for name, values in zip(self.FIELDS, (frames, actions, rewards, terminations, truncations, firsts)):
            getattr(self, name)[:, self.pos] = torch.from_numpy(values).to(self.storage, non_blocking=True)
        newest = (int(np.argmin(firsts)), self.pos) if not firsts.all() else self.newest_transitions[-1]
        self.newest_transitions = self.newest_transitions[1:] + [newest]
        self.pos = (self.pos + 1) % self.per_env
        self.count = min(self.count + 1, self.per_env)

    def __len__(self) -> int:
        return self.count * self.num_envs

    def sample(self, batch_size: int) -> Batch:
        """Uniform over sampleable transitions, without a host sync: CANDIDATES slots per row, the first valid kept."""
        full = self.count == self.per_env
        oldest, lowest_age = (self.pos, STACK) if full else (0, 1)  # an older slot lacks the frames of its obs
        env = torch.randint(self.num_envs, (batch_size, CANDIDATES), device=self.storage)
        # the newest HORIZON - 1 slots still lack steps of their return
        age = torch.randint(lowest_age, self.count - HORIZON + 1, (batch_size, CANDIDATES), device=self.storage)
        pos = (oldest + age) % self.per_env
        ok = ~self.firsts[env, pos]  # not the first frame of a game or a life
        pick = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first valid candidate
        env, pos = env.gather(1, pick).squeeze(1), pos.gather(1, pick).squeeze(1)
        # all CANDIDATES invalid has probability (share of first slots)^8; fall back to a known transition
        none_ok = ~ok.any(dim=1)
        fallback_env, fallback_pos = self.newest_transitions[0]  # its HORIZON steps are all stored
        env = torch.where(none_ok, fallback_env, env)
        pos = torch.where(none_ok, fallback_pos, pos)
        return self.gather(env * self.per_env + pos)

    def gather(self, indices: torch.Tensor) -> Batch:
        """Rebuilds the transitions in slots `indices` (B,) from one window of STACK + HORIZON slots each: obs is the
        stack ending at p-1, the return and the next obs come from the steps p .. p+HORIZON-1."""
        env, pos = indices // self.per_env, indices % self.per_env
        window = (pos[:, None] + torch.arange(-STACK, HORIZON, device=self.storage)) % self.per_env  # (B, 4 + H)
        env = env[:, None]
        fields = (self.frames[env, window], self.firsts[env, window], self.actions[env, window[:, STACK:]],
                  self.rewards[env, window[:, STACK:]], self.terminations[env, window[:, STACK:]],
                  self.truncations[env, window[:, STACK:]])
        if self.storage.type != self.device.type:  # host storage -> GPU: pinned, so the copy does not block the host
            fields = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in fields)
        frames, firsts, actions, rewards, terminations, truncations = fields  # (B, 4 + H, 84, 84), (B, 4 + H), (B, H)
        # the return of steps p .. p+HORIZON-1, with the bootstrap from the stack after the last step it counts (here
        # the one step p; an n-step fork sums discounted rewards and stops at a termination, truncation or first)
        last = torch.zeros_like(indices, device=self.device)  # (B,) the last step counted, 0 .. HORIZON - 1
        returns, dones = rewards[:, 0], terminations[:, 0].float()
        discounts = torch.full_like(returns, self.gamma)  # gamma^(last + 1)
        rows = torch.arange(len(indices), device=self.device)[:, None]
        next_window = last[:, None] + 1 + torch.arange(STACK, device=self.device)  # (B, 4): its positions in window
        return Batch(stack(frames[:, :STACK], firsts[:, :STACK]), actions[:, 0], returns,
                     stack(frames[rows, next_window], firsts[rows, next_window]), dones, discounts, indices)

    def state_dict(self) -> dict:
        return {**{name: getattr(self, name).cpu() for name in self.FIELDS}, "pos": self.pos, "count": self.count,
                "newest_transitions": self.newest_transitions}

    def load_state_dict(self, state: dict) -> None:
        if any(name not in state for name in self.FIELDS):
            fail(f"the checkpoint's replay buffer lacks fields of this script's ({', '.join(self.FIELDS)}): it was "
                 "written by an earlier version; start a new run")
        if state["frames"].shape != self.frames.shape:
            fail(f"the checkpoint's replay buffer has shape {tuple(state['frames'].shape)}, not "
                 f"{tuple(self.frames.shape)}; resume with the same --buffer-size and --num-envs")
        for name in self.FIELDS:
            getattr(self, name).copy_(state[name])
        self.pos, self.count = state["pos"], state["count"]
        self.newest_transitions = [tuple(slot) for slot in state["newest_transitions"]]


def stack(frames: torch.Tensor, firsts: torch.Tensor) -> torch.Tensor:
    """A stack (B, 4, 84, 84) with the frames older than its newest first (B, 4) zeroed: they belong to an earlier
    game or life, and the env pads a new game's first stack with zeros the same way."""
    later_first = firsts[:, 1:].flip(1).cummax(dim=1).values.flip(1)  # (B, 3): a first among the frames after m
    keep = torch.cat([~later_first, torch.ones_like(firsts[:, :1])], dim=1)  # (B, 4)
    return frames * keep[:, :, None, None]


def evaluate(q_network: nn.Module, game: str, sticky: float, max_frames: int, episodes: int, epsilon: float,
             seed: int, device: torch.device, video_path: Optional[str] = None,
             stop: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, np.ndarray]:
    """Plays `episodes` full games at once, one per env (so long games are not under-counted); returns their scores
    and lengths in frames.

    The video comes from a second, colour env that replays game 0 in lockstep: same seed, same actions.
    `stop()` true ends the evaluation early (a signal arrived); the scores are then incomplete.
    """
    envs = make_env(game, episodes, sticky, max_frames, train=False)
    video_env = make_env(game, 1, sticky, max_frames, train=False, rgb=True) if video_path else None
    seed = env_seed(seed, episodes)
    rng = np.random.default_rng(seed)
    obs, infos = envs.reset(seed=seed)
    games = Games(envs, infos, max_frames)
    frames = [video_env.reset(seed=seed)[0][0, 0]] if video_env else []
    returns, lengths, finished = np.zeros(episodes), np.zeros(episodes), np.zeros(episodes, dtype=bool)
    video_in_sync = True
    while not finished.all() and not stop():
        actions = games.act(epsilon_greedy(q_network, obs, epsilon, envs.single_action_space.n, rng, device))
        obs, rewards, terminations, truncations, infos = envs.step(actions)
        if video_env and not finished[0]:
            video_obs, video_rewards, *_ = video_env.step(actions[:1])
            frames.append(video_obs[0, 0])
            video_in_sync &= bool(video_rewards[0] == rewards[0])
        returns += rewards * ~finished  # an env that already finished has autoreset: ignore its new game
        games.step(terminations, truncations, infos)
        obs = games.stack(obs)  # a new life's stack restarts from the serve's frame, as in training
        ended = games.ended & ~finished
        lengths[ended] = games.length[ended]
        finished |= ended
    envs.close()
    if video_env:
        video_env.close()
        write_video(video_path, frames)
        if not video_in_sync:
            print(f"warning: the video env left the evaluated game's trajectory; {video_path} may differ",
                  file=sys.stderr)
    return returns, lengths


def held_out_stats(q_network: nn.Module, target_network: nn.Module, held_out: "Batch") -> tuple[float, float]:
    """Mnih et al. 2015, Fig. 2: the average max Q over held-out states, and their mean |TD error|."""
    with torch.inference_mode():
        td_target, q_values, q_taken = td_terms(q_network, target_network, held_out)
        return q_values.max(dim=1).values.mean().item(), (td_target - q_taken).abs().mean().item()  # sync point


class RunState:
    """Everything of a run that outlives a step and a checkpoint restores, except the replay: networks, optimizer,
    the exploration RNG, counters, the held-out transitions and the best and last evaluation returns."""

    def __init__(self, args: Args, n_actions: int, device: torch.device):
        self.q_network = make_network(n_actions, device, args)
        self.optimizer = make_optimizer(self.q_network, args)
        self.target_network = make_network(n_actions, device, args)
        self.target_network.load_state_dict(self.q_network.state_dict())
        self.rng = np.random.default_rng(args.seed)  # exploration
        self.n_actions, self.device = n_actions, device
        self.global_step, self.n_updates, self.n_target_syncs = 0, 0, 0
        self.best_eval, self.last_eval = -float("inf"), None
        self.eval_due = False  # an evaluation is owed at global_step (set after the step; a signal may cut it short)
        self.held_out: Optional[Batch] = None  # DeepMind's held-out transitions, drawn when learning starts
        self.learning_from = 0  # no update before this step (a resumed run with an empty buffer refills it first)
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
                "held_out": None if self.held_out is None else {k: t.cpu() for k, t in self.held_out._asdict().items()},
                "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}

    def load_state_dict(self, state: dict, path: str) -> None:
        load_weights(self.q_network, state["model"], path)
        load_weights(self.target_network, state["target_model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step, self.n_updates = state["global_step"], state["n_updates"]
        self.n_target_syncs, self.best_eval, self.last_eval = (state["n_target_syncs"], state["best_eval"],
                                                                state["last_eval"])
        self.eval_due = state["eval_due"]
        if state["held_out"] is not None:
            self.held_out = Batch(**{k: t.to(self.device) for k, t in state["held_out"].items()})
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def main(args: Args) -> None:
    validate_args(args)
    with StopOnSignal() as stop:  # until stop.arm(), a signal ends the process at once: nothing is written before it
        game, sticky = atari_game(args.env_id)
        n_actions = count_actions(game, sticky, args.max_episode_frames)
        checkpoint = load_checkpoint(args.resume, args.env_id, n_actions) if args.resume else None
        device = pick_device(args)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        check_emulator_memory(args)
        if args.play:
            return play(args, game, sticky, n_actions, device)
        storage = replay_storage(args, device)
        files = RunFiles(args, checkpoint)

        # ALGO LOGIC: initialize agent here:
        run = RunState(args, n_actions, device)
        if checkpoint:
            restore(run, checkpoint, args)
        graphs = gpu_speedups(args, run, storage)  # --compile applied; whether --cudagraphs applies
        # the replay buffer and the envs come last: they are the slow part of the start, after the checks above
        rb = ReplayBuffer(args.buffer_size, args.num_envs, storage, device, args.gamma)
        print(f"replay: {ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs) / 1e9:.2f} GB on {storage}, "
              f"learner on {device}" + ", each update one CUDA graph" * graphs, flush=True)
        if checkpoint and checkpoint["replay_buffer"] is not None:
            rb.load_state_dict(checkpoint["replay_buffer"])
        learn = make_learner(run, rb, args, graphs)
        envs = make_env(game, args.num_envs, sticky, args.max_episode_frames, train=True)
        # the envs step in ale-py's threads beside the learner when a core is free for them; beside a CPU learner that
        # uses every core they only contend with its threads (up to 7% fewer SPS on 2 cores: RESULTS.md s. 13)
        overlap = device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()
        files.create()  # the run folder, locked by this process until it ends
        log = Log(args, files, run, resumed=checkpoint is not None)
        # from here on a signal stops the loop cleanly, and a crash still leaves a checkpoint and summary.json
        stop.arm(on_crash=lambda error: end_run(run, rb, log, f"error: {type(error).__name__}: {error}"))

        obs, infos = envs.reset(seed=env_seed(args.seed + run.global_step, args.num_envs))
        games = Games(envs, infos, args.max_episode_frames)
        # each env's stream starts with the first frame of its game: a slot that is not a transition
        rb.add(obs[:, -1], *np.zeros((4, args.num_envs)), firsts=np.ones(args.num_envs, dtype=bool))
        run.last_finite = copy.deepcopy(run.learner_state())
        while not stop:
            if run.eval_due:  # the step that passed a multiple of eval_frequency, the last one, or an owed evaluation
                if not run.finite():  # sync point: a non-finite network is neither evaluated nor saved
                    end_run(run, rb, log, f"non-finite weights at step {run.global_step}")
                started = time.time()
                returns, _ = evaluate(run.q_network, game, sticky, args.max_episode_frames, args.eval_episodes,
                                      args.eval_epsilon, args.seed + 1_000_000 + run.global_step, device,
                                      files.eval_video(run.global_step), stop=lambda: bool(stop))
                if stop:  # a signal cut the evaluation short: it stays due, and a resumed run does it first
                    break
                held_out = (held_out_stats(run.q_network, run.target_network, run.held_out)
                            if run.held_out is not None else None)
                log.evaluation(returns, held_out, time.time() - started)
                run.last_eval, run.eval_due = float(returns.mean()), False
                if run.last_eval > run.best_eval:
                    run.best_eval = run.last_eval
                    files.save_model("best_model.pt", run)
            if run.global_step >= args.total_timesteps:
                break
            # ALGO LOGIC: epsilon-greedy action (Mnih et al. 2015, Alg. 1)
            epsilon = linear_schedule(args.start_e, args.end_e, int(args.exploration_fraction * args.total_timesteps),
                                      run.global_step)
            # the serve after a life loss (FIRE or NOOP) replaces the agent's action: a new life's first step
            actions = games.act(epsilon_greedy(run.q_network, obs, epsilon, n_actions, run.rng, device))

            # TRY NOT TO MODIFY: the envs step in ale-py's threads, while the learner trains below if `overlap`
            envs.send(actions)
            stepped = None if overlap else envs.recv()  # no core to spare: they step first, alone
            run.global_step += args.num_envs

            # ALGO LOGIC: training. Visit every env step this vector step covered, so that updates per env step stay
            # 1/train_frequency and target syncs every target_network_frequency steps whatever num_envs is.
            for step in range(run.global_step - args.num_envs + 1, run.global_step + 1):
                if step <= args.learning_starts or step <= run.learning_from:
                    continue
                if run.held_out is None:  # DeepMind's held-out states, drawn once from the (random-policy) warm-up
                    run.held_out = rb.sample(HELD_OUT)
                if step % args.train_frequency == 0:
                    log.update(learn(), step)  # sample a batch, one gradient step on it
                    run.n_updates += 1
                    if run.n_updates % LOG_EVERY == 0:
                        bad_step = log.read_updates(step, epsilon)  # sync point: once per LOG_EVERY updates
                        if bad_step is not None:
                            end_run(run, rb, log, f"non-finite loss at step {bad_step}")
                        run.last_finite = copy.deepcopy(run.learner_state())
                if step % args.target_network_frequency == 0:
                    update_target(run.target_network, run.q_network, args.tau)
                    run.n_target_syncs += 1

            next_obs, rewards, terminations, truncations, infos = stepped or envs.recv()
            games.step(terminations, truncations, infos)  # terminated alone may be a life loss
            # a game's score counts every step but its reset step (action ignored, reward 0, obs = the new game's
            # first); a missed game over ends its game at its reset step
            log.games(rewards, ~games.reset_step, games.ended)
            # a game's or a life's first obs (the reset step, the serve) is not a transition: its slot starts the
            # stacks after it. A life loss is a termination; a truncation bootstraps from its real final frame
            rb.add(next_obs[:, -1], actions, rewards, terminations, truncations, firsts=games.starts)
            obs = games.stack(next_obs)  # the stack the replay rebuilds: restarted at the serve after a lost life

            run.eval_due = (passed_multiple(args.eval_frequency, run.global_step, args.num_envs)
                            or run.global_step >= args.total_timesteps)  # evaluated at the top of the loop
            if passed_multiple(args.checkpoint_frequency, run.global_step, args.num_envs):
                if not run.finite():  # sync point: a non-finite state is never written over a finite one
                    end_run(run, rb, log, f"non-finite weights at step {run.global_step}")
                save_checkpoint(files.checkpoint, files.checkpoint_state(run, rb))
            log.progress(epsilon)
        envs.close()
    end_run(run, rb, log, "completed" if stop.signum is None else f"signal {signal.Signals(stop.signum).name}",
            stop.signum)


# =====================================================================================================================
# Plumbing: what keeps a run safe and observable, not the algorithm. Input checks, device and memory, run files and
# checkpoints, video, logging and progress, summary.json, signals, --play.
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
                "target_network_frequency", "max_episode_frames", "learning_rate"]
    unit = ["gamma", "start_e", "end_e", "eval_epsilon"]
    rules = [("must be positive", lambda v: v > 0, positive),
             ("must be >= 0", lambda v: v >= 0, ["learning_starts", "eval_frequency", "checkpoint_frequency"]),
             ("must be in (0, 1]", lambda v: 0 < v <= 1, ["exploration_fraction", "tau"]),
             ("must be in [0, 1]", lambda v: 0 <= v <= 1, unit)]
    for rule, ok, names in rules:
        for name in names:
            if not ok(getattr(args, name)):
                fail(f"{flag(name)} {rule}, got {getattr(args, name)}")
    if args.buffer_size < args.batch_size:
        fail(f"--buffer-size ({args.buffer_size}) must be >= --batch-size ({args.batch_size})")
    if args.learning_starts >= args.total_timesteps and not args.play:
        fail(f"--learning-starts ({args.learning_starts}) must be < --total-timesteps ({args.total_timesteps})")
    for name in ["exp_name", "run_name"]:
        value = getattr(args, name)
        if value is not None and (not RUN_NAME_RE.fullmatch(value) or ".." in value):
            fail(f"{flag(name)} {value!r} must be a plain name (letters, digits, . _ = + -)")


def count_actions(game: str, sticky: float, max_frames: int) -> int:
    probe_env = make_env(game, 1, sticky, max_frames, train=True)
    n_actions = int(probe_env.single_action_space.n)
    probe_env.close()
    return n_actions


def pick_device(args: Args) -> torch.device:
    if args.cuda and not torch.cuda.is_available():
        print("warning: --cuda is on (the default) but CUDA is not available; running on the CPU "
              "(--no-cuda silences this)", file=sys.stderr)
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def gpu_speedups(args: Args, run: RunState, storage: torch.device) -> bool:
    """Applies --compile; returns whether --cudagraphs applies. Both need the learner on a GPU, and graphs the replay
    there too (a batch gathered in host RAM is copied through pinned memory, which a graph cannot replay)."""
    if not (args.cudagraphs or args.compile):
        return False
    if run.device.type != "cuda":
        print("warning: --cudagraphs and --compile need a CUDA GPU; ignored on the CPU", file=sys.stderr)
        return False
    if args.compile:
        run.q_network.compile()
        run.target_network.compile()
    if args.cudagraphs and storage.type != "cuda":
        print("warning: --cudagraphs needs the replay in GPU memory, which it does not fit; running eagerly",
              file=sys.stderr)
    return args.cudagraphs and storage.type == "cuda"


def available_ram() -> int:
    """Bytes of RAM the OS can give without swapping (Linux MemAvailable; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


HEADROOM = 2 * 2**30  # networks, optimizer, batches, the CUDA context and the rest of the process


def emulator_bytes(args: Args) -> int:
    """Host RAM of the training envs (none for --play), the evaluation's and the video's, all alive at once."""
    return ((0 if args.play else args.num_envs) + args.eval_episodes + 1) * ENV_BYTES


def check_emulator_memory(args: Args) -> None:
    """Fails early when the envs cannot fit in RAM, before ale-py spends minutes building them and then swaps."""
    free = available_ram() - HEADROOM
    if emulator_bytes(args) <= free:
        return
    training = 0 if args.play else args.num_envs
    num_envs = max(free // ENV_BYTES - args.eval_episodes - 1, 0)  # beside this many evaluation games
    eval_episodes = max(free // ENV_BYTES - training - 1, 0)  # beside this many training envs
    hint = (f"the largest --num-envs that fits beside --eval-episodes {args.eval_episodes} is {num_envs}"
            if training and num_envs else f"the largest --eval-episodes that fits is {eval_episodes}")
    flags = f"--num-envs {args.num_envs} and " * bool(training) + f"--eval-episodes {args.eval_episodes}"
    fail(f"{flags} need {emulator_bytes(args) / 1e9:.1f} GB of RAM for their emulators but only "
         f"{max(free, 0) / 1e9:.1f} GB is free; {hint}")


def replay_storage(args: Args, device: torch.device) -> torch.device:
    """GPU memory when the buffer fits there (sampling and stacking stay on the GPU), else host RAM beside the envs;
    fails early with the largest --buffer-size that fits when it fits nowhere."""
    needed = ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs)
    if device.type == "cuda" and needed <= torch.cuda.mem_get_info(device)[0] - HEADROOM:
        return device
    free = available_ram() - HEADROOM - emulator_bytes(args)
    if needed <= free:
        return torch.device("cpu")
    largest = int(args.buffer_size * max(free, 0) / needed)
    where = "GPU memory or RAM" if device.type == "cuda" else "RAM"
    fail(f"--buffer-size {args.buffer_size} needs {needed / 1e9:.1f} GB but only {max(free, 0) / 1e9:.1f} GB of "
         f"{where} is free; the largest buffer that fits is --buffer-size {largest}")


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
        return {"env_id": self.args.env_id, "n_actions": run.n_actions, "run_name": self.run_name,
                "args": asdict(self.args), **run.state_dict(),
                "replay_buffer": rb.state_dict() if self.args.checkpoint_buffer else None}

    def save_model(self, name: str, run: RunState) -> None:
        save_checkpoint(os.path.join(self.run_dir, name), {
            "env_id": self.args.env_id, "n_actions": run.n_actions, "model": run.q_network.state_dict(),
            "global_step": run.global_step})

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
    if checkpoint["replay_buffer"] is None:  # no updates until the empty buffer holds learning_starts new steps
        run.learning_from = run.global_step + args.learning_starts


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
    CleanRL saves (.cleanrl_model) and publishes (q_network.pth) them; its action count is read from its last layer."""
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
        return {"env_id": env_id, "n_actions": n_actions, "model": state}
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


def write_video(path: str, frames: list[np.ndarray], fps: int = 15) -> None:
    """MP4 through OpenCV (no moviepy); frames are RGB uint8 (H, W, 3). 15 fps = real time at frameskip 4."""
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
    (completed, a signal, a non-finite loss, a crash). It changes no state of the run."""

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
            print(f"resumed {files.run_name} at step {run.global_step} from {args.resume}" + (
                "" if run.learning_from == 0 else f"; refilling the replay buffer until step {run.learning_from}"))
        self.episode_returns = np.zeros(args.num_envs)
        self.episode_lengths = np.zeros(args.num_envs, dtype=np.int64)
        self.recent_returns: list[float] = []  # the last 10 games' scores, for the progress line
        self.update_stats = torch.zeros((LOG_EVERY, 2), device=run.device)  # (td_loss, mean Q) per update
        self.update_steps = [0] * LOG_EVERY  # the env step of each of those updates
        self.start_time, self.start_step, self.last_print, self.eval_seconds = time.time(), run.global_step, 0.0, 0.0
        self.is_tty = sys.stderr.isatty()

    def sps(self) -> float:
        return (self.run.global_step - self.start_step) / max(time.time() - self.start_time, 1e-9)

    def games(self, rewards: np.ndarray, in_game: np.ndarray, ended: np.ndarray) -> None:
        """Adds a step's rewards to each env's game; logs the full, unclipped score of each game that ended."""
        self.episode_returns[in_game] += rewards[in_game]
        self.episode_lengths[in_game] += 1
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

    def evaluation(self, returns: np.ndarray, held_out: Optional[tuple[float, float]], seconds: float) -> None:
        step = self.run.global_step
        self.eval_seconds += seconds
        self.writer.add_scalar("eval/episodic_return", returns.mean(), step)
        if held_out is not None:
            self.writer.add_scalar("eval/avg_max_q", held_out[0], step)
            self.writer.add_scalar("eval/td_error", held_out[1], step)
        print(("\n" if self.is_tty else "") + f"step {step}: eval return {returns.mean():.2f} +- {returns.std():.2f}")

    def progress(self, epsilon: float) -> None:
        if not self.is_tty or time.time() - self.last_print <= 0.5:
            return
        self.last_print, sps, run = time.time(), self.sps(), self.run
        recent = f"{np.mean(self.recent_returns):.1f}" if self.recent_returns else "-"
        print(f"\r{run.global_step:>11,}/{self.args.total_timesteps:,} steps | {sps:,.0f} SPS | "
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
                   "resumed_from": self.args.resume, "args": asdict(self.args)}
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


def play(args: Args, game: str, sticky: float, n_actions: int, device: torch.device) -> None:
    """--play: evaluate a saved model (ours, a checkpoint, or a bare state_dict as CleanRL saves and publishes)."""
    state = load_checkpoint(args.play, args.env_id, n_actions, play=True)
    q_network = make_network(n_actions, device, args)
    load_weights(q_network, state["model"], args.play)
    video_path = None
    if args.capture_video:
        os.makedirs("videos", exist_ok=True)
        video_path = os.path.join("videos", f"play__{args.env_id.replace('/', '-')}__{args.seed}.mp4")
    returns, lengths = evaluate(q_network, game, sticky, args.max_episode_frames, args.eval_episodes,
                                args.eval_epsilon, args.seed, device, video_path)
    print(f"{args.eval_episodes} episodes of {args.play}: mean return {returns.mean():.2f} +- {returns.std():.2f}"
          f" (min {returns.min():.1f}, max {returns.max():.1f}), mean length {lengths.mean():,.0f} frames"
          + (f"; video: {video_path}" if video_path else ""))


if __name__ == "__main__":
    main(tyro.cli(Args))
