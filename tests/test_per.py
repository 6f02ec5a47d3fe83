"""dqn_atari_dueling_per.py: the sum tree, prioritized sampling and importance weights, the dueling head and the
double target. (Env, replay stacks and smoke runs are shared with dqn_atari.py in test_atari.py.)"""

import copy

import numpy as np
import pytest
import torch

from helpers import load_script

per = load_script("dqn_atari_dueling_per")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
# (replay storage, learner): all on the CPU, all on the GPU, host storage feeding a GPU learner (--no-buffer-on-gpu)
PLACEMENTS = [("cpu", "cpu"), pytest.param("cuda", "cuda", marks=NEEDS_CUDA),
              pytest.param("cpu", "cuda", marks=NEEDS_CUDA)]


@pytest.mark.parametrize("device", DEVICES)
def test_root_is_the_sum_of_leaves_after_random_batch_updates(device):
    torch.manual_seed(0)
    tree = per.SumTree(1000, torch.device(device))
    assert tree.size == 1024
    for _ in range(200):
        indices = torch.randint(1000, (64,), device=device)  # duplicates included
        tree.set(indices, torch.rand(64, dtype=torch.float64, device=device) * 10)
    leaves = tree.sums[tree.size:]
    assert torch.allclose(tree.sums[1], leaves.sum(), rtol=1e-12)
    assert tree.mins[1] == leaves[leaves > 0].min()
    # every internal node is the sum (and min) of its children
    parents = torch.arange(1, tree.size, device=device)
    assert torch.allclose(tree.sums[parents], tree.sums[2 * parents] + tree.sums[2 * parents + 1], rtol=1e-12)
    assert torch.equal(tree.mins[parents], torch.minimum(tree.mins[2 * parents], tree.mins[2 * parents + 1]))


def test_duplicate_indices_in_one_update_count_once():
    tree = per.SumTree(8, torch.device("cpu"))
    tree.set(torch.arange(8), torch.ones(8, dtype=torch.float64))
    tree.set(torch.tensor([3, 3, 3, 5]), torch.tensor([4.0, 4.0, 4.0, 2.0], dtype=torch.float64))
    assert tree.sums[1] == 6 * 1 + 4 + 2  # an increment-based tree would count leaf 3 three times
    tree.set(torch.tensor([0, 0]), torch.tensor([0.0, 0.0], dtype=torch.float64))
    assert tree.sums[1] == 11 and tree.mins[1] == 1  # a zero leaf is not a transition: not the minimum


def test_sampling_frequencies_match_priorities():
    torch.manual_seed(123)
    tree = per.SumTree(10, torch.device("cpu"))
    priorities = torch.tensor([1.0, 0, 2, 3, 0.5, 0, 8, 1, 0.25, 4.25], dtype=torch.float64)  # total 20
    tree.set(torch.arange(10), priorities)
    draws = torch.cat([tree.sample(32) for _ in range(5000)])  # stratified batches of 32, 160k draws
    counts = torch.bincount(draws, minlength=tree.size).double()
    assert counts[10:].sum() == 0 and counts[:10][priorities == 0].sum() == 0  # padding, zero leaves: never drawn
    expected = priorities / priorities.sum() * len(draws)
    nonzero = priorities > 0
    chi2 = (((counts[:10] - expected) ** 2)[nonzero] / expected[nonzero]).sum().item()
    assert chi2 < 26.1  # chi-square, 7 degrees of freedom, p = 0.0005


def test_stratified_sampling_spreads_a_batch_over_the_mass():
    tree = per.SumTree(4, torch.device("cpu"))
    tree.set(torch.arange(4), torch.ones(4, dtype=torch.float64))
    for _ in range(20):  # one draw in each quarter of the mass: every leaf exactly once
        assert sorted(tree.sample(4).tolist()) == [0, 1, 2, 3]


def make_buffer(td_errors: list[float], alpha=0.6, eps=1e-6):
    """A buffer with one env whose transitions have known priorities (the first slot is a game's first frame)."""
    n = len(td_errors)
    rb = per.ReplayBuffer(n + 1, 1, torch.device("cpu"), torch.device("cpu"), 0.99, alpha=alpha, eps=eps)
    frames = np.zeros((1, 84, 84), dtype=np.uint8)
    rb.add(frames, *np.zeros((4, 1)), np.ones(1, dtype=bool))
    for _ in range(n):
        rb.add(frames, *np.zeros((4, 1)), np.zeros(1, dtype=bool))
    rb.update_priorities(torch.arange(1, n + 1), torch.tensor(td_errors))
    return rb


def test_new_transitions_get_the_max_priority_and_firsts_get_none():
    rb = make_buffer([0.5, 2.0, 1.0])
    assert rb.tree.leaves(torch.tensor([0])).item() == 0  # the first frame of a game
    frames = np.zeros((1, 84, 84), dtype=np.uint8)
    rb.add(frames, *np.zeros((4, 1)), np.zeros(1, dtype=bool))
    newest = (rb.pos - 1) % rb.per_env
    assert rb.tree.leaves(torch.tensor([newest])).item() == pytest.approx((2.0 + 1e-6) ** 0.6)


