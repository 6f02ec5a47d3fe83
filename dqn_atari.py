"""Nature DQN (Mnih et al. 2015, Nature 518; arXiv:1312.5602) on Atari, through ale-py 0.12's native vector env.

    python dqn_atari.py --env-id BreakoutNoFrameskip-v4

Defaults are CleanRL's dqn_atari.py configuration (Adam instead of RMSProp, MSE instead of the clipped error). As in
CleanRL a lost life is terminal for bootstrapping, the serve after it is hidden from the learner, and the logged return
is the full, unclipped game score. Departures from CleanRL: 8 envs step in parallel (still one update per 4 env steps),
the replay stores each frame once (7.07 KB per transition, not 28.2 KB), and evaluation plays full games at epsilon
0.05. README.md, "What the scripts get right", gives each rule and its test. --cudagraphs is opt-in and unmeasured.
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
import warnings
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
WARM_UPS = 3  # --cudagraphs: eager updates before the capture (Adam's state, library workspaces)


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
    train=True: a life loss is `terminated` but the game goes on (CleanRL's EpisodicLifeEnv); False: full games.
    rgb=True: full-size colour frames of the same trajectory, for videos."""
    image = dict(grayscale=False, img_height=210, img_width=160, stack_num=1) if rgb else {}
    return AtariVectorEnv(game, num_envs, repeat_action_probability=sticky, max_num_frames_per_episode=max_frames,
                          frameskip=4, maxpool=True, noop_max=30, use_fire_reset=True, episodic_life=False,
                          life_loss_info=train, reward_clipping=False, **image)


class Games:
    """Where each env's game ends and when to serve, by ale-py's rules (README: "The serve", "Game over").
    A life is lost when the lives went down and stay > 0 before the frame cap; any other end is a game over. The step
    after a lost life serves (FIRE, else NOOP), is not a transition, and restarts the stack, as a reset does."""

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
        """The obs to act on (N, 4, 84, 84): frames from before the game's or life's start zeroed, as the replay
        rebuilds them."""
        keep = np.arange(STACK) >= STACK - 1 - self.age[:, None]  # (N, 4)
        return obs * keep[:, :, None, None]

    def step(self, terminations: np.ndarray, truncations: np.ndarray, infos: dict) -> np.ndarray:
        """Takes a step's flags; returns where a game ended (the env's next step is its reset step), and updates
        reset_step, missed (a game over caught at its reset step), ended, length and starts (not transitions)."""
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


