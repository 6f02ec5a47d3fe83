"""The one-shot measurements, one subcommand each, each writing a JSON under benchmarks/results/ (definitions and
configurations: benchmarks/README.md). `python -m benchmarks.measure --help` lists them."""

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import tyro

from benchmarks.common import (ATARI_SCRIPTS, CARTPOLE_SCRIPT, KB, REFERENCES, RESULTS_DIR, SCRIPTS, AtariScript,
                               Script, format_table, in_fresh_process, load_script, pick_device, read_summary,
                               references_json, run_name_for, run_script, timed_blocks, training_sps, write_json)


def timestamp_tag(prefix: str) -> str:
    """A run-name tag unique per second: sps-20261123-071500."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class AtariBenchConfig:
    """The Atari configuration CleanRL's 108 SPS and SB3's 91 SPS were measured in (NOTES.md)."""

    env_id: str = "BreakoutNoFrameskip-v4"  # the Atari game
    seed: int = 1  # the seed of the runs
    total_timesteps: int = 12_000  # env steps of each run
    learning_starts: int = 2_000  # env step at which updates start
    batch_size: int = 32  # the batch size of each update
    train_frequency: int = 4  # env steps per gradient update
    buffer_size: Optional[int] = None  # replay capacity (default: total-timesteps: nothing is ever overwritten)
    max_episode_frames: int = 10_000  # frame cap of an episode (bounds the final 1-episode evaluation; training too)
    num_envs: int = 1  # parallel envs of the Atari scripts
    cuda: bool = False  # run on the GPU (--cuda to the scripts) instead of the CPU
    cudagraphs: bool = False  # --cudagraphs to the scripts (each update one CUDA graph; ignored on the CPU)
    compile: bool = False  # --compile to the scripts (torch.compile of the networks; ignored on the CPU)
    out_dir: Path = RESULTS_DIR  # where JSON results, and the scripts' runs/ and logs go

    def __post_init__(self) -> None:
        self.buffer_size = self.buffer_size or self.total_timesteps
        if (self.cudagraphs or self.compile) and not self.cuda:
            raise SystemExit("--cudagraphs and --compile need --cuda")  # the scripts would ignore them on the CPU

    def script_flags(self, run_name: str) -> list[str]:
        """Our Atari scripts' flags for this config: evaluation only at the end (1 episode), no periodic checkpoint."""
        return ["--env-id", self.env_id, "--seed", str(self.seed), "--run-name", run_name,
                "--total-timesteps", str(self.total_timesteps), "--learning-starts", str(self.learning_starts),
                "--batch-size", str(self.batch_size), "--train-frequency", str(self.train_frequency),
                "--buffer-size", str(self.buffer_size), "--num-envs", str(self.num_envs),
                "--eval-frequency", "0", "--eval-episodes", "1", "--max-episode-frames", str(self.max_episode_frames),
                "--checkpoint-frequency", "0", "--cuda" if self.cuda else "--no-cuda",
                *["--cudagraphs"] * self.cudagraphs, *["--compile"] * self.compile]


def measure_script_sps(script: str, flags: list[str], run_name: str, workdir: Path) -> dict[str, Any]:
    """Runs a script to completion in `workdir`; its training-phase SPS from its events, its summary.json, and the
    seconds of the whole process (start-up, warm-up, training, final evaluation, checkpoint)."""
    wall_s = run_script(script, flags, workdir, workdir / "logs" / f"{run_name}.log")
    run_dir = workdir / "runs" / run_name
    return {"script": script, "run_name": run_name, "run_dir": str(run_dir), "wall_s": wall_s,
            "training": training_sps(run_dir), "summary": read_summary(run_dir)}


def fill_random(rb: Any, n_actions: int, seed: int = 0) -> None:
    """Fills every slot of a 1-env buffer through its own add(): random frames, actions and 0/1 rewards, 2% dones
    (life losses), and the first slot marked as a game's first frame, as the script does at reset."""
    rng, zeros, no = np.random.default_rng(seed), np.zeros(1), np.zeros(1, dtype=bool)
    rb.add(rng.integers(0, 256, (1, 84, 84), dtype=np.uint8), zeros, zeros, zeros, zeros, firsts=~no)
    for _ in range(rb.per_env - 1):
        rb.add(rng.integers(0, 256, (1, 84, 84), dtype=np.uint8), rng.integers(n_actions, size=1),
               (rng.random(1) < 0.05).astype(np.float64), rng.random(1) < 0.02, no, firsts=no)


