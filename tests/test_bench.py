"""The benchmark suite: metrics against their formulas, the leaderboard against its records, and
`llm-envs bench` end to end on the test world (every method kind, a custom agent, a sweep)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.bench.config import load_suite_config
from agents.metrics import diversity, is_irregular, mean_ci95, rep_n, win_rate, words
from llm_envs.config import ConfigError
from llm_envs.world import gold_reward

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = "tiny"  # the shipped suite, by name


# ---------------------------------------------------------------------------- metrics


def test_diversity_is_the_args_formula():
    text = "sure , here is how : here is how ."
    tokens = words(text)
    assert tokens == ["sure", ",", "here", "is", "how", ":", "here", "is", "how", "."]
    # 2-grams: 9 in all, "here is" and "is how" repeat -> 7 unique; rep_2 = 1 - 7/10
    assert rep_n(tokens, 2) == pytest.approx(1 - 7 / 10)
    expected = (7 / 10) * (7 / 9) * (7 / 8)  # 3-grams: 8 total, 7 unique; 4-grams: 7 total, 7 unique
    assert diversity(text) == pytest.approx(expected)
    assert diversity("") == 0.0  # no n-grams at all, as in the reference code


def test_win_rate_counts_ties_half_and_ci_is_normal():
    out = win_rate([1.0, 0.5, 0.0, 0.2], [0.0, 0.5, 1.0, 0.1])
    assert (out["wins"], out["ties"], out["losses"]) == (2, 1, 1) and out["win_rate"] == pytest.approx(2.5 / 4)
    values = [1.0, 2.0, 3.0, 4.0]
    mean, half = mean_ci95(values)
    assert mean == 2.5 and half == pytest.approx(1.96 * np.std(values, ddof=1) / 2)
    with pytest.raises(ValueError, match="one reference score per prompt"):
        win_rate([1.0], [1.0, 2.0])


def test_irregular_outputs_are_repeats():
    assert is_irregular("the the steps are easy")
    assert is_irregular("first mix it . then mix it . then mix it .")
    assert not is_irregular("sure , first gather flour , water and yeast .")


# ---------------------------------------------------------------------------- config


def test_the_shipped_suite_config_and_its_quick_variant():
    cfg = load_suite_config(TINY)
    kinds = {m.kind for m in cfg.bench.methods}
    assert {"greedy", "top_k", "nucleus", "best_of_n", "args", "proxy", "rrhf"} <= kinds
    names = [m.name for m in cfg.bench.methods]
    assert {"best_of_16", "best_of_32", "args_greedy", "args_stochastic"} <= set(names)
    assert cfg.bench.sweep.p_t == (0.1, 0.01, 0.001, 0.0001) and cfg.bench.sweep.temperature == (0.25, 0.5, 0.75, 1.0)
    assert cfg.bench.seeds == (0,) and cfg.bench.sweep.best_of_n == (1, 2, 4, 8, 16, 32, 64)
    assert cfg.bench.sweep.args_w == (0, 0.5, 1, 1.5, 2, 3, 5, 8) and cfg.bench.sweep.args_k == 10
    quick = load_suite_config(TINY, ["bench.num_prompts=8"], quick=True)
    assert quick.bench.suite == "tiny-quick" and quick.bench.num_prompts == 8  # the command line wins
    assert quick.train.total_timesteps < cfg.train.total_timesteps


def test_the_real_model_config_is_valid():
    cfg = load_suite_config("hh_gpu")
    assert cfg.task.device == "cuda" and cfg.task.gold == "none" and cfg.task.lm == "openai-community/gpt2-large"
    assert cfg.train.env.max_new_tokens == cfg.task.max_new_tokens == 128  # the env's budget is the task's


def test_the_real_lm_suite_config_is_valid():
    cfg = load_suite_config("smollm2")
    assert cfg.task.world == "smollm2" and cfg.task.chat_template and cfg.task.lm is None  # the world's real LM
    assert cfg.task.uses_world_gold and cfg.rrhf.dataset_responses is None
    assert cfg.train.env.max_new_tokens == cfg.task.max_new_tokens == 48
    assert {"greedy", "top_k", "nucleus", "best_of_n", "args", "proxy", "rrhf"} <= {m.kind for m in cfg.bench.methods}
    quick = load_suite_config("smollm2", quick=True)
    assert quick.bench.suite == "smollm2-quick" and quick.bench.num_prompts == 16


def test_the_readme_leaderboard_is_the_generated_one():
    """The README shows the committed tiny leaderboard verbatim (regenerate with
    `llm-envs bench --out benchmarks/results`, then copy the table)."""
    root = Path(__file__).resolve().parents[1]
    generated = (root / "benchmarks" / "results" / "tiny" / "leaderboard.md").read_text()
    table = generated[generated.index("| method |"):].split("\n\n")[0]
    assert table in (root / "README.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("bench.num_prompt=3", "Did you mean 'num_prompts'"),
    ("bench.methods=[{name: a, kind: gredy}]", "Did you mean 'greedy'"),
    ("bench.methods=[{name: a, kind: greedy}, {name: a, kind: nucleus}]", "repeats the name"),
    ("bench.methods=[{name: a, kind: custom}]", "entry='module:Class' is required"),
    ("train.env.max_new_tokens=64", "differs from task.max_new_tokens=32"),
    ("bench.seeds=[0, 0]", r"bench.seeds=\[0, 0\]; expected distinct non-negative"),
    ("bench.methods=[{name: a, kind: nucleus, seeds: [-1]}]", "expected distinct non-negative"),
    ("bench.methods=[{name: p, kind: proxy, params: {seed: 3}}]", r"Write seeds: \[3\] instead"),
    ("bench.sweep.best_of_n=[0, 2]", "expected distinct positive ints"),
    ("bench.sweep.args_w=[1, 1]", "expected distinct finite weights"),
    ("task.gold=sometimes", "expected one of"),
    ("tsk.lm=gpt2", "Did you mean 'task'"),
])
def test_bad_suite_configs_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_suite_config(TINY, [override])


# ---------------------------------------------------------------------------- end to end on the test world

AGENT_MODULE = '''
import numpy as np

class RejectOnce:
    """A PolicyAgent: rejects the first proposal of every position where SKAM allows it."""
    name = "reject-once"
    trainable_params = 0

    def predict(self, obs, action_masks=None, deterministic=True):
        rejected_here = obs[:, -3]          # the env card's `rejections_here` feature
        return ((rejected_here == 0) & action_masks[:, 1]).astype(np.int64)
'''


def _suite_file(tmp: Path, test_world, world_cache: Path, methods: list[dict], **bench) -> Path:
    lm, rm = str(test_world.lm_dir), str(test_world.rm_dir)
    data = {
        "task": {"lm": lm, "reward": rm, "train_prompts": test_world.train_prompts[:200],
                 "eval_prompts": test_world.test_prompts[:24], "max_new_tokens": 10, "gold": "world", "device": "cpu"},
        "bench": {"suite": "t", "results_dir": str(tmp / "results"), "runs_dir": str(tmp / "runs"), "num_prompts": 10,
                  "batch_size": 4, "torch_threads": 1, "wandb_mode": "disabled", "progress": False,
                  "methods": methods, "sweep": {"p_t": [0.1, 0.001], "temperature": [0.5, 1.0], "total_timesteps": 64},
                  **bench},
        "train": {"proxy": {"hidden_sizes": [32, 32], "n_steps": 16, "batch_size": 32, "n_epochs": 1},
                  "num_envs": 4, "total_timesteps": 128, "eval_episodes": 4, "wandb_mode": "disabled",
                  "progress_bar": False},
        "rrhf": {"num_prompts": 8, "num_samples": 2, "max_new_tokens": 10, "epochs": 1, "queries_per_batch": 4,
                 "progress": False, "num_threads": 1},
    }
    path = tmp / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


METHODS = [
    {"name": "greedy", "kind": "greedy"},
    {"name": "nucleus", "kind": "nucleus", "params": {"top_p": 0.95}},
    {"name": "best_of_4", "kind": "best_of_n", "params": {"n": 4}},
    {"name": "args_greedy", "kind": "args", "params": {"k": 4, "w": 1.5}},
    {"name": "proxy", "kind": "proxy"},
    {"name": "rrhf", "kind": "rrhf"},
]


@pytest.fixture(scope="module")
def suite(test_world, world_cache, tmp_path_factory):
    from benchmarks.cli import main

    tmp = tmp_path_factory.mktemp("bench")
    config = _suite_file(tmp, test_world, world_cache, METHODS)
    assert main(["bench", "--config", str(config)]) == 0
    return config, tmp / "results" / "t"


def test_bench_writes_records_leaderboard_plots_and_provenance(suite, test_world):
    from llm_envs.models import load_causal_lm

    _, out = suite
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {r["method"]: r for r in board["rows"]}
    assert set(rows) == {m["name"] for m in METHODS}
    required = ("reward_mean", "reward_ci95", "gold_mean", "gold_win_rate_vs_greedy", "diversity", "coherence",
                "response_len", "lm_forwards_per_response", "rm_calls_per_response", "seconds_per_response",
                "trainable_params")
    for row in rows.values():
        assert all(k in row for k in required) and row["episodes"] == 10
        assert all(math.isfinite(row[k]) for k in required)
    prov = board["provenance"]
    assert prov["git_commit"] and prov["libraries"]["torch"] and prov["hardware"]["cpu_count"]
    assert (out / "config.yaml").is_file() and (out / "reward_distribution.png").stat().st_size > 10_000
    assert (out / "reward_vs_compute.png").is_file()
    # Costs each method is known to have.
    assert rows["greedy"]["gold_win_rate_vs_greedy"] == 0.5  # ties with itself on every prompt
    assert rows["greedy"]["lm_forwards_per_response"] == rows["greedy"]["response_len"]
    assert rows["best_of_4"]["rm_calls_per_response"] == 4 and rows["greedy"]["rm_calls_per_response"] == 0
    assert rows["args_greedy"]["rm_calls_per_response"] > 0
    assert rows["proxy"]["trainable_params"] > 0 and rows["proxy"]["train_seconds"] > 0
    proxy_extras = [e["extra"] for e in _records(out, "proxy")]  # decisions: steps where reject was legal
    assert rows["proxy"]["decisions_per_step"] == pytest.approx(np.mean([x["decisions"] / x["steps"]
                                                                         for x in proxy_extras]))
    assert rows["greedy"]["decisions_per_step"] is None  # a decoder plays no env
    lm_params = sum(p.numel() for p in load_causal_lm(test_world.lm_dir, device="cpu").parameters())
    assert rows["rrhf"]["trainable_params"] == lm_params  # RRHF tunes every weight of the LM
    assert rows["greedy"]["trainable_params"] == 0


def _records(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / "records" / f"{name}.jsonl").read_text().splitlines()]


def test_the_leaderboard_is_computed_from_the_records(suite, test_world):
    from llm_envs.rewards import RewardWrapper

    _, out = suite
    rows = {r["method"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    greedy = {e["index"]: e["gold"] for e in _records(out, "greedy")}
    reward = RewardWrapper.build(str(test_world.rm_dir), lm_tokenizer=None, device="cpu")
    for name, row in rows.items():
        episodes = _records(out, name)
        assert [e["index"] for e in episodes] == list(range(10))
        assert row["reward_mean"] == pytest.approx(np.mean([e["reward"] for e in episodes]))
        assert row["gold_mean"] == pytest.approx(np.mean([e["gold"] for e in episodes]))
        wins = sum((e["gold"] > greedy[e["index"]]) + 0.5 * (e["gold"] == greedy[e["index"]]) for e in episodes)
        assert row["gold_win_rate_vs_greedy"] == pytest.approx(wins / 10)
        assert row["diversity"] == pytest.approx(np.mean([diversity(e["response"]) for e in episodes]))
        # Every response was scored by the same reward wrapper and gold judge, from its text.
        first = episodes[:3]
        prompts, texts = [e["prompt"] for e in first], [e["response"] for e in first]
        assert [e["reward"] for e in first] == pytest.approx(reward.score(prompts, texts), abs=1e-4)
        assert [e["gold"] for e in first] == pytest.approx(gold_reward(prompts, texts))
    # The markdown table shows the same numbers, best gold first.
    table = (out / "leaderboard.md").read_text()
    ordered = sorted(rows.values(), key=lambda r: -r["gold_mean"])
    positions = [table.index(f"| {r['method']} | {r['gold_mean']:+.3f}") for r in ordered]
    assert positions == sorted(positions)


def test_a_rerun_from_scratch_gives_identical_quality_columns(suite, tmp_path):
    """The same suite config and seeds, rerun with fresh results and training directories, gives
    the same records (responses, reward, gold) for sampled and trained rows alike."""
    from benchmarks.cli import main

    config, out = suite
    data = yaml.safe_load(config.read_text())
    data["bench"].update(results_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"))
    rerun_config = tmp_path / "suite.yaml"
    rerun_config.write_text(yaml.safe_dump(data))
    names = ["nucleus", "proxy", "rrhf"]
    assert main(["bench", "--config", str(rerun_config), "--methods", ",".join(names)]) == 0
    fields = ("prompt", "response", "reward", "gold", "seed")
    for name in names:
        first = [{k: e[k] for k in fields} for e in _records(out, name)]
        again = [{k: e[k] for k in fields} for e in _records(tmp_path / "results" / "t", name)]
        assert again == first, name


def test_a_custom_agent_gets_its_row_and_the_others_keep_their_records(suite, test_world, world_cache, tmp_path,
                                                                        monkeypatch):
    from benchmarks.cli import main

    config, out = suite
    (tmp_path / "my_agents.py").write_text(AGENT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = yaml.safe_load(config.read_text())
    data["bench"]["methods"].append({"name": "reject_once", "kind": "custom", "entry": "my_agents:RejectOnce"})
    config.write_text(yaml.safe_dump(data))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    assert main(["bench", "--config", str(config), "--methods", "reject_once"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    assert all(after[name] == stamp for name, stamp in before.items())  # untouched
    rows = {r["method"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert len(rows) == len(METHODS) + 1
    episodes = _records(out, "reject_once")
    assert sum(e["extra"]["rejections"] for e in episodes) > 0  # it really played TokenAccept
    assert rows["reject_once"]["lm_forwards_per_response"] > rows["greedy"]["lm_forwards_per_response"]

    # Rebuilding from the records alone gives the same leaderboard.
    board = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert main(["bench", "--config", str(config), "--from-records"]) == 0
    assert json.loads((out / "leaderboard.json").read_text())["rows"] == board


CHOICE_METHODS = [
    {"name": "choice", "kind": "choice_proxy", "params": {"env": {"k": 4}}},
    {"name": "choice_rm", "kind": "choice_proxy", "params": {"env": {"k": 4, "obs_rewards": True}}},
]
GATED_PROXY = {"name": "proxy_entropy", "kind": "proxy",
               "params": {"env": {"decision_mask": "entropy", "entropy_threshold": 0.5}}}


def test_the_token_choice_agent_rows_train_evaluate_and_reuse_their_runs(suite, tmp_path):
    """MaskablePPO on TokenChoice-v0, without and with candidate rewards in the observation: trained
    like the proxy (the suite's train: section, a short run), played through PolicyDecoder, kept in run
    dirs keyed by their config so that a rerun reuses them; and a proxy with a gated decision mask as
    a plain `proxy` row. Own results folder: the shared leaderboard stays as the other tests expect it."""
    from benchmarks.bench.config import load_suite_config
    from benchmarks.bench.methods import train_proxy
    from benchmarks.cli import main

    config, _ = suite
    data = yaml.safe_load(config.read_text())
    data["bench"].update(methods=[*CHOICE_METHODS, GATED_PROXY], results_dir=str(tmp_path / "results"))
    own = tmp_path / "choice.yaml"
    own.write_text(yaml.safe_dump(data))
    assert main(["bench", "--config", str(own)]) == 0
    out = tmp_path / "results" / "t"
    rows = {r["method"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    metas = {name: json.loads((out / "records" / f"{name}.json").read_text()) for name in rows}
    runs = {name: meta["runs"][0] for name, meta in metas.items()}  # one seed each
    assert set(rows) == {"choice", "choice_rm", "proxy_entropy"}
    gated = rows.pop("proxy_entropy")
    assert 0 <= gated["decisions_per_step"] < 1 and gated["trainable_params"] > 0
    gated_dir = Path(metas["proxy_entropy"]["runs"][0]["info"]["run_dir"])
    assert yaml.safe_load((gated_dir / "config.yaml").read_text())["train"]["env"]["decision_mask"] == "entropy"
    for name, row in rows.items():
        assert row["episodes"] == 10 and row["kind"] == "choice_proxy"
        assert row["trainable_params"] > 0 and row["train_seconds"] > 0 and math.isfinite(row["gold_mean"])
        assert row["decisions_per_step"] == 1.0  # top_p=1: all k slots legal, every step is a choice
        episodes = _records(out, name)
        assert all("forced_actions" in e["extra"] for e in episodes)  # it played TokenChoice
        assert all(e["lm_forwards"] == e["response_len"] for e in episodes)  # prefill + one forward per token but the last
    assert rows["choice"]["rm_calls_per_response"] == 0
    # With candidate rewards: one batched RM call per position, billed to each row it scored (plus, once per
    # reward wrapper, the prefix cache's check against scoring from scratch).
    assert all(e["response_len"] <= e["rm_calls"] <= e["response_len"] + 1 for e in _records(out, "choice_rm"))
    assert (runs["choice"]["info"]["obs_rewards"], runs["choice_rm"]["info"]["obs_rewards"]) == (False, True)
    dirs = {name: Path(runs[name]["info"]["run_dir"]) for name in rows}
    assert dirs["choice"] != dirs["choice_rm"] and all(d.name.startswith("choice_proxy-") for d in dirs.values())
    saved = yaml.safe_load((dirs["choice_rm"] / "config.yaml").read_text())["train"]["env"]
    assert saved["obs_rewards"] is True and saved["k"] == 4
    # A rerun of the same config reuses the trained run (same dir, the recorded training time, no retraining).
    zip_stamp = (dirs["choice_rm"] / "proxy.zip").stat().st_mtime_ns
    cfg, path, seconds = train_proxy(load_suite_config(own), CHOICE_METHODS[1]["params"], kind="choice_proxy")
    assert path.parent == dirs["choice_rm"] and seconds == runs["choice_rm"]["train_seconds"]
    assert path.stat().st_mtime_ns == zip_stamp and cfg.env.obs_rewards


def test_records_and_the_leaderboard_carry_the_world_hash(test_world, world_cache, tmp_path, monkeypatch):
    """A task on the world records its hash: in the header, in each method's meta, in the markdown's
    first line (12 hex digits), and in the fingerprint, so records made on another build of the
    world are refused rather than mixed."""
    from benchmarks.bench import suite as suite_module
    from benchmarks.bench.leaderboard import write_leaderboard
    from llm_envs.world import World

    monkeypatch.setenv("LLM_ENVS_CACHE", str(world_cache))  # where the session built the test world
    cfg = load_suite_config(TINY, ["task.world=test", "task.device=cpu", "bench.num_prompts=2", "bench.progress=false",
                                   f"bench.results_dir={tmp_path}"])
    sc = suite_module.suite_context(cfg)
    assert sc.header["world_hash"] == test_world.hash
    suite_module.run_method(cfg, sc, cfg.bench.method("greedy"))
    meta = json.loads((cfg.results_path / "records" / "greedy.json").read_text())
    assert meta["world_hash"] == test_world.hash and meta["fingerprint"] == sc.fingerprint
    write_leaderboard(tmp_path, [], sc.header)
    first_line = (tmp_path / "leaderboard.md").read_text().split("\n")[2]
    assert f"world `{test_world.hash[:12]}`" in first_line
    assert json.loads((tmp_path / "leaderboard.json").read_text())["world_hash"] == test_world.hash

    monkeypatch.setattr(World, "hash", property(lambda self: "0" * 64))  # another build of the same preset
    other = suite_module.suite_context(cfg)
    assert other.header["world_hash"] == "0" * 64 and other.fingerprint != sc.fingerprint


def test_wandb_gets_the_table_and_plots_offline(suite, tmp_path):
    from benchmarks.cli import main

    config, _ = suite
    runs = tmp_path / "wb"
    assert main(["bench", "--config", str(config), "--from-records", "bench.wandb_mode=offline",
                 f"bench.runs_dir={runs}"]) == 0
    (run,) = (runs / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    assert list(media.glob("table/leaderboard_*.table.json"))
    assert {p.name.split("_0_")[0] for p in media.glob("images/plots/*.png")} == {"reward_distribution",
                                                                                 "reward_vs_compute"}


def test_a_partial_run_under_other_settings_is_refused_before_writing(suite, capsys):
    from benchmarks.cli import main

    config, out = suite
    before = {p.name: p.read_bytes() for p in (out / "records").iterdir()}
    assert main(["bench", "--config", str(config), "--methods", "greedy", "bench.num_prompts=6"]) == 2
    err = capsys.readouterr().err
    assert "made under other suite settings" in err and "nucleus" in err and "nothing was run" in err
    assert {p.name: p.read_bytes() for p in (out / "records").iterdir()} == before


def test_bad_method_entries_fail_clearly(suite, tmp_path, monkeypatch, capsys):
    from benchmarks.cli import main

    config, _ = suite
    data = yaml.safe_load(config.read_text())
    data["bench"]["methods"] = [{"name": "x", "kind": "custom", "entry": "no_such_module_here:X"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["bench", "--config", str(bad)]) == 2
    assert "cannot import module 'no_such_module_here'" in capsys.readouterr().err
    assert main(["bench", "--config", str(config), "--methods", "gredy"]) == 2
    assert "Did you mean 'greedy'" in capsys.readouterr().err
    (tmp_path / "not_an_agent.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data["bench"]["methods"] = [{"name": "x", "kind": "custom", "entry": "not_an_agent:Thing"}]
    bad.write_text(yaml.safe_dump(data))
    assert main(["bench", "--config", str(bad)]) == 2
    assert "has neither generate" in capsys.readouterr().err


def test_broken_user_files_are_one_line_errors_naming_the_file(suite, tmp_path, capsys):
    """A damaged config, records file or checkpoint: exit 2 and one line naming the file and the fix;
    the traceback only with --debug."""
    import shutil

    from benchmarks.cli import main

    config, out = suite
    broken = tmp_path / "broken.yaml"
    broken.write_text("task:\n  lm: [unclosed\n")
    assert main(["bench", "--config", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err and "not valid YAML at line" in err
    with pytest.raises(Exception):
        main(["--debug", "bench", "--config", str(broken)])
    copy = tmp_path / "copy"
    shutil.copytree(out, copy / "t")
    records = copy / "t" / "records" / "greedy.jsonl"
    records.write_text(records.read_text()[:-40])  # cut mid-line, as a crash would
    data = yaml.safe_load(config.read_text())
    data["bench"]["results_dir"] = str(copy)
    moved = tmp_path / "moved.yaml"
    moved.write_text(yaml.safe_dump(data))
    assert main(["bench", "--config", str(moved), "--from-records"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("llm-envs: error:")
    assert "greedy" in err and "damaged" in err and "--methods greedy" in err
    torn = tmp_path / "proxy.zip"
    torn.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["eval", "--config", str(config), "--agent", f"proxy:{torn}", "--num-prompts", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("llm-envs: error:")
    assert str(torn) in err.splitlines()[-1] and "does not load" in err


def test_the_p_t_sweep_trains_one_proxy_per_value(suite, capsys):
    from benchmarks.cli import main

    config, out = suite
    assert main(["bench", "--config", str(config), "--sweep", "pt"]) == 0
    sweep = json.loads((out / "sweep_p_t.json").read_text())
    assert [p["value"] for p in sweep["points"]] == [0.1, 0.001]
    assert all(0 <= p["rejection_rate"] <= 1 and 0 <= p["irregular_rate"] <= 1 for p in sweep["points"])
    assert all(p["total_timesteps"] == 64 for p in sweep["points"])
    assert (out / "sweep_p_t.png").is_file() and "| 0.001 |" in (out / "sweep_p_t.md").read_text()
    runs = {run["info"]["run_dir"] for meta in
            (json.loads(f.read_text()) for f in (out / "sweep_p_t" / "records").glob("proxy-*.json"))
            for run in meta["runs"]}
    assert len(runs) == 2  # a proxy of its own per value
    # A tagged variant keeps its own files; the untagged sweep stays as it was.
    before = (out / "sweep_p_t.json").read_text()
    assert main(["bench", "--config", str(config), "--sweep", "temperature", "bench.sweep.tag=v2",
                 "bench.sweep.seeds=[0, 1]"]) == 0
    points = json.loads((out / "sweep_temperature-v2.json").read_text())["points"]
    assert [p["value"] for p in points] == [0.5, 1.0] and all(p["episodes"] == 20 for p in points)  # 2 seeds pooled
    assert all(len(p["seed_gold_means"]) == 2 and p["gold_mean"] == pytest.approx(np.mean(p["seed_gold_means"]))
               and p["seed_gold_sd"] == pytest.approx(np.std(p["seed_gold_means"], ddof=1)) for p in points)
    assert (out / "sweep_temperature-v2.md").is_file() and (out / "sweep_p_t.json").read_text() == before


# ---------------------------------------------------------------------------- seeds, ranks, over-optimisation

SEEDED_METHODS = [
    {"name": "greedy", "kind": "greedy"},
    {"name": "nucleus", "kind": "nucleus", "params": {"top_p": 0.95}},            # bench.seeds: 3 runs
    {"name": "top_k", "kind": "top_k", "params": {"top_k": 5}, "seeds": [7]},     # its own seeds
    {"name": "args_greedy", "kind": "args", "params": {"k": 4, "w": 1.5}, "seeds": [4, 5]},  # deterministic
    {"name": "nucleus_p1", "kind": "nucleus", "params": {"top_p": 1.0}},
    {"name": "best_of_2", "kind": "best_of_n", "params": {"n": 2}},
    {"name": "proxy", "kind": "proxy", "seeds": [0, 1]},                           # two trained proxies
]


@pytest.fixture(scope="module")
def seeded(suite):
    """The suite's task with several seeds (6 prompts): records of every seed through `llm-envs bench`.
    Shares the suite's runs folder, so the proxy of seed 0 is the suite's (reused, not retrained)."""
    from benchmarks.cli import main

    config, _ = suite
    data = yaml.safe_load(config.read_text())
    data["bench"].update(suite="seeded", num_prompts=6, seeds=[0, 1, 2], methods=SEEDED_METHODS,
                         sweep={**data["bench"]["sweep"], "seeds": [0, 1, 2]})
    path = config.parent / "seeded.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["bench", "--config", str(path)]) == 0
    return path, config.parent / "results" / "seeded"


def _by_seed(episodes: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for e in episodes:
        out.setdefault(e["seed"], []).append(e)
    return out


def test_a_rows_seed_mean_equals_the_mean_of_its_seeds_records(seeded):
    _, out = seeded
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {r["method"]: r for r in board["rows"]}
    for name in ("nucleus", "proxy"):
        groups = _by_seed(_records(out, name))
        row = rows[name]
        assert row["seeds"] == sorted(groups) and row["episodes"] == 6 * len(groups) > 6
        for key, prefix in (("reward", "reward"), ("gold", "gold")):
            means = [np.mean([e[key] for e in groups[s]]) for s in sorted(groups)]
            assert row[f"seed_{prefix}_means"] == pytest.approx(means)
            assert row[f"{key}_mean"] == pytest.approx(np.mean(means))
            assert row[f"seed_{prefix}_sd"] == pytest.approx(np.std(means, ddof=1))
            per_prompt = [np.mean([e[key] for g in groups.values() for e in g if e["index"] == i]) for i in range(6)]
            assert row[f"{key}_ci95"] == pytest.approx(1.96 * np.std(per_prompt, ddof=1) / math.sqrt(6))
    nucleus = _by_seed(_records(out, "nucleus"))
    assert sorted(nucleus) == [0, 1, 2]
    assert len({tuple(e["response"] for e in nucleus[s]) for s in nucleus}) == 3  # the seeds really sample anew
    table = (out / "leaderboard.md").read_text()
    assert f"{rows['nucleus']['gold_mean']:+.3f} ± {rows['nucleus']['gold_ci95']:.2f} " \
           f"(sd {rows['nucleus']['seed_gold_sd']:.2f})" in table
    assert "sample standard deviation of the seed means" in table


def test_per_method_seeds_deterministic_rows_and_trained_seeds(seeded, suite):
    _, out = seeded
    rows = {r["method"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert rows["top_k"]["seeds"] == [7] and rows["top_k"]["seed_gold_sd"] is None  # its own seeds; no spread
    assert rows["greedy"]["seeds"] == [0] and rows["greedy"]["episodes"] == 6        # deterministic: run once
    assert rows["args_greedy"]["seeds"] == [4] and rows["args_greedy"]["episodes"] == 6
    # A trained method trains one model per seed, each in a run directory of its own; seed 0's is the
    # one the single-seed suite trained (train.seed = 0), reused.
    meta = json.loads((out / "records" / "proxy.json").read_text())
    assert meta["records_format"] == 2 and meta["seeds"] == [0, 1]
    dirs = [run["info"]["run_dir"] for run in meta["runs"]]
    single = json.loads((suite[1] / "records" / "proxy.json").read_text())["runs"][0]["info"]["run_dir"]
    assert len(set(dirs)) == 2 and dirs[0] == single
    assert rows["proxy"]["train_seconds"] == pytest.approx(np.mean([r["train_seconds"] for r in meta["runs"]]))


def test_seeds_of_a_method_follow_its_kind():
    from benchmarks.bench.config import BenchConfig, MethodConfig
    from benchmarks.bench.seeds import evaluation_seed, method_seeds, seeded_method

    bench = BenchConfig(seeds=(3, 4))
    assert method_seeds(MethodConfig(name="g", kind="greedy", seeds=(5, 6)), bench) == (5,)
    assert method_seeds(MethodConfig(name="a", kind="args", params={"mode": "stochastic"}), bench) == (3, 4)
    assert method_seeds(MethodConfig(name="a", kind="args", params={"w": 1.0}), bench) == (3,)  # greedy by default
    assert seeded_method(MethodConfig(name="p", kind="rrhf", params={"lr": 1e-3}), 4).params == {"lr": 1e-3, "seed": 4}
    assert seeded_method(MethodConfig(name="n", kind="nucleus"), 4).params == {}  # a sampling seed only
    assert evaluation_seed(0) == 0 and evaluation_seed(1) >= 100_000  # seeds never share a prompt's stream


def test_records_of_format_1_read_as_seed_0_and_newer_ones_are_refused(tmp_path):
    from benchmarks.bench.records import read_method_records

    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "old.jsonl").write_text(json.dumps({"index": 0, "reward": 1.0}) + "\n")
    (folder / "old.json").write_text(json.dumps({"name": "old", "episodes": 1, "generate_seconds": 2.0,
                                                 "train_seconds": 0.0, "info": {}}))
    episodes, meta = read_method_records(tmp_path, "old")
    assert episodes == [{"index": 0, "reward": 1.0, "seed": 0}] and meta["seeds"] == [0]
    assert meta["runs"][0]["generate_seconds"] == 2.0
    (folder / "old.json").write_text(json.dumps({"records_format": 99, "episodes": 1}))
    with pytest.raises(ValueError, match="records format 99, newer than .* rerun the method"):
        read_method_records(tmp_path, "old")


def test_rank_columns_order_by_gold_and_by_rm(seeded):
    from benchmarks.bench.leaderboard import ranks

    assert ranks([0.5, 0.9, 0.5, None, 0.1]) == [2, 1, 2, None, 4]  # ties share the better rank (1, 2, 2, 4)
    _, out = seeded
    rows = json.loads((out / "leaderboard.json").read_text())["rows"]
    for key, rank in (("gold_mean", "rank_gold"), ("reward_mean", "rank_rm")):
        assert [r[rank] for r in sorted(rows, key=lambda r: -r[key])] == sorted(r[rank] for r in rows)
        assert min(r[rank] for r in rows) == 1
    header = (out / "leaderboard.md").read_text().split("\n| method |")[1].split("\n")[0]
    assert "| rank gold | rank RM |" in header


def test_the_best_of_n_sweep_samples_once_and_nests(seeded):
    """n=k picks best-of-k among the first k of one draw, and equals the leaderboard's best-of-k (and n=1
    plain p=1 sampling) with the same seed: one candidate set serves every n."""
    from agents.decoding import best_index
    from benchmarks.cli import main

    config, out = seeded
    assert main(["bench", "--config", str(config), "--sweep", "best_of_n", "bench.sweep.best_of_n=[1, 2, 4]"]) == 0
    sweep = json.loads((out / "sweep_best_of_n.json").read_text())
    assert [p["value"] for p in sweep["points"]] == [1, 2, 4]
    candidates = {s: [json.loads(line) for line in (out / "sweep_best_of_n" / "records" / f"candidates-seed{s}.jsonl")
                      .read_text().splitlines()] for s in (0, 1, 2)}
    assert all(len(c["responses"]) == 4 for records in candidates.values() for c in records)  # max n drawn, once
    for point in sweep["points"]:
        n = point["value"]
        picks = {s: [c["rewards"][best_index(c["pick_scores"][:n])] for c in records] for s, records in candidates.items()}
        assert point["seed_reward_means"] == pytest.approx([np.mean(picks[s]) for s in (0, 1, 2)])
        assert point["rm_calls_per_response"] == n
    for name, n in (("nucleus_p1", 1), ("best_of_2", 2)):  # the leaderboard's rows, same seeds: same responses
        board = _by_seed(_records(out, name))
        for s, records in candidates.items():
            assert [e["response"] for e in board[s]] == [c["responses"][best_index(c["pick_scores"][:n])]
                                                         for c in records]
    assert (out / "sweep_best_of_n.png").stat().st_size > 10_000
    md = (out / "sweep_best_of_n.md").read_text()
    assert "| rank RM | rank gold | peak |" in md and ("peaks before RM" in md or "both peak" in md or "before gold" in md)
    # A rerun reuses the candidates (from the records) and gives the same table.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "sweep_best_of_n" / "records").iterdir()}
    assert main(["bench", "--config", str(config), "--sweep", "best_of_n", "bench.sweep.best_of_n=[1, 2, 4]"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sweep_best_of_n" / "records").iterdir()} == stamps
    assert json.loads((out / "sweep_best_of_n.json").read_text())["points"] == sweep["points"]
    # A smaller grid is served by the first candidates of the larger draw.
    assert main(["bench", "--config", str(config), "--sweep", "best_of_n", "bench.sweep.best_of_n=[2, 1]"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sweep_best_of_n" / "records").iterdir()} == stamps
    smaller = json.loads((out / "sweep_best_of_n.json").read_text())["points"]
    assert [p["reward_mean"] for p in smaller] == [p["reward_mean"] for p in sweep["points"][:2]]


def test_the_args_w_sweep_end_to_end(seeded):
    from benchmarks.cli import main

    config, out = seeded
    args = ["bench", "--config", str(config), "--sweep", "args_w", "bench.sweep.args_w=[3, 0]", "bench.sweep.args_k=4"]
    assert main(args) == 0
    sweep = json.loads((out / "sweep_args_w.json").read_text())
    points = {p["value"]: p for p in sweep["points"]}
    assert list(points) == [0, 3] and all(p["seeds"] == [0] for p in points.values())  # deterministic: one run
    for w, p in points.items():
        episodes = _records(out / "sweep_args_w", f"args-w{w:g}")
        assert p["gold_mean"] == pytest.approx(np.mean([e["gold"] for e in episodes]))
        assert p["reward_mean"] == pytest.approx(np.mean([e["reward"] for e in episodes]))
    greedy = _records(out / "sweep_args_w", "greedy")
    assert [e["response"] for e in _records(out / "sweep_args_w", "args-w0")] == [e["response"] for e in greedy]
    assert {p["rank_rm"] for p in points.values()} <= {1, 2} and sweep["peaks"]["rm_peak"] in points
    md = (out / "sweep_args_w.md").read_text()
    assert "| 3 |" in md and "ARGS-greedy (k = 4)" in md and (out / "sweep_args_w.png").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "sweep_args_w" / "records").iterdir()}
    assert main(args) == 0  # from the records: nothing reruns
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sweep_args_w" / "records").iterdir()} == stamps


# ---------------------------------------------------------------------------- results survive crashes and races


def _write_as(suite_dir: str, writer: int, count: int) -> None:
    from benchmarks.bench.records import write_method_records

    for i in range(count):
        episodes = [{"writer": writer, "i": i, "pad": "x" * 512} for _ in range(20 + writer)]
        write_method_records(Path(suite_dir), "m", episodes, {"writer": writer, "i": i})


def test_two_processes_writing_the_same_records_never_tear_or_mix_them(tmp_path):
    import multiprocessing as mp

    from benchmarks.bench.records import read_method_records

    ctx = mp.get_context("fork")
    writers = [ctx.Process(target=_write_as, args=(str(tmp_path), w, 150)) for w in (0, 1)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers):
        got = read_method_records(tmp_path, "m")
        if got is not None:
            episodes, meta = got
            assert {e["writer"] for e in episodes} == {meta["writer"]} and len(episodes) == meta["episodes"]
            reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert reads > 0


def test_a_leaderboard_write_killed_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    from benchmarks.bench import leaderboard
    from llm_envs import io

    header = {"suite": "s", "num_prompts": 1, "prompts": "p", "max_new_tokens": 1, "lm": "a", "reward": "b", "gold": None}
    leaderboard.write_leaderboard(tmp_path, [], {**header, "run": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed(fd: int) -> None:
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(io.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        leaderboard.write_leaderboard(tmp_path, [], {**header, "run": 2})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact, no temp left
    assert json.loads((tmp_path / "leaderboard.json").read_text())["run"] == 1


@pytest.mark.parametrize("source, shown", [
    ("/home/me/.cache/llm_envs/world/default-seed0-v2/lm", "world:default-seed0-v2/lm"),
    ("/tmp/my_cache/world/v2-seed3-v2/rm", "world:v2-seed3-v2/rm"),  # LLM_ENVS_CACHE elsewhere
    ("gpt2", "gpt2"),
    ("/data/world/notes/lm", "/data/world/notes/lm"),
])
def test_result_files_name_world_models_by_build_not_path(source, shown):
    from benchmarks.bench.suite import display_name

    assert display_name(source) == shown


def test_a_trained_run_is_reused_only_on_the_world_it_was_trained_on(tmp_path):
    """Run directories are named by config and task; the world's bytes are checked on reuse."""
    from benchmarks.bench.methods import TRAIN_INFO, _timed_training

    trained: list[str] = []
    _timed_training(tmp_path, lambda: trained.append("first"), "a" * 64)
    assert json.loads((tmp_path / TRAIN_INFO).read_text())["world_hash"] == "a" * 64
    _timed_training(tmp_path, lambda: trained.append("again"), "a" * 64)  # same world: reused
    assert trained == ["first"]
    with pytest.raises(RuntimeError, match="trained on world aaaaaaaaaaaa, but the task's world is now bbbbbbbbbbbb"):
        _timed_training(tmp_path, lambda: trained.append("other world"), "b" * 64)
    assert trained == ["first"]
    (tmp_path / TRAIN_INFO).write_text(json.dumps({"train_seconds": 1.5}))  # recorded before hashes were kept
    assert _timed_training(tmp_path, lambda: trained.append("legacy"), "b" * 64) == 1.5 and trained == ["first"]