def test_importance_weights_match_a_hand_computation():
    td = [0.5, 2.0, 1.0, 4.0]
    rb = make_buffer(td, alpha=0.6, eps=1e-6)
    p = (np.array(td) + 1e-6) ** 0.6  # priorities of slots 1..4
    P = p / p.sum()
    N = len(td)
    max_w = (N * P.min()) ** -0.5  # from the smallest priority in the buffer, not in the batch
    torch.manual_seed(0)
    batch = rb.sample(64, beta=0.5)
    for index, weight in zip(batch.indices.tolist(), batch.weights.tolist()):
        assert weight == pytest.approx((N * P[index - 1]) ** -0.5 / max_w, rel=1e-6)
    assert 0 not in batch.indices.tolist()
    assert max(batch.weights.tolist()) <= 1.0


def test_oldest_slots_of_a_full_ring_are_never_sampled():
    rb = per.ReplayBuffer(8, 1, torch.device("cpu"), torch.device("cpu"), 0.99)
    frames = np.zeros((1, 84, 84), dtype=np.uint8)
    for _ in range(20):  # wraps: the 4 oldest slots miss frames of their obs stack
        rb.add(frames, *np.zeros((4, 1)), np.zeros(1, dtype=bool))
    oldest = [(rb.pos + k) % rb.per_env for k in range(4)]
    assert rb.tree.leaves(torch.tensor(oldest)).eq(0).all()
    drawn = set(rb.sample(4096, beta=0.4).indices.tolist())
    assert drawn == set(range(8)) - set(oldest)


def test_beta_anneals_up_from_beta0_to_1():
    assert per.linear_schedule(0.4, 1.0, 1000, 0) == 0.4
    assert per.linear_schedule(0.4, 1.0, 1000, 500) == pytest.approx(0.7)
    assert per.linear_schedule(0.4, 1.0, 1000, 1000) == 1.0
    assert per.linear_schedule(0.4, 1.0, 1000, 5000) == 1.0


def test_dueling_head_advantages_have_zero_mean():
    torch.manual_seed(0)
    q = per.QNetwork(n_actions=6)
    x = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        features = q.network(x / 255.0)
        value = q.value(features).squeeze(1)
        q_values = q(x)
    # mean_a Q(s, a) = V(s) because the advantages are centred
    assert torch.allclose(q_values.mean(dim=1), value, atol=1e-5)
    assert q_values.std(dim=1).min() > 0  # and the actions still differ


@pytest.mark.parametrize("storage, device", PLACEMENTS)
def test_priorities_follow_their_slots_through_every_wrap(storage, device):
    """End to end, 3 envs, 6 wraps of the ring: after every add each slot's priority is what an oracle says (0 for an
    unwritten slot, a game's first frame or the 4 oldest of a full ring; the max priority so far for a new
    transition; else its last written-back priority), a sampled batch holds the contents of the slots it names, and
    the priority written back for a batch row lands on that row's slot, at the next add (deferred, no host sync)."""
    num_envs, per_env, alpha, eps = 3, 10, 0.6, 1e-6
    rb = per.ReplayBuffer(num_envs * per_env, num_envs, torch.device(storage), torch.device(device), 0.99, alpha, eps)
    rng = np.random.default_rng(0)
    expected = np.zeros((num_envs, per_env))  # the oracle's priority per slot
    tags = np.full((num_envs, per_env), -1)  # what each slot holds: its action, unique per (step, env)
    firsts = np.zeros((num_envs, per_env), dtype=bool)
    max_priority, pending = 1.0, None
    torch.manual_seed(0)
    for t in range(6 * per_env + 3):
        if pending is not None:  # the last update, deferred until now
            idx, p = pending
            expected.reshape(-1)[idx] = p
            max_priority = max(max_priority, p.max())
        first = (rng.random(num_envs) < 0.15) | (t == 0)
        tag = t * num_envs + np.arange(num_envs)
        frames = np.broadcast_to((tag % 251).astype(np.uint8)[:, None, None], (num_envs, 84, 84)).copy()
        rb.add(frames, tag, tag - 7.5, np.zeros(num_envs), np.zeros(num_envs), first)
        pos = t % per_env
        tags[:, pos], firsts[:, pos] = tag, first
        expected[:, pos] = np.where(first, 0.0, max_priority)
        if t >= per_env - 1:  # full: the 4 oldest slots lost frames of their obs stack
            expected[:, [(pos + 1 + k) % per_env for k in range(4)]] = 0.0
        leaves = rb.tree.leaves(torch.arange(num_envs * per_env, device=storage)).cpu().numpy()
        np.testing.assert_allclose(leaves, expected.reshape(-1), rtol=1e-6)  # TD errors are float32
        assert rb.tree.sums[1].item() == pytest.approx(expected.sum(), rel=1e-6)
        if expected.sum() == 0:  # nothing to sample yet (every env's first slot is a game's first frame)
            pending = None
            continue
        batch = rb.sample(16, beta=0.5)
        assert batch.indices.device.type == storage and batch.weights.device.type == device
        idx = batch.indices.cpu().numpy()
        assert (expected.reshape(-1)[idx] > 0).all()  # only sampleable slots are drawn
        np.testing.assert_array_equal(batch.actions.cpu().numpy(), tags.reshape(-1)[idx])  # the slot's contents
        np.testing.assert_array_equal(batch.rewards.cpu().numpy(), np.sign(tags.reshape(-1)[idx] - 7.5))  # clipped
        assert (batch.next_observations[:, -1, 0, 0].cpu().numpy() == tags.reshape(-1)[idx] % 251).all()
        td = batch.actions * 0.01 - 0.2  # a TD error that depends on what the row holds: wrong slot, wrong value
        rb.update_priorities(batch.indices, td)
        np.testing.assert_array_equal(rb.tree.leaves(torch.arange(num_envs * per_env, device=storage)).cpu().numpy(),
                                      leaves)  # deferred: the tree is untouched until it is next used
        pending = (idx, (np.abs(tags.reshape(-1)[idx] * 0.01 - 0.2) + eps) ** alpha)
    state = rb.state_dict()  # applies the pending update before saving
    expected.reshape(-1)[pending[0]] = pending[1]
    np.testing.assert_allclose(state["sums"][rb.tree.size:][: num_envs * per_env].numpy(), expected.reshape(-1),
                               rtol=1e-6)