@dataclass
class UpdateCost:
    """One gradient update of an Atari script, timed outside its training loop -> results/update_cost__*.json."""

    script: AtariScript = "dqn_atari.py"  # the Atari script whose update is timed
    env_id: str = "BreakoutNoFrameskip-v4"  # the game (it sets the number of actions)
    cuda: bool = False  # time on the GPU
    capacity: int = 12_000  # replay capacity filled with random frames
    batch_size: int = 32  # the batch size of each update
    iters: int = 500  # timed updates
    train_frequency: int = 4  # env steps per update, for the bound train_frequency / seconds_per_update
    plain: bool = False  # build networks and optimizer as CleanRL and SB3 do (NCHW weights, for-loop Adam)
    cudagraphs: bool = False  # each update replays one CUDA graph, as the scripts' --cudagraphs (needs --cuda)
    out: Optional[Path] = None  # the JSON (default: results/update_cost__{script}[__plain][__cuda][__cudagraphs].json)

    def __post_init__(self) -> None:
        if self.cudagraphs and not self.cuda:
            raise SystemExit("--cudagraphs needs --cuda")

    def make_update(self, mod: Any, rb: Any, n_actions: int, device: torch.device) -> Callable[[], Any]:
        """One update of the script (sample a batch, its own train_step) on the networks and optimizer of its own
        RunState (channels-last conv weights, fused Adam), or with --plain built as CleanRL and SB3 build them (NCHW
        weights, for-loop Adam): the same math, for a same-machine comparison of the update alone."""
        args = mod.Args(batch_size=self.batch_size)
        run = mod.RunState(args, n_actions, device, rb, self.cudagraphs)
        if self.plain:
            run.q_network, run.target_network = mod.QNetwork(n_actions).to(device), mod.QNetwork(n_actions).to(device)
            run.target_network.load_state_dict(run.q_network.state_dict())
            adam_kwargs = {"eps": args.adam_eps} if hasattr(args, "adam_eps") else {}
            run.optimizer = torch.optim.Adam(run.q_network.parameters(), lr=args.learning_rate, fused=False,
                                             **adam_kwargs)
        learn = mod.make_learner(run, rb, args, self.cudagraphs)  # sample a batch, one gradient step on it
        if hasattr(rb, "update_priorities"):  # dqn_atari_dueling_per.py: at the initial importance exponent
            return lambda: learn(args.prioritized_replay_beta0)
        return learn

    def measure(self, warmup: int = 20, blocks: int = 5) -> dict[str, Any]:
        """Seconds per update, from `iters` updates timed in `blocks` equal blocks after `warmup` untimed ones (sps
        calls it in a fresh process)."""
        mod, device = load_script(self.script), pick_device(self.cuda)
        defaults = mod.Args()
        torch.manual_seed(defaults.seed)
        torch.backends.cudnn.deterministic = defaults.torch_deterministic  # as the script sets it
        game, sticky = mod.atari_game(self.env_id)
        n_actions = int(mod.make_env(game, 1, sticky, 108_000, train=True).single_action_space.n)
        per = hasattr(defaults, "prioritized_replay_alpha")  # the PER buffer's priority exponent and floor
        rb_kwargs = {"alpha": defaults.prioritized_replay_alpha, "eps": defaults.prioritized_replay_eps} if per else {}
        rb = mod.ReplayBuffer(self.capacity, 1, device, device, defaults.gamma, **rb_kwargs)  # 1 env, on the device
        fill_random(rb, n_actions)
        block_seconds = timed_blocks(self.make_update(mod, rb, n_actions, device), warmup, self.iters, blocks)
        return {"script": self.script, "plain": self.plain, "cudagraphs": self.cudagraphs, "device": str(device),
                "torch_threads": torch.get_num_threads(), "n_actions": n_actions, "capacity": self.capacity,
                "batch_size": self.batch_size, "warmup": warmup, "iters": max(1, self.iters // blocks) * blocks,
                "seconds_per_update": float(np.mean(block_seconds)), "block_min_s": min(block_seconds),
                "block_max_s": max(block_seconds)}

    def run(self) -> None:
        r = self.measure()
        built = "plain (CleanRL/SB3 style)" if self.plain else "as the script" + " + graphs" * self.cudagraphs
        row = [r["script"], built, r["device"], r["torch_threads"], 1e3 * r["seconds_per_update"],
               1e3 * r["block_min_s"], 1e3 * r["block_max_s"], self.train_frequency / r["seconds_per_update"]]
        print(format_table(["script", "networks + Adam", "device", "threads", "ms/update", "block min ms",
                            "block max ms", "bound SPS"], [row], digits=2))
        suffix = "__plain" * self.plain + "__cuda" * self.cuda + "__cudagraphs" * self.cudagraphs
        name = f"update_cost__{self.script.removesuffix('.py')}{suffix}"
        write_json(self.out or RESULTS_DIR / f"{name}.json", {"config": asdict(self), "result": r})


@dataclass
class Sps(AtariBenchConfig):
    """Training-phase SPS of the scripts in a fixed config, the update-cost bound, CleanRL's SPS -> results/sps.json."""

    scripts: tuple[Script, ...] = SCRIPTS  # which scripts to measure
    cartpole_timesteps: int = 20_000  # env steps of the dqn_cartpole.py run (its other flags stay at their defaults)
    update_iters: int = 500  # timed updates of the update-cost harness, per Atari script (0: skip the harness)
    out: Optional[Path] = None  # the JSON file (default: {out-dir}/sps.json)

    def measure_atari(self, script: str, tag: str) -> dict[str, Any]:
        """One training run in the fixed config, then the update cost of the same script in a fresh process."""
        run_name = run_name_for(self.env_id, script, self.seed, tag)
        result = measure_script_sps(script, self.script_flags(run_name), run_name, self.out_dir / "sps")
        sps = result["training"]["sps"]
        if self.update_iters > 0:
            harness = UpdateCost(script, self.env_id, self.cuda, self.buffer_size, self.batch_size, self.update_iters,
                                 cudagraphs=self.cudagraphs)
            cost = in_fresh_process(harness.measure)
            bound = self.train_frequency / cost["seconds_per_update"]
            result["update_cost"] = {**cost, "bound_sps": bound, "sps_over_bound": sps / bound}
        return {**result, "sps_over_cleanrl": sps / REFERENCES["cleanrl_atari_sps"].value}

    def run(self) -> None:
        device, tag = pick_device(self.cuda), timestamp_tag("sps")
        atari = [self.measure_atari(s, tag) for s in ATARI_SCRIPTS if s in self.scripts]
        cartpole = None
        if CARTPOLE_SCRIPT in self.scripts:
            run_name = run_name_for("CartPole-v1", CARTPOLE_SCRIPT, self.seed, tag)
            flags = ["--seed", str(self.seed), "--run-name", run_name, "--total-timesteps",
                     str(self.cartpole_timesteps), "--cuda" if self.cuda else "--no-cuda"]
            cartpole = measure_script_sps(CARTPOLE_SCRIPT, flags, run_name, self.out_dir / "sps")
        rows = []
        for r in [*atari, cartpole] if cartpole else atari:
            training, cost = r["training"], r.get("update_cost") or {}
            rows.append([r["script"], training["sps"], int(training["first_step"]), int(training["last_step"]),
                         r["wall_s"], 1e3 * cost["seconds_per_update"] if cost else None, cost.get("bound_sps"),
                         cost.get("sps_over_bound"), r.get("sps_over_cleanrl")])
        print(f"\nTraining-phase SPS on {device.type}. Atari: {self.env_id}, {self.num_envs} env(s), batch "
              f"{self.batch_size}, train every {self.train_frequency}, {self.total_timesteps:,} steps, learning starts "
              f"{self.learning_starts:,}. CartPole-v1: dqn_cartpole.py defaults, {self.cartpole_timesteps:,} steps "
              "(its periodic evaluations and checkpoints fall inside the window).")
        print(format_table(["script", "training SPS", "from step", "to step", "whole run s", "ms/update", "bound SPS",
                            "SPS/bound", "SPS/CleanRL*"], rows, digits=2))
        references = ["cleanrl_atari_sps", "sb3_atari_sps", "nature_cnn_update_ms"]
        cleanrl, sb3, update = (REFERENCES[k] for k in references)
        print(f"* CleanRL {cleanrl.value:g} SPS, {cleanrl.source}: {cleanrl.note}. The ratio compares across machines "
              f"unless this ran on that CPU with 1 env.\nAlso there: {sb3.note}: {sb3.value:g} SPS; {update.note}.")
        write_json(self.out or self.out_dir / "sps.json",
                   {"config": {k: v for k, v in asdict(self).items() if k not in ("out", "out_dir")}, "atari": atari,
                    "cartpole": cartpole, "references": references_json(references)})


def tensor_bytes(obj: Any, seen: Optional[set[int]] = None) -> int:
    """Bytes of all distinct tensors reachable from `obj` through attributes, lists, tuples and dicts (a tensor met
    twice, or a view of one counted, is counted once per storage)."""
    seen = set() if seen is None else seen
    key = obj.untyped_storage().data_ptr() if isinstance(obj, torch.Tensor) else id(obj)
    if key in seen:
        return 0
    seen.add(key)
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if hasattr(obj, "__dict__") and not isinstance(obj, type):  # an object: its attributes
        obj = vars(obj)
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(tensor_bytes(v, seen) for v in obj) if isinstance(obj, (list, tuple)) else 0


def replay_bytes(script: str, capacity: int, num_envs: int, full_capacity: int) -> dict[str, Any]:
    """Allocates the script's ReplayBuffer with `capacity` on the CPU and measures it; bytes_needed at full size."""
    mod, cpu = load_script(script), torch.device("cpu")
    allocated = tensor_bytes(mod.ReplayBuffer(capacity, num_envs, cpu, cpu, mod.Args().gamma))
    needed_full = mod.ReplayBuffer.bytes_needed(full_capacity, num_envs)
    return {"script": script, "capacity": capacity, "num_envs": num_envs, "allocated_bytes": allocated,
            "bytes_per_transition": allocated / capacity,
            "bytes_needed_at_capacity": mod.ReplayBuffer.bytes_needed(capacity, num_envs),
            "full_capacity": full_capacity, "bytes_needed_full": needed_full,
            "bytes_per_transition_full": needed_full / full_capacity}


@dataclass
class Memory:
    """Replay bytes per transition of both Atari scripts' allocated buffers, CleanRL's, SB3's -> results/memory.json."""

    capacity: int = 100_000  # transitions of the buffer really allocated (about 0.7 GB of RAM)
    num_envs: int = 1  # envs the buffer is split over (its per-env capacity is rounded up)
    full_capacity: int = 1_000_000  # the capacity bytes_needed() is also evaluated at
    out: Path = RESULTS_DIR / "memory.json"  # the JSON file

    def run(self) -> None:
        # each buffer in its own process, so that one freed buffer cannot make the next look cheaper or dearer
        ours = [in_fresh_process(replay_bytes, s, self.capacity, self.num_envs, self.full_capacity)
                for s in ATARI_SCRIPTS]
        rows = [[r["script"], r["bytes_per_transition"] / KB, r["bytes_needed_full"] / 1e9, "allocated here"]
                for r in ours]
        peers = {"cleanrl_replay_kb": "CleanRL dqn_atari.py", "sb3_replay_kb": "SB3 DQN (default)"}
        rows += [[name, REFERENCES[key].value, REFERENCES[key].value * KB * self.full_capacity / 1e9, "reference*"]
                 for key, name in peers.items()]
        print(f"Replay memory per Atari transition (KB = 1000 bytes; our buffers allocated at {self.capacity:,} "
              f"transitions, {self.num_envs} env(s); GB at {self.full_capacity:,} from bytes_needed for ours):")
        print(format_table(["replay", "KB/transition", f"GB at {self.full_capacity:,}", "source"], rows, digits=2))
        print(f"* {REFERENCES['cleanrl_replay_kb'].source}; "
              + "; ".join(f"{name}: {REFERENCES[key].note}" for key, name in peers.items()))
        write_json(self.out, {"config": {k: v for k, v in asdict(self).items() if k != "out"}, "ours": ours,
                              "references": references_json([*peers, "dedup_replay_kb"])})


def solve_result(seed: int, run_name: str, wall_s: float, summary: dict[str, Any]) -> dict[str, Any]:
    """One seed's row, from the run's summary.json."""
    solved = summary.get("goal_reached_step") is not None
    return {"seed": seed, "run_name": run_name, "solved": solved, "steps": summary.get("goal_reached_step"),
            "seconds": summary.get("goal_reached_s"), "eval_mean": summary.get("final_eval_return") if solved else None,
            "process_wall_s": wall_s, "summary": summary}


def solve_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How many solved; the median and range of steps and seconds over the solved seeds."""
    solved = [r for r in results if r["solved"]]
    summary: dict[str, Any] = {"seeds": len(results), "solved": len(solved)}
    for key in ("steps", "seconds"):
        values = [r[key] for r in solved]
        for name, f in (("median", statistics.median), ("min", min), ("max", max)):
            summary[f"{name}_{key}"] = f(values) if values else None
    return summary


@dataclass
class CartpoleSolve:
    """dqn_cartpole.py's time to --goal-score per seed (flags after -- go to it) -> results/cartpole_solve.json."""

    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)  # the seeds, run one after another
    goal_score: float = 475.0  # the evaluation mean that counts as solved (CartPole-v1's reward threshold)
    cuda: bool = False  # run on the GPU
    out_dir: Path = RESULTS_DIR  # where the JSON goes, and the runs/ and logs
    script_flags: tyro.conf.Positional[tuple[str, ...]] = ()  # dqn_cartpole.py's flags, after --

    def run(self) -> None:
        pick_device(self.cuda)
        tag, workdir, results = timestamp_tag("solve"), self.out_dir / "cartpole_solve", []
        for seed in self.seeds:
            run_name = run_name_for("CartPole-v1", CARTPOLE_SCRIPT, seed, tag)
            flags = ["--seed", str(seed), "--run-name", run_name, "--goal-score", str(self.goal_score),
                     "--cuda" if self.cuda else "--no-cuda", *self.script_flags]
            wall_s = run_script(CARTPOLE_SCRIPT, flags, workdir, workdir / "logs" / f"{run_name}.log")
            results.append(solve_result(seed, run_name, wall_s, read_summary(workdir / "runs" / run_name)))
        summary = solve_summary(results)
        print(f"\ndqn_cartpole.py to a greedy evaluation mean >= {self.goal_score} (defaults"
              + (f" plus {' '.join(self.script_flags)}" if self.script_flags else "") + "):")
        print(format_table(["seed", "solved", "steps", "seconds", "process s", "best eval"],
                           [[r["seed"], "yes" if r["solved"] else "not solved", r["steps"], r["seconds"],
                             r["process_wall_s"], r["summary"].get("best_eval_return")] for r in results], digits=1))
        median = (f"; median over solved seeds: {summary['median_steps']:,.0f} steps, {summary['median_seconds']:.1f} s"
                  if summary["solved"] else "")
        print(f"solved {summary['solved']}/{summary['seeds']} seeds{median}")
        references = ["cleanrl_cartpole_steps", "cleanrl_cartpole_seconds"]
        steps, secs = (REFERENCES[k] for k in references)
        print(f"reference: CleanRL dqn.py ~{steps.value:,.0f} steps, ~{secs.value:.0f} s ({steps.source}; "
              f"{steps.note})")
        write_json(self.out_dir / "cartpole_solve.json",
                   {"config": {k: v for k, v in asdict(self).items() if k != "out_dir"}, "results": results,
                    "summary": summary, "references": references_json(references)})


COMMANDS = {"sps": Sps, "update-cost": UpdateCost, "memory": Memory, "cartpole-solve": CartpoleSolve}

if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict(COMMANDS).run()
