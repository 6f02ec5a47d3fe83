"""The fork recipes in forks/ still apply to dqn_atari.py and give working scripts: each patch is applied to a copy
with `git apply` (a recipe that no longer applies fails here), the patched script trains (gradient updates and
target syncs), and the n-step recipe's targets equal a hand-computed n-step return across a life loss, a truncation,
a game start and a first that no end precedes."""

import shutil
import subprocess

import numpy as np
import pytest
import torch

from helpers import ROOT, finished_counts, load_script, run_main

FORKS = {"huber": 1, "n_step": 2, "double_dqn": 1}  # recipe -> hunks (README, "Reading and forking a script")
SMOKE = ["--learning-starts", 400, "--total-timesteps", 1200, "--buffer-size", 800, "--num-envs", 4,
         "--train-frequency", 4, "--target-network-frequency", 200, "--eval-episodes", 2,
         "--max-episode-frames", 2000, "--eval-frequency", 0, "--exploration-fraction", 1.0, "--no-cuda"]


def apply_fork(name: str, directory) -> None:
    shutil.copy(ROOT / "dqn_atari.py", directory / "dqn_atari.py")
    patch = ROOT / "forks" / f"{name}.patch"
    result = subprocess.run(["git", "apply", "--verbose", str(patch)], cwd=directory, capture_output=True, text=True)
    assert result.returncode == 0, f"forks/{name}.patch no longer applies to dqn_atari.py:\n{result.stderr}"


@pytest.mark.parametrize("name", list(FORKS))
def test_a_fork_recipe_applies_with_its_hunks_and_trains(name, tmp_path):
    assert (ROOT / "forks" / f"{name}.patch").read_text().count("\n@@ ") == FORKS[name]
    apply_fork(name, tmp_path)
    assert (tmp_path / "dqn_atari.py").read_text() != (ROOT / "dqn_atari.py").read_text()
    result = run_main("dqn_atari", *SMOKE, "--run-name", "fork", cwd=tmp_path, root=tmp_path)
    assert result.returncode == 0, result.stderr
    assert finished_counts(tmp_path / "runs/fork") == {"steps": 1200, "updates": 200, "target_syncs": 4}


class NewestTag(torch.nn.Module):
    """Q(s, .) = (tag of the newest frame / 100, 0): a TD target shows the stack it bootstrapped from."""

    def forward(self, x):
        return torch.stack([x[:, -1, 0, 0].float() / 100, torch.zeros(len(x))], dim=1)


def test_n_step_targets_stop_at_a_life_loss_a_truncation_and_a_game_start(tmp_path):
    apply_fork("n_step", tmp_path)
    fork = load_script("dqn_atari", tmp_path)
    assert fork.HORIZON == 3
    gamma = 0.5
    # one env's stream, slot by slot: (reward, terminated, truncated, first); frame tag = slot number
    steps = [(0, 0, 0, 1),  # 0: a game's first frame
             (1, 0, 0, 0), (-3, 0, 0, 0), (1, 1, 0, 0),  # 1-3: a life lost at 3 (reward -3 is stored as -1)
             (0, 0, 0, 1),  # 4: the serve: a new life's first frame
             (1, 0, 0, 0), (7, 0, 0, 0), (1, 0, 1, 0),  # 5-7: truncated at 7 (7 is stored as 1)
             (0, 0, 0, 1),  # 8: the reset step: the next game's first frame
             (1, 0, 0, 0), (0, 0, 0, 0), (1, 0, 0, 0),  # 9-11
             (0, 0, 0, 1),  # 12: a first with no end before it (a new stream after --resume, a game over ale-py hid)
             (1, 0, 0, 0), (1, 1, 0, 0), (0, 0, 0, 0), (1, 0, 0, 0)]  # 13-16
    rb = fork.ReplayBuffer(32, 1, torch.device("cpu"), torch.device("cpu"), gamma)
    for slot, (reward, terminated, truncated, first) in enumerate(steps):
        rb.add(np.full((1, 84, 84), slot, dtype=np.uint8), np.array([slot % 2]), np.array([float(reward)]),
               np.array([bool(terminated)]), np.array([bool(truncated)]), np.array([bool(first)]))

    def expected(p):
        """The n-step target of the transition in slot p, by hand: (target, the slot it bootstraps from)."""
        ret = 0.0
        for k in range(3):
            reward, terminated, truncated, _ = steps[p + k]
            ret += gamma**k * np.sign(reward)
            if terminated:
                return ret, p + k
            if truncated or k == 2 or steps[p + k + 1][3]:
                return ret + gamma ** (k + 1) * (p + k) / 100, p + k
        raise AssertionError

    sampleable = [p for p in range(1, len(steps) - 2) if not steps[p][3]]  # slots 15-16 lack later steps
    assert sampleable == [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14]
    hand = {p: expected(p) for p in sampleable}
    assert hand[2] == (-1 + 0.5, 3) and hand[5] == (1 + 0.5 + 0.25 + 0.125 * 7 / 100, 7)  # life loss, truncation
    assert hand[7] == (1 + 0.5 * 7 / 100, 7) and hand[10] == (0 + 0.5 + 0.25 * 11 / 100, 11)  # a first follows 11
    assert hand[13] == (1 + 0.5, 14) and hand[9] == (1 + 0 + 0.25 + 0.125 * 11 / 100, 11)
    torch.manual_seed(0)
    batch = rb.sample(512)
    slots = batch.indices.tolist()
    assert set(slots) == set(sampleable)  # never a first, never a slot whose 3 steps are not all stored
    td_target, _, _ = fork.td_terms(NewestTag(), NewestTag(), batch)
    for i, p in enumerate(slots):
        target, bootstrap_slot = hand[p]
        assert td_target[i].item() == pytest.approx(target, abs=1e-6), p
        assert batch.next_observations[i, -1, 0, 0].item() == bootstrap_slot, p
        assert batch.observations[i, -1, 0, 0].item() == p - 1 and batch.actions[i].item() == p % 2
