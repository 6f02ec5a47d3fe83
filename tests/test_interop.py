"""CleanRL interop, both ways, with files written the way CleanRL writes them. `--save-model` writes a bare
`q_network.state_dict()` that CleanRL's own QNetwork loads; `--play` plays a bare state_dict saved from CleanRL's
QNetwork (its `.cleanrl_model` files and the `q_network.pth` files it publishes), reading the action count (and the
MLP's widths) from the weights, and refuses one that does not fit the env in one line, exit 2."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import load_script, run_main


class CleanRLAtariQNetwork(nn.Module):
    """cleanrl/dqn_atari.py's QNetwork as published (its `env` argument replaced by the action count)."""

    def __init__(self, n_actions):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, n_actions),
        )

    def forward(self, x):
        return self.network(x / 255.0)


class CleanRLQNetwork(nn.Module):
    """cleanrl/dqn.py's QNetwork as published (its `env` argument replaced by the sizes)."""

    def __init__(self, obs_dim, n_actions):
        super().__init__()
        self.network = nn.Sequential(nn.Linear(obs_dim, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                     nn.Linear(84, n_actions))

    def forward(self, x):
        return self.network(x)


TINY_ATARI = ["--learning-starts", 10, "--total-timesteps", 16, "--buffer-size", 10, "--batch-size", 4,
              "--eval-episodes", 1, "--max-episode-frames", 400]
TINY = {"dqn_cartpole": ["--learning-starts", 100, "--total-timesteps", 300, "--eval-episodes", 1,
                         "--hidden-sizes", 120, 84],  # CleanRL's MLP widths
        "dqn_atari": TINY_ATARI, "dqn_atari_dueling_per": TINY_ATARI}


@pytest.mark.parametrize("script", list(TINY))
def test_save_model_writes_a_bare_state_dict_that_cleanrls_network_loads(script, tmp_path):
    result = run_main(script, *TINY[script], "--save-model", "--run-name", "m", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = torch.load(tmp_path / f"runs/m/{script}.cleanrl_model")  # as cleanrl_utils/evals/dqn_eval.py loads it
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    ours = torch.load(tmp_path / "runs/m/checkpoint.pt", weights_only=True)["model"]  # the trained weights
    if script == "dqn_cartpole":
        cleanrl, x = CleanRLQNetwork(4, 2), torch.randn(5, 4)
    elif script == "dqn_atari":
        cleanrl, x = CleanRLAtariQNetwork(4), torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    else:  # CleanRL has no dueling network: the script's own class loads the bare file
        cleanrl, x = load_script(script).QNetwork(4), torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    cleanrl.load_state_dict(saved)  # strict: same keys, same shapes
    module = load_script(script)
    mine = module.QNetwork(4, 2, (120, 84)) if script == "dqn_cartpole" else module.QNetwork(4)
    mine.load_state_dict(ours)
    with torch.no_grad():
        assert torch.equal(cleanrl(x), mine(x))


def play_in_process(script, path, monkeypatch, **overrides):
    """Runs the script's --play in this process with evaluate() replaced: returns the network it would evaluate."""
    module = load_script(script)
    played = []

    def fake_evaluate(q_network, *args, **kwargs):
        played.append(q_network)
        return (np.zeros(2), np.zeros(2)) if script != "dqn_cartpole" else np.zeros(2)

    monkeypatch.setattr(module, "evaluate", fake_evaluate)
    module.main(module.Args(play=str(path), eval_episodes=2, cuda=False, **overrides))
    return played[0]


@pytest.mark.parametrize("script", ["dqn_cartpole", "dqn_atari"])
def test_play_takes_the_weights_of_a_state_dict_saved_from_cleanrls_network(script, tmp_path, monkeypatch):
    torch.manual_seed(0)
    if script == "dqn_cartpole":
        cleanrl, x, env = CleanRLQNetwork(4, 2), torch.randn(5, 4), {"env_id": "CartPole-v1"}
    else:
        cleanrl, x, env = CleanRLAtariQNetwork(4), torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8), {}
    path = tmp_path / "q_network.pth"
    torch.save(cleanrl.state_dict(), path)  # as CleanRL saves and publishes its models
    played = play_in_process(script, path, monkeypatch, **env)
    assert played.state_dict().keys() == cleanrl.state_dict().keys()
    assert all(torch.equal(played.state_dict()[k], v) for k, v in cleanrl.state_dict().items())
    with torch.no_grad():  # the same function (up to the rounding of channels-last convolutions)
        assert torch.allclose(played(x), cleanrl(x), atol=1e-6)
    if script == "dqn_cartpole":  # the MLP's widths come from the weights
        assert [m.out_features for m in played.network if isinstance(m, nn.Linear)] == [120, 84, 2]


@pytest.mark.parametrize("script", ["dqn_cartpole", "dqn_atari", "dqn_atari_dueling_per"])
def test_play_refuses_a_state_dict_for_another_action_count_in_one_line(script, tmp_path, monkeypatch, capsys):
    if script == "dqn_cartpole":
        network, env = CleanRLQNetwork(4, 3), {"env_id": "CartPole-v1"}
    elif script == "dqn_atari":
        network, env = CleanRLAtariQNetwork(6), {}  # a Pong network; Breakout has 4 actions
    else:
        network, env = load_script(script).QNetwork(6), {}
    path = tmp_path / "q_network.pth"
    torch.save(network.state_dict(), path)
    with pytest.raises(SystemExit) as exit_info:
        play_in_process(script, path, monkeypatch, **env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained on an unnamed" in err and "pass the --env-id it was" in err


def test_play_refuses_a_state_dict_of_another_network_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "q_network.pth"
    torch.save(CleanRLAtariQNetwork(4).state_dict(), path)  # the Nature CNN, given to the dueling script
    with pytest.raises(SystemExit) as exit_info:
        play_in_process("dqn_atari_dueling_per", path, monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another network" in err


def test_a_cleanrl_model_plays_end_to_end(tmp_path):
    torch.save(CleanRLAtariQNetwork(4).state_dict(), tmp_path / "q_network.pth")
    played = run_main("dqn_atari", "--play", tmp_path / "q_network.pth", "--eval-episodes", 2, "--eval-epsilon",
                        0.5, "--max-episode-frames", 800, "--no-cuda", cwd=tmp_path)
    assert played.returncode == 0, played.stderr
    assert "2 episodes of" in played.stdout and "mean return" in played.stdout
