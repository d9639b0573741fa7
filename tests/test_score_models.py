"""safe-rlhf score models as reward models, refusing heads that would be random, and reward − cost sums.

Tiny checkpoints are written offline in safe-rlhf's layout (config.json with ``architectures`` and the
score fields, safetensors holding ``model.*`` backbone weights and ``score_head.*``), so the loader is
checked against a hand computation of the end score: the backbone's hidden state at the last token of
the unpadded sequence, times the head's weights, plus its bias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import protocol_models
import pytest
import torch
from protocol_models import word_tokenizer
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from llm_envs.config import ConfigError, load_config, to_dict
from llm_envs.models import load_reward_model
from llm_envs.reward_spec import RewardTerm, reward_label
from llm_envs.rewards import (
    CandidateScorer,
    RewardWrapper,
    join_prompt_response,
    prefix_cache_verdict,
)
from llm_envs.score_model import ScoreModel
from llm_envs.task import Task, build_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = "<unk> <pad> <eos> <bos> USER: ASSISTANT: hello world how are you fine thanks sure good bad ! ?".split()
HIDDEN = 16
PROMPTS = ["USER: hello how are you ASSISTANT:", "USER: good ? ASSISTANT:", "USER: hello ASSISTANT:"]
RESPONSES = ["fine thanks !", "sure", "bad bad world"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS)


def llama_config(**extra: Any) -> LlamaConfig:
    return protocol_models.llama_config(WORDS, **extra)


class Checkpoint:
    """A score model saved in safe-rlhf's layout, and what a hand computation needs: backbone and head."""

    def __init__(self, path: Path, backbone: LlamaModel, weight: torch.Tensor, bias: torch.Tensor | None,
                 normalize: Any = None) -> None:
        self.path, self.backbone, self.weight, self.bias, self.normalize = path, backbone, weight, bias, normalize

    def end_score(self, ids: list[int]) -> float:
        """The score at the last token of the unpadded sequence: h_last @ w (+ b), then normalised."""
        with torch.no_grad():
            hidden = self.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        score = float(hidden @ self.weight[0]) + (float(self.bias[0]) if self.bias is not None else 0.0)
        return self.normalize(score) if self.normalize else score


def save_score_model(
    path: Path,
    *,
    seed: int,
    architecture: str | None = "LlamaForScore",
    bias_key: str = "score_bias",
    bias: bool = True,
    fields: dict[str, Any] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    drop: tuple[str, ...] = (),
    shards: int = 1,
) -> Checkpoint:
    """Write a tiny score model as safe-rlhf's save_pretrained would: config.json (``architectures``,
    ``score_dim``, the bias flag, ``score_type``, ...), safetensors of ``model.*`` + ``score_head.*``
    (optionally sharded with an index), and the tokenizer."""
    torch.manual_seed(seed)
    score_fields = {"architectures": [architecture] if architecture else None, "score_dim": 1,
                    "score_type": "reward", "do_normalize": False, "normalizer_type": None, bias_key: bias}
    config = llama_config(**{**score_fields, **(fields or {})})
    backbone = LlamaModel(llama_config()).eval()
    weight = torch.randn(1, HIDDEN)
    head_bias = torch.randn(1) if bias else None
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state["score_head.weight"] = weight
    if head_bias is not None:
        state["score_head.bias"] = head_bias
    state.update(extra or {})
    for key in drop:
        del state[key]
    path.mkdir(parents=True)
    config.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in group}, path / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in group})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return Checkpoint(path, backbone, weight, head_bias)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def reward_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return save_score_model(tmp_path_factory.mktemp("score") / "reward", seed=0)


@pytest.fixture(scope="module")
def cost_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """A v1.0-era cost model (``LlamaModelForScore``, ``bias: false``), normalised by its buffers, in two shards."""
    var = torch.tensor([4.0])
    ckpt = save_score_model(
        tmp_path_factory.mktemp("score") / "cost", seed=1, architecture="LlamaModelForScore", bias_key="bias",
        bias=False, fields={"score_type": "cost", "do_normalize": True, "normalizer_type": "RunningMeanStd"},
        extra={"normalizer.mean": torch.tensor([0.5]), "normalizer.var": var,
               "normalizer.count": torch.tensor([10])}, shards=2)
    ckpt.normalize = lambda s: s / (2.0 + 1e-8)  # cost: scale by the std, no shift
    return ckpt


