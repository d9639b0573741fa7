"""The proxy: a short MaskablePPO run, save/load, resume, evaluation, CLI and bad configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from agents.configs import ChoiceTrainConfig, ProxyConfig, TrainConfig
from agents.evaluate import evaluate_agent
from agents.proxy import train
from agents.sb3_agent import load_proxy
from benchmarks.bench.config import load_suite_config
from llm_envs.config import ConfigError, load_config, to_dict
from llm_envs.envs.params import TokenAcceptParams, TokenChoiceParams
from llm_envs.envs.token_accept import TokenAcceptCore
from llm_envs.envs.token_choice import TokenChoiceCore
from llm_envs.task import Task


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _task(test_world) -> Task:
    return Task(lm=str(test_world.lm_dir), reward=str(test_world.rm_dir), train_prompts=test_world.train_prompts[:300],
                eval_prompts=test_world.test_prompts[:16], max_new_tokens=16, device="cpu")


def _config(test_world, tmp_path: Path, **overrides) -> TrainConfig:
    proxy = ProxyConfig(hidden_sizes=(32, 32), n_steps=32, batch_size=64, n_epochs=2)
    base = dict(env=TokenAcceptParams(max_new_tokens=16), proxy=proxy, num_envs=4, total_timesteps=256,
                eval_episodes=8, output_dir=str(tmp_path / "run"), wandb_mode="disabled", progress_bar=False)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(test_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    cfg = _config(test_world, tmp, checkpoint_freq=32)
    return cfg, train(cfg, _task(test_world))


def test_training_writes_model_config_logs_and_checkpoints(trained, test_world):
    cfg, path = trained
    run = Path(cfg.output_dir)
    assert path == run / "proxy.zip" and path.is_file()
    assert load_config(TrainConfig, run / "config.yaml", section="train") == cfg  # the resolved config round-trips
    assert load_config(Task, run / "config.yaml", section="task") == _task(test_world)  # with the task it learned
    assert list((run / "checkpoints").glob("proxy_*_steps.zip"))
    progress = (run / "logs" / "progress.csv").read_text()
    for column in ("rollout/reward_model", "rollout/rejection_rate", "rollout/forced_accepts",
                   "rollout/deviation_nats", "rollout/response_len", "time/env_steps_per_s"):
        assert column in progress


def test_save_then_load_gives_identical_deterministic_actions(trained, test_world):
    from sb3_contrib import MaskablePPO

    cfg, path = trained
    core = TokenAcceptCore(2, params=cfg.env, **_task(test_world).resolve().env_kwargs(test_world.test_prompts[:4]))
    agent = load_proxy(path, core.observation_space, device="cpu")
    again = MaskablePPO.load(path, device="cpu")
    obs = np.random.default_rng(0).normal(size=(64, core.observation_space.shape[0])).astype(np.float32)
    masks = np.ones((64, 2), dtype=bool)
    masks[::3, 1] = False
    actions = agent.predict(obs, masks)
    assert (actions == again.predict(obs, action_masks=masks, deterministic=True)[0]).all()
    assert (actions[::3] == 0).all()  # masked rejects are never chosen


def test_resume_continues_from_the_last_checkpoint(trained, test_world, tmp_path):
    import shutil

    cfg, _ = trained
    run = tmp_path / "resumed"
    shutil.copytree(cfg.output_dir, run)
    longer = _config(test_world, tmp_path, output_dir=str(run), total_timesteps=384, checkpoint_freq=32)
    from sb3_contrib import MaskablePPO

    final = train(longer, _task(test_world))
    assert MaskablePPO.load(final, device="cpu").num_timesteps >= 384


def test_evaluate_summarises_greedy_and_the_proxy(trained, test_world):
    cfg, path = trained
    greedy = evaluate_agent(_task(test_world), cfg.env, "greedy", num_envs=4)
    proxy = evaluate_agent(_task(test_world), cfg.env, f"proxy:{path}", num_envs=4)
    for summary in (greedy, proxy):
        assert summary["episodes"] == 16
        assert np.isfinite(summary["reward_mean"]) and summary["response_len"] > 0
    assert greedy["rejection_rate"] == 0.0 and proxy["trainable_params"] > 0


def test_a_checkpoint_with_another_observation_size_fails_clearly(trained, test_world):
    cfg, path = trained
    core = TokenAcceptCore(1, params=cfg.env, obs_mode="prefix",
                           **_task(test_world).resolve().env_kwargs(test_world.test_prompts[:2]))
    with pytest.raises(ValueError, match="expects observations of shape"):
        load_proxy(path, core.observation_space)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_proxy(Path(cfg.output_dir) / "nope.zip", core.observation_space)


def test_a_token_accept_proxy_on_token_choice_fails_clearly(trained, test_world):
    """k=4 gives TokenChoice the proxy's observation size (H + k + 1 = H + 5): only the action space
    tells the two envs apart."""
    cfg, path = trained
    core = TokenChoiceCore(1, k=4, max_new_tokens=16, **_task(test_world).resolve().env_kwargs(test_world.test_prompts[:2]))
    with pytest.raises(ValueError, match=r"acts in Discrete\(2\).*Discrete\(4\)"):
        load_proxy(path, core.observation_space, action_space=core.action_space)


def test_the_token_choice_config_shares_the_proxy_settings():
    train_cfg = TrainConfig(env=TokenAcceptParams(max_new_tokens=16, p_t=0.001), num_envs=3, seed=7,
                            proxy=ProxyConfig(hidden_sizes=(8,)))
    choice = ChoiceTrainConfig.like(train_cfg, 16, k=5, obs_rewards=True)
    assert choice.env == TokenChoiceParams(max_new_tokens=16, k=5, obs_rewards=True)
    assert (choice.num_envs, choice.seed, choice.proxy) == (3, 7, train_cfg.proxy)
    assert (TrainConfig.env_id, ChoiceTrainConfig.env_id) == ("llm_envs/TokenAccept-v0", "llm_envs/TokenChoice-v0")
    with pytest.raises(ConfigError, match="Did you mean 'obs_rewards'"):
        load_config(ChoiceTrainConfig, None, ["env.obs_reward=true"])


def test_a_run_made_before_a_config_field_existed_resumes_at_its_default():
    from agents.run_dir import config_differences

    new = {"train": to_dict(TrainConfig())}
    old = {"train": {**new["train"], "env": {k: v for k, v in new["train"]["env"].items() if k != "decision_mask"}}}
    defaults = {"train": to_dict(TrainConfig())}
    assert config_differences(old, new, (), defaults) == []
    assert config_differences(old, new, ()) == ["train.env.decision_mask"]  # without defaults: a difference
    moved = {"train": {**new["train"], "env": {**new["train"]["env"], "decision_mask": "confidence"}}}
    assert config_differences(old, moved, (), defaults) == ["train.env.decision_mask"]  # not the default


def test_cli_trains_and_evaluates_end_to_end(test_world, tmp_path, capsys):
    from benchmarks.cli import main

    cfg_file = tmp_path / "c.yaml"  # a file of one's own: the task and the train: section are enough
    cfg_file.write_text(yaml.safe_dump({
        "task": {"lm": str(test_world.lm_dir), "reward": str(test_world.rm_dir),
                 "train_prompts": test_world.train_prompts[:100], "eval_prompts": test_world.test_prompts[:8],
                 "max_new_tokens": 12, "device": "cpu"},
        "train": {"proxy": {"hidden_sizes": [16], "n_steps": 16, "batch_size": 32, "n_epochs": 1},
                  "num_envs": 2, "total_timesteps": 64, "eval_episodes": 4, "output_dir": str(tmp_path / "cli"),
                  "wandb_mode": "disabled", "progress_bar": False}}))
    assert main(["train", "--config", str(cfg_file), "train.seed=3"]) == 0
    assert (tmp_path / "cli" / "proxy.zip").is_file()
    capsys.readouterr()
    assert main(["eval", "--config", str(cfg_file), "--agent", f"proxy:{tmp_path / 'cli' / 'proxy.zip'}", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["episodes"] == 8 and "reward_mean" in summary


def test_bad_configs_fail_clearly(tmp_path, capsys):
    from benchmarks.cli import main

    with pytest.raises(ConfigError, match="Did you mean 'total_timesteps'"):
        load_config(TrainConfig, None, ["total_timestep=5"])
    with pytest.raises(ConfigError, match="Did you mean 'p_t'"):
        load_config(TrainConfig, None, ["env.pt=0.1"])
    with pytest.raises(ConfigError, match="p_t"):
        load_config(TrainConfig, None, ["env.p_t=1.5"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(TrainConfig, None, ["num_envs=many"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    assert main(["train", "--config", "tiny", "train.proxy.activaton=relu"]) == 2
    assert "Did you mean 'activation'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="differs from task.max_new_tokens"):
        train(TrainConfig(env=TokenAcceptParams(max_new_tokens=8)), Task(max_new_tokens=16))
    with pytest.raises(ValueError, match=r"num_envs=6 is not divisible by num_workers=4"):
        TrainConfig(num_envs=6, num_workers=4)
    with pytest.raises(ConfigError, match=r"num_workers=-1; expected 0 \(one local core\) or K >= 1"):
        load_config(TrainConfig, None, ["num_workers=-1"])


def test_a_run_may_resume_with_another_number_of_ray_workers(tmp_path):
    """Ray workers hold the same rows as one local core (tests/test_ray_env.py), so num_workers is a
    run-only setting, as torch_threads: a resume may change it; a run made before it existed resumes."""
    from agents.proxy import run_config
    from agents.run_dir import claim_run_dir

    run, cfg = tmp_path / "run", TrainConfig(output_dir=str(tmp_path / "run"))
    defaults = {"train": to_dict(TrainConfig()), "task": to_dict(Task())}
    old = run_config(cfg, Task())
    del old["train"]["num_workers"]  # a run made before the field
    claim_run_dir(run, old)
    claim_run_dir(run, run_config(cfg, Task()), defaults=defaults)
    claim_run_dir(run, run_config(dataclasses.replace(cfg, num_workers=2), Task()), defaults=defaults)


def test_the_shipped_tiny_config_is_valid():
    cfg = load_suite_config("tiny").train
    assert cfg.proxy.hidden_sizes == (2048, 2048) and cfg.proxy.learning_rate == 3e-4


# ---------------------------------------------------------------------------- interrupts and resumes


def test_a_truncated_checkpoint_is_skipped_on_resume(trained, test_world, tmp_path, capsys):
    """A checkpoint cut to half its bytes (a kill mid-write) does not block the resume: the newest
    checkpoint that loads is used, and the skipped one is named."""
    import shutil

    from sb3_contrib import MaskablePPO

    cfg, _ = trained
    run = tmp_path / "torn"
    shutil.copytree(cfg.output_dir, run)
    (run / "proxy.zip").unlink()  # as if the run was killed before its final save
    newest = max((run / "checkpoints").glob("proxy_*_steps.zip"), key=lambda p: int(p.stem.split("_")[-2]))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    final = train(_config(test_world, tmp_path, output_dir=str(run), total_timesteps=384, checkpoint_freq=32),
                  _task(test_world))
    err = capsys.readouterr()
    assert f"skipping checkpoint {newest}" in err.err and "resuming from" in err.out
    assert MaskablePPO.load(final, device="cpu").num_timesteps >= 384


def test_metrics_rows_survive_resumes(trained, test_world, tmp_path):
    """progress.csv is appended across resumes: the first run's rows stay, the header appears once."""
    import csv
    import shutil

    cfg, _ = trained
    run = tmp_path / "csv"
    shutil.copytree(cfg.output_dir, run)
    before = list(csv.reader((run / "logs" / "progress.csv").open()))
    train(_config(test_world, tmp_path, output_dir=str(run), total_timesteps=512, checkpoint_freq=32),
          _task(test_world))
    after = list(csv.reader((run / "logs" / "progress.csv").open()))
    assert len(before) >= 2 and len(after) > len(before)
    assert [row[: len(before[0])] for row in after[: len(before)]] == before  # earlier rows kept, in place
    assert sum(row[:1] == before[0][:1] for row in after) == 1  # one header