def make_optimizer(q_network: nn.Module, args: Args, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam (CleanRL's choice over the papers' RMSProp), fused: one kernel for all parameters; capturable for graphs."""
    return torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True, capturable=capturable)


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
    """One update: sample a batch, train_step on it; returns its (td_loss, mean Q). With `graphs`, WARM_UPS eager
    updates on a side stream, then train_step captured once in a CUDA graph: each later update copies its batch into
    the graph's inputs and replays it, one launch instead of about a hundred kernels."""
    def update(data: Batch) -> torch.Tensor:
        return train_step(run.q_network, run.target_network, run.optimizer, data)

    if not graphs:
        return lambda: update(rb.sample(args.batch_size))
    graph, static, side = torch.cuda.CUDAGraph(), {"warm_ups": WARM_UPS}, torch.cuda.Stream()
    warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")  # the eager warm-ups

    def replay() -> torch.Tensor:
        data = rb.sample(args.batch_size)  # eager: its bounds are host ints that change every step
        if static["warm_ups"]:  # real, counted updates: nothing to undo after them
            static["warm_ups"] -= 1
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                stats = update(data)
            torch.cuda.current_stream().wait_stream(side)
            return stats
        if "batch" not in static:  # records, runs nothing: the replay below is this update
            static["batch"] = Batch(*(t.clone() for t in data))
            run.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's memory pool
            with torch.cuda.graph(graph):
                static["stats"] = update(static["batch"])
        for graph_input, value in zip(static["batch"], data):
            graph_input.copy_(value, non_blocking=True)
        graph.replay()
        return static["stats"]  # overwritten by the next replay: the loop copies it
    return replay


class Batch(NamedTuple):
    observations: torch.Tensor  # (B, 4, 84, 84) uint8
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32, clipped to their sign: the return of the transition's HORIZON steps
    next_observations: torch.Tensor  # (B, 4, 84, 84) uint8: the stack the TD target bootstraps from
    dones: torch.Tensor  # (B,) float32: termination or life loss (a truncation bootstraps)
    discounts: torch.Tensor  # (B,) float32: gamma^k for a bootstrap k env steps ahead (gamma at HORIZON 1)
    indices: torch.Tensor  # (B,) int64 slot: env * per-env capacity + position, on the replay's storage device


class ReplayBuffer:
    """Frame-deduplicated replay: each env's stream stores every 84x84 frame once; stacks are rebuilt when sampling
    (README: "Replay layout"). Slot p holds the obs's newest frame and the step's action, clipped reward and flags;
    its transition starts from the stack ending at p-1. 84*84 + 8 + 4 + 3 = 7071 bytes per transition, 7.07 GB at 1M."""

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
        """ceil(capacity / num_envs), and at least a stack and a transition (plus one) per env."""
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
        oldest, lowest_age = (self.pos, STACK) if self.count == self.per_env else (0, 1)  # older: lacks obs frames
        env = torch.randint(self.num_envs, (batch_size, CANDIDATES), device=self.storage)
        # the newest HORIZON - 1 slots still lack steps of their return
        age = torch.randint(lowest_age, self.count - HORIZON + 1, (batch_size, CANDIDATES), device=self.storage)
        pos = (oldest + age) % self.per_env
        ok = ~self.firsts[env, pos]  # not the first frame of a game or a life
        pick = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first valid candidate
        env, pos = env.gather(1, pick).squeeze(1), pos.gather(1, pick).squeeze(1)
        # no valid candidate has probability (share of firsts)^8: then a transition known to be stored
        fallback_env, fallback_pos = self.newest_transitions[0]
        none_ok = ~ok.any(dim=1)
        env, pos = torch.where(none_ok, fallback_env, env), torch.where(none_ok, fallback_pos, pos)
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
        for name in self.FIELDS:
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(f"its replay's {name} are {tuple(state[name].shape)}, this run's "
                                 f"{tuple(getattr(self, name).shape)}: pass its --buffer-size and --num-envs")
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
    """Plays `episodes` full games at once, one per env; returns their scores and lengths in frames. The video comes
    from a colour env that replays game 0 in lockstep (same seed, same actions); stop() ends it early."""
    envs = make_env(game, episodes, sticky, max_frames, train=False)
    video_env = make_env(game, 1, sticky, max_frames, train=False, rgb=True) if video_path else None
    seed %= 2**31 - episodes  # ale-py seeds env i with seed + i, a C++ int32
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


class RunState:
    """What outlives a step: networks, optimizer, RNGs, counters, evaluations. state_dict() is the checkpoint, one
    dict, and load_state_dict() its mirror; the replay goes in only with --checkpoint-buffer."""

    def __init__(self, args: Args, n_actions: int, device: torch.device, rb: ReplayBuffer, graphs: bool = False):
        self.args, self.n_actions, self.device, self.rb = args, n_actions, device, rb
        self.q_network = make_network(n_actions, device, args)
        self.optimizer = make_optimizer(self.q_network, args, capturable=graphs)
        self.target_network = make_network(n_actions, device, args)
        self.target_network.load_state_dict(self.q_network.state_dict())
        self.rng = np.random.default_rng(args.seed)  # exploration
        self.global_step, self.n_updates, self.n_target_syncs = 0, 0, 0
        self.best_eval, self.last_eval, self.eval_due = -float("inf"), None, False  # due: owed at global_step
        self.held_out: Optional[Batch] = None  # DeepMind's held-out transitions, drawn when learning starts
        self.learning_from = 0  # no update before this step (a resumed run with an empty buffer refills it first)
        self.last_finite: Optional[dict] = None  # learner_state() at the last all-finite loss check

    def learner_state(self) -> dict:
        return {"model": self.q_network.state_dict(), "target_model": self.target_network.state_dict(),
                "optimizer": self.optimizer.state_dict(), "global_step": self.global_step, "n_updates": self.n_updates,
                "n_target_syncs": self.n_target_syncs}

    def state_dict(self) -> dict:
        held_out = None if self.held_out is None else {k: t.cpu() for k, t in self.held_out._asdict().items()}
        return {**self.learner_state(), "script": SCRIPT, "env_id": self.args.env_id, "n_actions": self.n_actions,
                "run_name": self.args.run_name, "args": asdict(self.args), "best_eval": self.best_eval,
                "last_eval": self.last_eval, "eval_due": self.eval_due, "held_out": held_out,
                "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
                "replay_buffer": self.rb.state_dict() if self.args.checkpoint_buffer else None}

    def load_state_dict(self, state: dict) -> None:
        self.q_network.load_state_dict(state["model"])
        self.target_network.load_state_dict(state["target_model"])
        capturable = self.optimizer.param_groups[0]["capturable"]  # a GPU run's file loads on a CPU
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.param_groups[0].update(capturable=capturable, lr=self.args.learning_rate)  # this run's flags
        self.global_step, self.n_updates = state["global_step"], state["n_updates"]
        self.n_target_syncs, self.best_eval = state["n_target_syncs"], state["best_eval"]
        self.last_eval, self.eval_due = state["last_eval"], state["eval_due"]
        if state["held_out"] is not None:
            self.held_out = Batch(**{k: t.to(self.device) for k, t in state["held_out"].items()})
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state["replay_buffer"] is not None:
            self.rb.load_state_dict(state["replay_buffer"])
        else:  # no updates until the empty buffer holds learning_starts new steps
            self.learning_from = self.global_step + self.args.learning_starts

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
    game, sticky = atari_game(args.env_id)
    probe_env = make_env(game, 1, sticky, args.max_episode_frames, train=True)
    n_actions = int(probe_env.single_action_space.n)
    probe_env.close()
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and device.type == "cpu":
        print("warning: --cuda is on (the default) but CUDA is not available; running on the CPU (--no-cuda "
              "silences this)", file=sys.stderr)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    storage = place_replay(args, device)  # GPU memory if the buffer fits there, else RAM; fails early if neither
    if args.play:
        return play(args, game, sticky, n_actions, device)
    graphs = args.cudagraphs and storage.type == "cuda"  # a batch from RAM is copied through pinned memory: no graph
    if args.cudagraphs and not graphs or args.compile and device.type == "cpu":
        print("warning: --cudagraphs needs the replay in GPU memory, --compile a GPU; ignored", file=sys.stderr)

    # ALGO LOGIC: initialize agent here:
    rb = ReplayBuffer(args.buffer_size, args.num_envs, storage, device, args.gamma)
    run = RunState(args, n_actions, device, rb, graphs)
    if checkpoint:
        try:  # a file that does not fit fails in one line, before anything is written
            run.load_state_dict(checkpoint)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            fail(f"{args.resume!r} is not a checkpoint of this script/flags ({type(error).__name__}: {error})")
    if args.compile and device.type == "cuda":
        run.q_network.compile()
        run.target_network.compile()
    learn = make_learner(run, rb, args, graphs)
    run_dir, lock = open_run_dir(args, checkpoint)  # runs/{run_name}, locked by this process while `lock` is open
    print(f"replay: {ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs) / 1e9:.2f} GB on {storage}, "
          f"learner on {device}" + ", each update one CUDA graph" * graphs, flush=True)
    envs = make_env(game, args.num_envs, sticky, args.max_episode_frames, train=True)
    # the envs step in ale-py's threads beside the learner when a core is free for them; beside a CPU learner that
    # uses every core they only contend with its threads (up to 7% fewer SPS on 2 cores: RESULTS.md s. 13)
    overlap = device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, group=args.wandb_group,
                   sync_tensorboard=True, config=vars(args), name=args.run_name, id=args.run_name, resume="allow",
                   dir=run_dir, save_code=True)
    writer = SummaryWriter(run_dir, purge_step=run.global_step if checkpoint else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % (
        "\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))
    if checkpoint:
        print(f"resumed {args.run_name} at step {run.global_step} from {args.resume}" + (
            f"; refilling the replay buffer until step {run.learning_from}" if run.learning_from else ""))
    episode_returns, episode_lengths = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=np.int64)
    recent_returns: list[float] = []  # the last 10 games' scores, for the progress line
    update_stats = torch.zeros((LOG_EVERY, 2), device=device)  # (td_loss, mean Q) of the last LOG_EVERY updates
    update_steps = [0] * LOG_EVERY  # the env step of each
    run.start_time, run.start_step, run.eval_seconds, last_print = time.time(), run.global_step, 0.0, 0.0

    obs, infos = envs.reset(seed=(args.seed + run.global_step) % (2**31 - args.num_envs))  # int32 seeds, as eval
    games = Games(envs, infos, args.max_episode_frames)
    # each env's stream starts with the first frame of its game: a slot that is not a transition
    rb.add(obs[:, -1], *np.zeros((4, args.num_envs)), firsts=np.ones(args.num_envs, dtype=bool))
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
                returns, _ = evaluate(run.q_network, game, sticky, args.max_episode_frames, args.eval_episodes,
                                      args.eval_epsilon, args.seed + 1_000_000 + run.global_step, device, video,
                                      stop=lambda: bool(stop))
                if stop:  # a signal cut the evaluation short: it stays due, and a resumed run does it first
                    break
                run.eval_seconds += time.time() - started
                writer.add_scalar("eval/episodic_return", returns.mean(), run.global_step)
                if run.held_out is not None:  # Mnih et al. 2015, Fig. 2: average max Q and |TD error|, held out
                    with torch.inference_mode():
                        td_target, q_values, q_taken = td_terms(run.q_network, run.target_network, run.held_out)
                    writer.add_scalar("eval/avg_max_q", q_values.max(dim=1).values.mean(), run.global_step)  # sync
                    writer.add_scalar("eval/td_error", (td_target - q_taken).abs().mean(), run.global_step)
                print("\n" * sys.stderr.isatty() + f"step {run.global_step}: eval return {returns.mean():.2f} +- "
                      f"{returns.std():.2f}")
                run.last_eval, run.eval_due = float(returns.mean()), False
                if run.last_eval > run.best_eval:
                    run.best_eval = run.last_eval
                    save_checkpoint(f"{run_dir}/best_model.pt", {"script": SCRIPT, "env_id": args.env_id,
                                    "n_actions": n_actions, "model": run.q_network.state_dict(),
                                    "global_step": run.global_step})
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
                if step <= args.learning_starts or step <= run.learning_from or rb.count < 2:  # 2: a transition
                    continue
                if run.held_out is None:  # DeepMind's held-out states, drawn once from the (random-policy) warm-up
                    run.held_out = rb.sample(HELD_OUT)
                if step % args.train_frequency == 0:
                    update_stats[run.n_updates % LOG_EVERY] = learn()  # sample a batch, one gradient step on it
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

            next_obs, rewards, terminations, truncations, infos = stepped or envs.recv()
            games.step(terminations, truncations, infos)  # terminated alone may be a life loss
            # a game's score counts every step but its reset step (action ignored, reward 0, obs = the new game's
            # first); a game over the flags missed ends its game at its reset step
            episode_returns[~games.reset_step] += rewards[~games.reset_step]
            episode_lengths[~games.reset_step] += 1
            for i in np.flatnonzero(games.ended):
                recent_returns = (recent_returns + [float(episode_returns[i])])[-10:]
                writer.add_scalar("charts/episodic_return", episode_returns[i], run.global_step)
                writer.add_scalar("charts/episodic_length", episode_lengths[i], run.global_step)
                episode_returns[i], episode_lengths[i] = 0, 0
            # a game's or a life's first obs (the reset step, the serve) is not a transition: its slot starts the
            # stacks after it. A life loss is a termination; a truncation bootstraps from its real final frame
            rb.add(next_obs[:, -1], actions, rewards, terminations, truncations, firsts=games.starts)
            obs = games.stack(next_obs)  # the stack the replay rebuilds: restarted at the serve after a lost life

            run.eval_due = (passed_multiple(args.eval_frequency, run.global_step, args.num_envs)
                            or run.global_step >= args.total_timesteps)  # evaluated at the top of the loop
            if passed_multiple(args.checkpoint_frequency, run.global_step, args.num_envs):
                if not run.finite():  # sync point: a non-finite state is never written over a finite one
                    end_run(run, writer, f"non-finite weights at step {run.global_step}")
                save_checkpoint(f"{run_dir}/checkpoint.pt", run.state_dict())
            if sys.stderr.isatty() and time.time() - last_print > 0.5:  # the progress line, on a terminal only
                last_print, recent = time.time(), f"{np.mean(recent_returns):.1f}" if recent_returns else "-"
                print(f"\r{run.global_step:>11,}/{args.total_timesteps:,} steps | {run.sps():,.0f} SPS | ETA "
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
    end_run(run, writer, f"signal {signal.Signals(stop[0]).name}" if stop else "completed", *stop)


# =====================================================================================================================
# Plumbing: what keeps a run safe, not the algorithm. Input checks, resumed flags, memory, the run folder,
# checkpoints, the one end of every run (summary.json, exit codes), signals, --play, video.
# =====================================================================================================================
HEADROOM = 2 * 2**30  # networks, optimizer, batches, the CUDA context and the rest of the process
ENV_BYTES = 2 * 2**20  # host RAM of one ale-py emulator with its frame buffers (1.3 to 1.9 MB each, 8 to 256 envs)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SCRIPT = os.path.basename(__file__)
# the flags a resumed run may change (anything else would change what its checkpoint means)
SAFE_ON_RESUME = ("learning_rate total_timesteps eval_frequency eval_episodes eval_epsilon checkpoint_frequency track "
                  "wandb_project_name wandb_entity wandb_group capture_video save_model exp_name run_name cuda "
                  "cudagraphs compile checkpoint_buffer resume play").split()


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr (whatever the message holds) and exit code 2, before anything is written."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    raise SystemExit(2)


def validate_args(args: Args) -> None:
    """Bad flags fail here, before anything is built or written (NaN fails every rule); poor ones get a warning."""
    rules = [("below 2^53", lambda v: v < 2**53, " ".join(f.name for f in fields(Args) if f.type is int)),
             ("positive", lambda v: v > 0, "total_timesteps num_envs buffer_size batch_size train_frequency "
              "eval_episodes target_network_frequency max_episode_frames"),
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
    if args.buffer_size < args.batch_size:
        fail(f"--buffer-size ({args.buffer_size}) must be >= --batch-size ({args.batch_size})")
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
                       "batches repeat the few transitions stored"),
                      (args.max_episode_frames < 4 * STACK, "--max-episode-frames is below one stack of steps (16 "
                       "frames): every game is truncated at once")]:
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


def place_replay(args: Args, device: torch.device) -> torch.device:
    """The replay's device: GPU memory if it fits there, else RAM beside the emulators (training, evaluation, video).
    Fails early, naming the largest flag that fits, before ale-py spends minutes building envs that would swap."""
    with open("/proc/meminfo") as f:  # MemAvailable: what the OS can give without swapping
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable")) - HEADROOM
    training = 0 if args.play else args.num_envs
    emulators = (training + args.eval_episodes + 1) * ENV_BYTES
    if emulators > free:
        most = max(free // ENV_BYTES - args.eval_episodes - 1, 0)
        hint = (f"--num-envs that fits beside --eval-episodes {args.eval_episodes} is {most}" if training and most
                else f"--eval-episodes that fits is {max(free // ENV_BYTES - training - 1, 0)}")
        fail(f"{f'--num-envs {args.num_envs} and ' * bool(training)}--eval-episodes {args.eval_episodes} need "
             f"{emulators / 1e9:.1f} GB of RAM for their emulators but only {max(free, 0) / 1e9:.1f} GB is free; the "
             f"largest {hint}")
    needed, free = ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs), free - emulators
    if args.play or (device.type == "cuda" and needed <= torch.cuda.mem_get_info(device)[0] - HEADROOM):
        return device
    if needed > free:
        fail(f"--buffer-size {args.buffer_size} needs {needed / 1e9:.1f} GB but only {max(free, 0) / 1e9:.1f} GB of "
             f"{'GPU memory or ' * (device.type == 'cuda')}RAM is free; the largest buffer that fits is --buffer-size "
             f"{int(args.buffer_size * max(free, 0) / needed)}")
    return torch.device("cpu")


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
               "args": asdict(args)}
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


