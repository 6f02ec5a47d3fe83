"""Update-cost harness: the seconds of one gradient update of an Atari script (a batch from its ReplayBuffer filled with
random frames, then its own train_step), timed outside its training loop; bound = train_frequency / seconds_per_update
(benchmarks/README.md). The networks and optimizer are built as the script's main() builds them: keep in step.

    python -m benchmarks.update_cost --script dqn_atari.py
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np
import torch
import tyro

from benchmarks.common import ATARI_SCRIPTS, RESULTS_DIR, format_table, load_script, timed_blocks, write_json


def fill_random(rb: Any, slots: int, num_envs: int, n_actions: int, seed: int = 0) -> None:
    """Fills `slots` slots per env through the buffer's own add(): random frames, actions and 0/1 rewards, 2% dones
    (life losses), and the first slot of each stream marked as a game's first frame, as the script does at reset."""
    rng = np.random.default_rng(seed)
    zeros = np.zeros(num_envs)
    rb.add(rng.integers(0, 256, (num_envs, 84, 84), dtype=np.uint8), zeros, zeros, zeros,
           firsts=np.ones(num_envs, dtype=bool))
    for _ in range(slots - 1):
        rb.add(rng.integers(0, 256, (num_envs, 84, 84), dtype=np.uint8), rng.integers(n_actions, size=num_envs),
               (rng.random(num_envs) < 0.05).astype(np.float64), rng.random(num_envs) < 0.02,
               firsts=np.zeros(num_envs, dtype=bool))


def make_update(mod: ModuleType, rb: Any, n_actions: int, batch_size: int, device: torch.device,
                plain: bool = False) -> Callable[[], Any]:
    """One update of the script (sample a batch, its own train_step) on networks and optimizer built as its main()
    builds them (channels-last conv weights, fused Adam), or with plain=True as CleanRL and SB3 do (NCHW weights,
    for-loop Adam): the same math, for a same-machine comparison of the update alone."""
    args = mod.Args()
    memory_format = torch.channels_last if args.channels_last and not plain else torch.preserve_format
    q_network = mod.QNetwork(n_actions).to(device, memory_format=memory_format)
    target_network = mod.QNetwork(n_actions).to(device, memory_format=memory_format)
    target_network.load_state_dict(q_network.state_dict())
    adam_kwargs = {"eps": args.adam_eps} if hasattr(args, "adam_eps") else {}
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=not plain, **adam_kwargs)
    if hasattr(rb, "update_priorities"):  # dqn_atari_dueling_per.py: PER sampling and priority updates
        return lambda: mod.train_step(q_network, target_network, optimizer, rb,
                                      rb.sample(batch_size, args.prioritized_replay_beta0), args.gamma,
                                      args.max_grad_norm)
    return lambda: mod.train_step(q_network, target_network, optimizer, rb.sample(batch_size), args.gamma)


def measure_update_cost(script: str, env_id: str = "BreakoutNoFrameskip-v4", cuda: bool = False,
                        capacity: int = 12_000, batch_size: int = 32, warmup: int = 20, iters: int = 500,
                        blocks: int = 5, plain: bool = False) -> dict[str, Any]:
    """Seconds per update of `script`, from `iters` updates timed in `blocks` equal blocks after `warmup` untimed ones
    (sps.py calls it in a fresh process)."""
    mod = load_script(script)
    defaults = mod.Args()
    device = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
    torch.manual_seed(defaults.seed)
    torch.backends.cudnn.deterministic = defaults.torch_deterministic  # as the script sets it
    game, sticky = mod.atari_game(env_id)
    probe = mod.make_env(game, 1, sticky, 108_000, train=True)
    n_actions = int(probe.single_action_space.n)
    probe.close()
    rb_kwargs = {}
    if hasattr(defaults, "prioritized_replay_alpha"):  # the PER buffer's priority exponent and floor
        rb_kwargs = {"alpha": defaults.prioritized_replay_alpha, "eps": defaults.prioritized_replay_eps}
    rb = mod.ReplayBuffer(capacity, 1, device, device, **rb_kwargs)  # 1 env; storage on the learner's device
    fill_random(rb, rb.per_env, 1, n_actions)
    block_seconds = timed_blocks(make_update(mod, rb, n_actions, batch_size, device, plain), device, warmup, iters,
                                 blocks)
    return {"script": script, "plain": plain, "device": str(device), "torch_threads": torch.get_num_threads(),
            "n_actions": n_actions, "capacity": capacity, "batch_size": batch_size, "warmup": warmup,
            "iters": max(1, iters // blocks) * blocks, "seconds_per_update": float(np.mean(block_seconds)),
            "block_min_s": min(block_seconds), "block_max_s": max(block_seconds)}


@dataclass
class Args:
    script: str = "dqn_atari.py"  # the Atari script whose update is timed
    env_id: str = "BreakoutNoFrameskip-v4"  # the game (it sets the number of actions)
    cuda: bool = False  # time on the GPU
    capacity: int = 12_000  # replay capacity filled with random frames
    batch_size: int = 32  # the batch size of each update
    iters: int = 500  # timed updates
    train_frequency: int = 4  # env steps per update, for the bound train_frequency / seconds_per_update
    plain: bool = False  # build networks and optimizer as CleanRL and SB3 do (NCHW weights, for-loop Adam)
    out: Optional[Path] = None  # the JSON file (default: results/update_cost__{script}[__plain][__cuda].json)


def main(args: Args) -> None:
    if args.script not in ATARI_SCRIPTS:
        raise SystemExit(f"--script must be one of {ATARI_SCRIPTS}")
    r = measure_update_cost(args.script, args.env_id, args.cuda, args.capacity, args.batch_size, iters=args.iters,
                            plain=args.plain)
    row = [r["script"], "plain (CleanRL/SB3 style)" if args.plain else "as the script", r["device"],
           r["torch_threads"], 1e3 * r["seconds_per_update"], 1e3 * r["block_min_s"], 1e3 * r["block_max_s"],
           args.train_frequency / r["seconds_per_update"]]
    print(format_table(["script", "networks + Adam", "device", "threads", "ms/update", "block min ms", "block max ms",
                        "bound SPS"], [row], digits=2))
    suffix = ("__plain" if args.plain else "") + ("__cuda" if args.cuda else "")
    name = f"update_cost__{args.script.removesuffix('.py')}{suffix}"
    write_json(args.out or RESULTS_DIR / f"{name}.json", {"config": asdict(args), "result": r})


if __name__ == "__main__":
    main(tyro.cli(Args))