def test_resuming_under_another_config_is_refused_and_restart_moves_the_run_aside(trained, test_world, tmp_path):
    import shutil

    cfg, _ = trained
    run = tmp_path / "changed"
    shutil.copytree(cfg.output_dir, run)
    bigger = _config(test_world, tmp_path, output_dir=str(run), proxy=ProxyConfig(hidden_sizes=(64, 64), n_steps=32,
                                                                                  batch_size=64, n_epochs=2))
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train.proxy.hidden_sizes: \[32, 32\] -> \[64, 64\].*--restart"):
        train(bigger, _task(test_world))
    assert (run / "config.yaml").read_text() == saved  # the record of the old run is untouched
    with pytest.raises(ConfigError, match="task.max_new_tokens"):
        train(_config(test_world, tmp_path, output_dir=str(run), env=TokenAcceptParams(max_new_tokens=8)),
              dataclasses.replace(_task(test_world), max_new_tokens=8))
    final = train(dataclasses.replace(bigger, total_timesteps=64), _task(test_world), restart=True)
    assert final.is_file()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("changed.old-")]
    assert len(aside) == 1 and (aside[0] / "proxy.zip").is_file()  # moved, never deleted
    assert load_config(TrainConfig, run / "config.yaml", section="train").proxy.hidden_sizes == (64, 64)