def play(args: Args, game: str, sticky: float, n_actions: int, device: torch.device) -> None:
    """--play: evaluate a saved model (ours, a checkpoint, or a bare state_dict as CleanRL saves and publishes)."""
    state = load_checkpoint(args.play, play=True)
    model, trained_on = state.get("model", state), state.get("env_id")
    actions = state.get("n_actions") or len([v for k, v in model.items() if k.endswith(".weight")][-1])
    if actions != n_actions or (trained_on and atari_game(trained_on)[0] != game):
        fail(f"{args.play!r} was trained on {trained_on or 'an unnamed game'} ({actions} actions), not {args.env_id} "
             f"({n_actions} actions); pass the --env-id it was trained on")
    if trained_on != args.env_id:  # a bare state_dict names no game; a v4 model may play the v5 id of its game
        print(f"note: {args.play!r} was trained on {trained_on or 'a game it does not name'}: its score means "
              f"something only on that game" + (f", here with {args.env_id}'s settings" if trained_on else ""))
    q_network = make_network(n_actions, device, args)
    try:
        q_network.load_state_dict(model)
    except RuntimeError as error:
        fail(f"{args.play!r} holds another network ({error}); use the script it was trained with")
    video = f"videos/play__{args.env_id.replace('/', '-')}__{args.seed}.mp4" if args.capture_video else None
    returns, lengths = evaluate(q_network, game, sticky, args.max_episode_frames, args.eval_episodes,
                                args.eval_epsilon, args.seed, device, video)
    print(f"{args.eval_episodes} episodes of {args.play}: mean return {returns.mean():.2f} +- {returns.std():.2f}"
          f" (min {returns.min():.1f}, max {returns.max():.1f}), mean length {lengths.mean():,.0f} frames"
          + (f"; video: {video}" if video else ""))


def write_video(path: str, frames: list[np.ndarray], fps: int = 15) -> None:
    """MP4 through OpenCV (no moviepy); frames are RGB uint8 (H, W, 3). 15 fps = real time at frameskip 4."""
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