@pytest.mark.parametrize("name", ["dqn_atari", "dqn_atari_dueling_per"])
def test_adam_steps_follow_the_gradients_not_its_epsilon(name):
    """Adam's step is lr * m / (sqrt(v) + eps): with an eps near the gradients' RMS it shrinks to lr * g / eps and
    learning crawls. PER's importance weights (normalised by the smallest priority in the buffer, late in the run:
    beta 1) scale the loss down ~100x; with Hessel et al.'s eps 1.5e-4 that left 99.99% of the elements in eps's
    regime and made dqn_atari_dueling_per.py learn Breakout ~5x slower than dqn_atari.py (benchmarks/RESULTS.md).
    After 50 updates of each script's own train_step and default optimizer settings from a fresh network, on
    transitions whose TD errors span 1e-6 .. 1, most elements must be set by their gradients."""
    script = load_script(name)
    args = script.Args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 512
    prioritized = name == "dqn_atari_dueling_per"
    rb = script.ReplayBuffer(n + 1, 1, torch.device("cpu"), torch.device("cpu"), args.gamma)
    for i in range(n + 1):
        rb.add(rng.integers(0, 256, (1, 84, 84), dtype=np.uint8), rng.integers(0, 4, 1),
               (rng.random(1) < 0.05).astype(np.float32), np.zeros(1), np.zeros(1), np.array([i == 0]))
    if prioritized:
        rb.update_priorities(torch.arange(1, n + 1), torch.logspace(-6, 0, n, dtype=torch.float64))
    q_network = script.QNetwork(n_actions=4)
    target_network = copy.deepcopy(q_network)
    optimizer = script.make_optimizer(q_network, args)  # as main() builds it
    for _ in range(50):
        if prioritized:
            script.train_step(q_network, target_network, optimizer, rb, rb.sample(32, beta=1.0), args.max_grad_norm)
        else:
            script.train_step(q_network, target_network, optimizer, rb.sample(32))
    eps = optimizer.param_groups[0]["eps"]
    shares = []  # per element: the share of Adam's denominator that is the gradient's RMS, not eps
    for param in q_network.parameters():
        state = optimizer.state[param]
        rms = (state["exp_avg_sq"] / (1 - 0.999 ** state["step"])).sqrt()
        shares.append((rms / (rms + eps)).flatten())
    assert torch.cat(shares).median() > 0.5


def test_a_non_finite_td_error_keeps_the_slots_old_priority():
    """The run stops at the next check of its losses and saves its last good state: the tree saved with it must stay
    finite (a NaN leaf would make every later draw, and the resumed run, sample garbage)."""
    rb = make_buffer([0.5, 2.0, 1.0])
    before = rb.tree.leaves(torch.arange(1, 4)).clone()
    rb.update_priorities(torch.tensor([1, 2, 3]), torch.tensor([float("nan"), float("inf"), 3.0]))
    rb.apply_pending_priorities()
    leaves = rb.tree.leaves(torch.arange(1, 4))
    assert leaves[:2].tolist() == before[:2].tolist() and leaves[2].item() == pytest.approx((3.0 + 1e-6) ** 0.6)
    assert torch.isfinite(rb.tree.sums).all() and torch.isfinite(rb.max_priority)