def text_ids(tok: PreTrainedTokenizerFast, prompt: str, response: str) -> list[int]:
    return list(tok(join_prompt_response(prompt, response))["input_ids"])


# ----------------------------------------------------------------------------- the loader


def test_score_model_end_score_equals_hand_computation_with_right_and_left_padding(reward_ckpt, tok) -> None:
    model = load_reward_model(reward_ckpt.path, device="cpu")
    assert isinstance(model, ScoreModel) and model.architecture == "LlamaForScore"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    seqs = [text_ids(tok, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    expected = [reward_ckpt.end_score(s) for s in seqs]
    width = max(map(len, seqs))
    for side in ("right", "left"):
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
            ids[row, span], mask[row, span] = torch.tensor(seq), 1
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        assert out.logits.shape == (len(seqs), 1)
        np.testing.assert_allclose(out.logits[:, 0].numpy(), expected, atol=1e-5, err_msg=side)


def test_v1_layout_without_bias_in_shards_with_cost_normalisation(cost_ckpt, tok) -> None:
    """``LlamaModelForScore`` with ``bias: false`` and ``do_normalize``: a cost's end score over its std."""
    model = load_reward_model(str(cost_ckpt.path), device="cpu")
    assert isinstance(model, ScoreModel) and model.score.linear.bias is None
    seqs = [text_ids(tok, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    with torch.no_grad():
        got = [float(model(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]
    np.testing.assert_allclose(got, [cost_ckpt.end_score(s) for s in seqs], atol=1e-5)


def test_a_score_model_is_recognised_by_its_weights_when_the_config_names_no_class(tmp_path, tok) -> None:
    ckpt = save_score_model(tmp_path / "rm", seed=3, architecture=None)
    assert json.loads((ckpt.path / "config.json").read_text()).get("architectures") is None
    model = load_reward_model(ckpt.path, device="cpu")
    ids = text_ids(tok, PROMPTS[1], RESPONSES[1])
    with torch.no_grad():
        assert float(model(input_ids=torch.tensor([ids])).logits[0, 0]) == pytest.approx(ckpt.end_score(ids), abs=1e-5)


def test_reward_normalisation_reads_the_config_when_no_buffers(tmp_path, tok) -> None:
    ckpt = save_score_model(tmp_path / "rm", seed=2, fields={"do_normalize": True, "mean": [1.5], "var": [9.0]})
    ckpt.normalize = lambda s: (s - 1.5) / (3.0 + 1e-8)
    model = load_reward_model(ckpt.path, device="cpu")
    ids = text_ids(tok, PROMPTS[0], RESPONSES[0])
    with torch.no_grad():
        assert float(model(input_ids=torch.tensor([ids])).logits[0, 0]) == pytest.approx(ckpt.end_score(ids), abs=1e-5)


# ----------------------------------------------------------------------------- refusing random heads


def test_a_causal_lm_given_as_reward_model_is_refused_naming_its_missing_head(tmp_path) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"lacks weights .*score\.weight.*initialise them at random") as err:
        load_reward_model(tmp_path / "lm", device="cpu")
    assert "LlamaForCausalLM" in str(err.value) and "not a reward model" in str(err.value)


@pytest.mark.parametrize("drop, bias, named", [
    (("score_head.weight",), True, "score_head.weight"),
    (("score_head.bias",), True, "score_head.bias"),
    (("model.layers.1.mlp.up_proj.weight",), True, "layers.1.mlp.up_proj.weight"),
])
def test_a_score_model_missing_weights_is_refused_naming_them(tmp_path, drop, bias, named) -> None:
    save_score_model(tmp_path / "rm", seed=0, drop=drop, bias=bias)
    with pytest.raises(ValueError, match=r"lacks weights it needs") as err:
        load_reward_model(tmp_path / "rm", device="cpu")
    assert named in str(err.value)


def test_a_score_model_with_several_scores_is_refused(tmp_path) -> None:
    save_score_model(tmp_path / "rm", seed=0, fields={"score_dim": 2})
    with pytest.raises(ValueError, match="score_dim=2"):
        load_reward_model(tmp_path / "rm", device="cpu")


# ----------------------------------------------------------------------------- the wrapper's paths


def test_the_wrapper_scores_text_and_ids_through_a_score_model(reward_ckpt, tok) -> None:
    wrapper = RewardWrapper.from_model(reward_ckpt.path, lm_tokenizer=tok, device="cpu")
    assert wrapper.kind == "model" and wrapper.describe()["model_class"] == "ScoreModel"
    expected = [reward_ckpt.end_score(text_ids(tok, p, r)) for p, r in zip(PROMPTS, RESPONSES)]
    np.testing.assert_allclose(wrapper.score(PROMPTS, RESPONSES), expected, atol=1e-5)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    np.testing.assert_allclose(wrapper.score_ids(prompt_ids, response_ids), expected, atol=1e-5)
    assert wrapper.last_path == "ids"
    np.testing.assert_allclose(wrapper.score_ids(prompt_ids, response_ids, fast=False), expected, atol=1e-5)
    assert wrapper.last_path == "text"


def test_candidates_on_a_score_model_use_the_prefix_cache_and_its_end_rule(reward_ckpt, tok) -> None:
    """The prefix cache reads the head at every position; a score model ends at the last token whatever
    its id (a pad candidate is scored, not skipped as HF classifiers skip the pad id)."""
    wrapper = RewardWrapper.from_model(reward_ckpt.path, lm_tokenizer=tok, device="cpu")
    scorer = CandidateScorer(wrapper, 2, tok)
    assert scorer.uses_prefix_cache
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    responses = [tok("fine", add_special_tokens=False)["input_ids"], []]
    cands = [[tok.convert_tokens_to_ids(w) for w in ("good", "bad", "<pad>")]] * 2
    raw, _ = scorer.score([0, 1], prompts, responses, cands, scoring="raw")
    assert prefix_cache_verdict(wrapper) is True
    expected = [[reward_ckpt.end_score(p + r + [c]) for c in cs] for p, r, cs in zip(prompts, responses, cands)]
    np.testing.assert_allclose(raw, expected, atol=1e-4)
    scored, _ = scorer.score([0, 1], prompts, responses, [c[:2] for c in cands])
    fresh = [[wrapper.score_ids([p], [r + [c]])[0] for c in cs[:2]] for p, r, cs in zip(prompts, responses, cands)]
    np.testing.assert_allclose(scored, fresh, atol=1e-4)


# ----------------------------------------------------------------------------- reward − cost


def test_reward_minus_cost_is_the_weighted_sum_of_the_models_scores(reward_ckpt, cost_ckpt, tok) -> None:
    spec = [{"model": str(reward_ckpt.path), "weight": 1.0}, {"model": str(cost_ckpt.path), "weight": -1.0}]
    combined = RewardWrapper.build(spec, lm_tokenizer=tok, device="cpu")
    reward = RewardWrapper.build(str(reward_ckpt.path), lm_tokenizer=tok, device="cpu")
    cost = RewardWrapper.build(str(cost_ckpt.path), lm_tokenizer=tok, device="cpu")
    assert combined.kind == "combination" and combined.name == f"1*{reward_ckpt.path} - 1*{cost_ckpt.path}"
    expected = np.subtract(reward.score(PROMPTS, RESPONSES), cost.score(PROMPTS, RESPONSES))
    np.testing.assert_allclose(combined.score(PROMPTS, RESPONSES), expected, atol=1e-6)
    hand = [reward_ckpt.end_score(text_ids(tok, p, r)) - cost_ckpt.end_score(text_ids(tok, p, r))
            for p, r in zip(PROMPTS, RESPONSES)]
    np.testing.assert_allclose(expected, hand, atol=1e-5)
    assert (combined.calls, combined.pairs_scored) == (2, 2 * len(PROMPTS))  # one batch per model
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in RESPONSES]
    np.testing.assert_allclose(combined.score_ids(prompt_ids, response_ids), expected, atol=1e-5)
    assert combined.last_path == "ids" and combined.fast_path(tok) == (True, "")
    assert [t["weight"] for t in combined.describe()["terms"]] == [1.0, -1.0]


def test_candidates_of_a_weighted_sum_are_the_weighted_sum_of_each_models(reward_ckpt, cost_ckpt, tok) -> None:
    combined = RewardWrapper.combine([(RewardWrapper.build(reward_ckpt.path, lm_tokenizer=tok, device="cpu"), 2.0),
                                      (RewardWrapper.build(cost_ckpt.path, lm_tokenizer=tok, device="cpu"), -0.5)])
    scorer = CandidateScorer(combined, 2, tok)
    assert scorer.uses_prefix_cache
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    responses = [tok("fine", add_special_tokens=False)["input_ids"], []]
    cands = [[tok.convert_tokens_to_ids(w) for w in ("good", "bad")]] * 2
    out, own = scorer.score([0, 1], prompts, responses, cands, prefix=True)
    fresh = [[combined.score_ids([p], [r + [c]])[0] for c in cs] for p, r, cs in zip(prompts, responses, cands)]
    np.testing.assert_allclose(out, fresh, atol=1e-4)
    np.testing.assert_allclose(own, combined.score_ids(prompts, responses), atol=1e-4)
    assert combined.calls > 0 and combined.calls == sum(t.calls for t, _ in combined.terms)


def test_a_task_reward_can_be_a_weighted_sum_from_yaml_to_context(reward_ckpt, cost_ckpt, tok, tmp_path) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    config = tmp_path / "suite.yaml"
    config.write_text(f"task:\n  lm: {tmp_path / 'lm'}\n  reward:\n    - {{model: {reward_ckpt.path}, weight: 1.0}}\n"
                      f"    - {{model: {cost_ckpt.path}, weight: -1}}\n")
    task = load_config(Task, config, section="task")
    assert task.reward == (RewardTerm(str(reward_ckpt.path), 1.0), RewardTerm(str(cost_ckpt.path), -1.0))
    assert to_dict(task)["reward"] == [{"model": str(reward_ckpt.path), "weight": 1.0},
                                       {"model": str(cost_ckpt.path), "weight": -1.0}]
    assert Task(**to_dict(task)) == task and reward_label(task.reward).endswith(f"- 1*{cost_ckpt.path}")
    ctx = build_context(lm=task.lm, reward=task.reward, prompts=PROMPTS, device="cpu")
    assert ctx.reward.kind == "combination" and len(ctx.reward.terms) == 2
    assert ctx.reward.lm_tokenizer is ctx.tokenizer


@pytest.mark.parametrize("reward, message", [
    ([], "empty list"),
    (["some/model"], "expected a mapping"),
    ([{"model": "a"}], "has no 'weight'"),
    ([{"model": "a", "wieght": 1.0}], "Did you mean 'weight'"),
    ([{"model": "a", "weight": 0}], "drop the term"),
    ([{"model": "a", "weight": "minus one"}], "expected a finite number"),
    ([{"model": "a", "weight": float("nan")}], "expected a finite number"),
    ([{"model": "", "weight": 1.0}], "non-empty string"),
    ([{"model": "a", "weight": 1.0}, {"model": "a", "weight": -1.0}], "twice"),
    (3, "task.reward=3"),
])
def test_bad_combination_specs_raise_clear_errors(reward, message) -> None:
    with pytest.raises(ValueError, match=message):
        Task(reward=reward)


def test_bad_specs_in_a_yaml_file_name_the_file_and_the_term(tmp_path) -> None:
    config = tmp_path / "suite.yaml"
    config.write_text("task:\n  reward:\n    - {model: a, weight: 1}\n    - {model: b, weigth: -1}\n")
    with pytest.raises(ConfigError, match=r"suite.yaml.*task.reward\[1\] has an unknown key 'weigth'"):
        load_config(Task, config, section="task")


def test_combine_checks_its_terms(reward_ckpt, tok) -> None:
    wrapper = RewardWrapper.build(reward_ckpt.path, lm_tokenizer=tok, device="cpu")
    with pytest.raises(ValueError, match="non-empty list"):
        RewardWrapper.combine([])
    with pytest.raises(ValueError, match="weight 0"):
        RewardWrapper.combine([(wrapper, 0.0)])
    with pytest.raises(ValueError, match=r"terms\[0\]"):
        RewardWrapper.combine([(str(reward_ckpt.path), 1.0)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="weighted sum"):
        RewardWrapper.combine([(wrapper, 1.0)]).score_model_inputs([[3, 4]])


def test_the_world_reward_model_still_loads_with_its_head(test_world) -> None:
    """The embedded world's RM is a sequence classifier saved with its head: nothing is missing."""
    model = load_reward_model(test_world.rm_dir, device="cpu")
    assert not isinstance(model, ScoreModel) and model.config.num_labels == 1
