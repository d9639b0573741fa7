"""Chat templates as a prompt option (`chat_template=True`), on tiny tokenizers built here.

A byte-level BPE tokenizer with a Llama-3-like template: its tokenizer adds a BOS that the template
also writes (so a rendered prompt must not get a second one), it trims messages, and its turns end
with ``<|eot_id|>``, which is not its EOS ``<|end_of_text|>``. Tiny random Llama models read it.
The real chat model (SmolLM2) is exercised in tests/test_real_lm.py.
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

import llm_envs  # noqa: F401  (registers the env ids)
from llm_envs.chat import ChatFormat, NoChatTemplateError, chat_format_of, chat_tokenizer, encode_prompt
from llm_envs.data import load_prompts
from llm_envs.rewards import CandidateScorer, RewardWrapper
from llm_envs.task import Task, build_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CORPUS = ["what is the capital of france ? paris is the capital .", "name a yellow fruit . a banana is yellow .",
          "system user assistant you are helpful and brief"]
MESSAGES = ["what is the capital of france ?", "name a yellow fruit ."]
ACCEPT_ID, CHOICE_ID = "llm_envs/TokenAccept-v0", "llm_envs/TokenChoice-v0"


def make_tokenizer(template: str | None = LLAMA3) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=200, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  additional_special_tokens=SPECIALS[2:], chat_template=template)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    tok.name_or_path = "tiny-llama3-like"
    return tok


def make_lm(tok: Any, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval()


def make_rm(tok: Any, seed: int = 1) -> Any:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, num_labels=1,
                         pad_token_id=1)
    return LlamaForSequenceClassification(config).eval()


def apply(tok: Any, message: str, *, tokenize: bool = False, system: str | None = None) -> Any:
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    out = tok.apply_chat_template(turns, tokenize=tokenize, add_generation_prompt=True)
    return list(out["input_ids"]) if tokenize else out


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


@pytest.fixture(scope="module")
def lm(tok: Any) -> Any:
    return make_lm(tok)


def rm_forward(rm: Any, ids: list[int]) -> float:
    with torch.inference_mode():
        return float(rm(input_ids=torch.tensor([ids])).logits[0, 0])


class Recorder:
    """A function reward that remembers what it read."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.seen += list(zip(prompts, responses))
        return [float(len(r)) for r in responses]


# ----------------------------------------------------------------------------- the format


def test_chat_format_renders_what_apply_chat_template_renders_and_inverts_it(tok):
    fmt = ChatFormat.learn(tok)
    assert fmt.end_of_turn == "<|eot_id|>" and fmt.end_of_turn_id == tok.convert_tokens_to_ids("<|eot_id|>")
    assert fmt.eos_token_id == tok.eos_token_id != fmt.end_of_turn_id and fmt.eot_differs and fmt.strips
    for message in [*MESSAGES, "  padded message  "]:
        rendered = fmt.render(message)
        assert rendered == apply(tok, message)
        assert fmt.message_of(rendered) == message.strip() and fmt.render(fmt.message_of(rendered)) == rendered
        assert fmt.prompt(rendered) == rendered and fmt.prompt(message) == rendered  # never rendered twice
    assert fmt.message_of("what is the capital of france ?") is None
    with_system = ChatFormat.learn(tok, system_prompt="you are brief")
    assert with_system.render(MESSAGES[0]) == apply(tok, MESSAGES[0], system="you are brief")
    assert with_system.message_of(fmt.render(MESSAGES[0])) is None


def test_a_tokenizer_without_a_template_gets_an_error_naming_it_and_the_fix(tok):
    plain = make_tokenizer(template=None)
    with pytest.raises(NoChatTemplateError, match=r"chat_template=True but tokenizer 'tiny-llama3-like' has no chat "
                                                  r"template.*chat_template=False"):
        ChatFormat.learn(plain)
    lm = make_lm(plain)
    with pytest.raises(NoChatTemplateError, match="tiny-llama3-like"):
        gym.make(ACCEPT_ID, lm=lm, tokenizer=plain, reward=Recorder(), prompts=MESSAGES, device="cpu",
                 chat_template=True)
    with pytest.raises(ValueError, match=r"chat_template='yes'; expected true or false"):
        build_context(lm=lm, tokenizer=plain, reward=Recorder(), prompts=MESSAGES, chat_template="yes")
    with pytest.raises(ValueError, match=r"task.system_prompt='be brief' is set but task.chat_template is false"):
        Task(system_prompt="be brief")
    with pytest.raises(ValueError, match="task.chat_template=1"):
        Task(chat_template=1)  # type: ignore[arg-type]


def test_chat_tokenizer_is_a_copy_ending_turns_at_eot_and_encodes_rendered_prompts_with_one_bos(tok):
    fmt = ChatFormat.learn(tok)
    before = (tok.eos_token, tok.eos_token_id, tok.pad_token)
    chat = chat_tokenizer(tok, fmt)
    assert chat is not tok and (tok.eos_token, tok.eos_token_id, tok.pad_token) == before  # the user's is untouched
    assert chat.eos_token_id == fmt.end_of_turn_id and chat.pad_token == "<|end_of_text|>"
    assert chat_format_of(chat) == fmt and chat_format_of(tok) is None and chat_tokenizer(chat, fmt) is chat
    rendered = fmt.render(MESSAGES[0])
    assert encode_prompt(chat, rendered) == apply(tok, MESSAGES[0], tokenize=True)  # HF's tokenize=True ids
    assert encode_prompt(chat, rendered).count(tok.bos_token_id) == 1
    assert tok(rendered)["input_ids"].count(tok.bos_token_id) == 2  # what the plain rule would have done
    assert encode_prompt(chat, "paris") == tok("paris")["input_ids"]  # other text: the tokenizer's defaults


def test_load_prompts_renders_once_keeps_messages_and_counts_rendered_tokens(tok):
    fmt = ChatFormat.learn(tok)
    chat = chat_tokenizer(tok, fmt)
    prompts = load_prompts([MESSAGES[0], fmt.render(MESSAGES[1])], chat=fmt)
    assert prompts.prompts == [fmt.render(m) for m in MESSAGES] and prompts.messages == MESSAGES
    assert "chat template" in prompts.source
    lengths = [len(apply(tok, m, tokenize=True)) for m in MESSAGES]
    kept = load_prompts(MESSAGES, chat=fmt, tokenizer=chat, max_prompt_tokens=min(lengths))
    shorter = int(np.argmin(lengths))
    assert kept.prompts == [fmt.render(MESSAGES[shorter])] and kept.messages == [MESSAGES[shorter]]
    assert kept.dropped_too_long == 1
    assert load_prompts(MESSAGES).messages is None


# ----------------------------------------------------------------------------- episodes end at the turn end


def test_env_prompts_are_rendered_and_episodes_end_at_eot_not_eos(tok, lm):
    judge = Recorder()
    env = gym.make(CHOICE_ID, lm=lm, tokenizer=tok, reward=judge, gold=judge, prompts=MESSAGES, device="cpu",
                   chat_template=True, k=len(tok), top_p=1.0, max_new_tokens=8)
    ctx = env.unwrapped.core.ctx
    fmt, eot, eos = ctx.chat, tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id
    assert ctx.prompts.prompts == [fmt.render(m) for m in MESSAGES] and ctx.prompts.messages == MESSAGES
    assert ctx.prompt_ids == [apply(tok, m, tokenize=True) for m in MESSAGES] and ctx.eos_token_id == eot
    assert tok.eos_token_id == eos  # the user's tokenizer is not changed
    _, info = env.reset(options={"prompt_index": 0})
    assert info["prompt"] == fmt.render(MESSAGES[0])
    steps = [info["candidate_ids"][0], eos, eot]  # a token, the tokenizer's EOS (not a turn end), then the turn end
    for i, token in enumerate(steps):
        _, reward, terminated, truncated, info = env.step(info["candidate_ids"].index(token))
        assert terminated == (i == 2) and not truncated
    assert info["response_ids"] == steps and info["response_ids"][-1] == eot
    # the judge read the user message and the response up to the turn end (EOS/pad are not content)
    assert judge.seen[-1] == (MESSAGES[0], info["response_text"]) and "<|eot_id|>" not in judge.seen[-1][1]
    # a user message passed at reset is rendered; a rendered one is kept
    _, info = env.reset(options={"prompt": "name a banana"})
    assert info["prompt"] == fmt.render("name a banana")
    _, info = env.reset(options={"prompt": fmt.render("name a banana")})
    assert info["prompt"] == fmt.render("name a banana")


def _lm_that_ends_its_turn(tok: Any, prompt_ids: list[int]) -> tuple[Any, int]:
    """A tiny LM whose greedy answer to `prompt_ids` is one token and then <|eot_id|>: the eot row of
    its (untied) output layer is made orthogonal to the first position's hidden state and aligned
    with the second's. Returns it and its first token."""
    model = make_lm(tok, seed=3)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    with torch.inference_mode():
        model.lm_head.weight[eot] = 0.0
        out = model(input_ids=torch.tensor([prompt_ids]), output_hidden_states=True)
        first = int(out.logits[0, -1].argmax())
        h1 = out.hidden_states[-1][0, -1]
        h2 = model(input_ids=torch.tensor([prompt_ids + [first]]), output_hidden_states=True).hidden_states[-1][0, -1]
        v = h2 - (h2 @ h1) / (h1 @ h1) * h1
        model.lm_head.weight[eot] = 50.0 * v / (v @ v)
    return model, first


def test_always_accept_equals_hf_generate_and_the_greedy_decoder_stopping_at_eot(tok):
    from agents.decoding import GreedyDecoder

    fmt = ChatFormat.learn(tok)
    ids = apply(tok, MESSAGES[0], tokenize=True)
    model, first = _lm_that_ends_its_turn(tok, ids)
    eot = fmt.end_of_turn_id
    env = gym.make(ACCEPT_ID, lm=model, tokenizer=tok, reward=Recorder(), prompts=MESSAGES[:1], device="cpu",
                   chat_template=True, top_p=1.0, max_new_tokens=6)
    env.reset(options={"prompt_index": 0})
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(0)
        done = terminated or truncated
    with torch.inference_mode():
        expected = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  do_sample=False, max_new_tokens=6, eos_token_id=eot, pad_token_id=tok.pad_token_id)
    expected = expected[0, len(ids):].tolist()
    assert expected == [first, eot] and info["response_ids"] == expected and terminated
    ctx = env.unwrapped.core.ctx
    decoded = GreedyDecoder(ctx.model, ctx.tokenizer, device="cpu").generate([ctx.prompts[0]], max_new_tokens=6)
    assert decoded[0].response_ids == expected  # same prompt ids (one BOS), same stop


# ----------------------------------------------------------------------------- the reward model reads its own format


def _chat(tok: Any) -> Any:
    return chat_tokenizer(tok, ChatFormat.learn(tok))


def test_same_template_rm_takes_the_ids_path_and_equals_the_text_path(tok):
    chat, rm = _chat(tok), make_rm(tok)
    wrapper = RewardWrapper.from_model(rm, tokenizer=copy.deepcopy(tok), lm_tokenizer=chat, device="cpu")
    assert wrapper.chat_reading(chat_format_of(chat)) == "same" and wrapper.fast_path(chat) == (True, "")
    prompt = chat_format_of(chat).render(MESSAGES[0])
    prompt_ids = encode_prompt(chat, prompt)
    response = tok("paris is the capital .", add_special_tokens=False)["input_ids"]
    eot = chat.eos_token_id
    fast = wrapper.score_ids([prompt_ids], [response + [eot, 5, 6]])
    assert wrapper.last_path == "ids"
    slow = wrapper.score_ids([prompt_ids], [response], fast=False)
    assert wrapper.last_path == "text"
    text = wrapper.score([prompt], [tok.decode(response) + "<|eot_id|> more"])
    expected = rm_forward(rm, prompt_ids + response)  # the rendered prompt (one BOS) + the response
    assert fast[0] == pytest.approx(expected, abs=1e-5) and slow[0] == pytest.approx(expected, abs=1e-5)
    assert text[0] == pytest.approx(expected, abs=1e-5)
    scorer = CandidateScorer(wrapper, 1, chat)
    cands = [response[0], response[1], eot]
    scores = scorer.score([0], [prompt_ids], [response[:1]], [cands])[0][0]
    singles = [wrapper.score_ids([prompt_ids], [response[:1] + [c]])[0] for c in cands]
    np.testing.assert_allclose(scores, singles, atol=1e-4)
    assert scores[2] == pytest.approx(wrapper.score_ids([prompt_ids], [response[:1]])[0], abs=1e-5)  # eot ends it


def test_rm_with_its_own_template_reads_its_own_rendering(tok):
    chat, rm_tok = _chat(tok), make_tokenizer(template=ZEPHYR)
    rm = make_rm(rm_tok, seed=2)
    wrapper = RewardWrapper.from_model(rm, tokenizer=rm_tok, lm_tokenizer=chat, device="cpu")
    fmt = chat_format_of(chat)
    assert wrapper.chat_reading(fmt) == "own"
    assert wrapper.fast_path(chat) == (False, "the reward model reads the conversation in its own chat template")
    prompt = fmt.render(MESSAGES[1])
    prompt_ids = encode_prompt(chat, prompt)
    response = tok("a banana is yellow .", add_special_tokens=False)["input_ids"]
    own = rm_tok.apply_chat_template([{"role": "user", "content": MESSAGES[1]},
                                      {"role": "assistant", "content": "a banana is yellow ."}], tokenize=False)
    assert own.startswith("<|user|>\n" + MESSAGES[1])
    expected = rm_forward(rm, rm_tok(own, add_special_tokens=False)["input_ids"])
    got = wrapper.score_ids([prompt_ids], [response + [fmt.end_of_turn_id, 7]])
    assert got[0] == pytest.approx(expected, abs=1e-5) and wrapper.last_path == "text"
    assert wrapper.score([prompt], ["a banana is yellow .<|eot_id|>junk"])[0] == pytest.approx(expected, abs=1e-5)
    scores = CandidateScorer(wrapper, 1, chat).score([0], [prompt_ids], [response[:-1]], [[response[-1]]])[0]
    assert scores[0, 0] == pytest.approx(expected, abs=1e-5)
    assert wrapper.describe()["chat"]["reads"] == "own"


def test_rm_without_a_template_and_functions_read_the_message(tok):
    chat, plain = _chat(tok), make_tokenizer(template=None)
    rm = make_rm(plain, seed=4)
    bare = RewardWrapper.from_model(rm, tokenizer=plain, device="cpu")  # no LM format: today's concat
    wrapper = RewardWrapper.build(bare, lm_tokenizer=chat)  # a chat task's copy of a user's wrapper
    assert wrapper is not bare and bare.chat is None and wrapper.chat == chat_format_of(chat)
    assert wrapper.chat_reading(wrapper.chat) == "message"
    prompt = wrapper.chat.render(MESSAGES[0])
    assert wrapper.score([prompt], ["paris ."]) == bare.score([MESSAGES[0]], ["paris ."])
    ids = tok("paris .", add_special_tokens=False)["input_ids"]
    assert wrapper.score_ids([encode_prompt(chat, prompt)], [ids + [chat.eos_token_id]]) == \
        bare.score([MESSAGES[0]], ["paris ."])
    judge = Recorder()
    gold = RewardWrapper.from_callable(judge, lm_tokenizer=chat)
    gold.score_ids([encode_prompt(chat, prompt)], [ids + [chat.eos_token_id, 9]])
    gold.score([prompt, "a plain prompt"], ["paris .<|eot_id|>x", "yes"])
    assert judge.seen == [(MESSAGES[0], "paris ."), (MESSAGES[0], "paris ."), ("a plain prompt", "yes")]


def test_a_chat_copy_counts_its_own_truncations(tok):
    # The copy shares the backend and how its inputs are built, not its counters.
    chat, plain = _chat(tok), make_tokenizer(template=None)
    bare = RewardWrapper.from_model(make_rm(plain, seed=4), tokenizer=plain, device="cpu", max_length=5)
    copy_ = RewardWrapper.build(bare, lm_tokenizer=chat)
    long = "the capital of france is paris and it is large ."
    copy_.score([copy_.chat.render(MESSAGES[0])], [long])
    assert (copy_.truncated, bare.truncated) == (1, 0)
    lengths = bare.input_lengths([MESSAGES[0]], [long])  # full lengths: nothing truncated, nothing counted
    assert lengths[0] > 5 and bare.truncated == 0
    bare.score([MESSAGES[0]], [long])
    ids = bare.fit_to_max_length(list(range(7)))
    assert ids == [2, 3, 4, 5, 6] and (bare.truncated, copy_.truncated) == (2, 1)
    assert bare.describe()["truncated"] == 2 and bare.max_length == copy_.max_length == 5
    bare.reset_counters()
    assert (bare.truncated, copy_.truncated) == (0, 1)


def test_task_carries_the_chat_setting_to_every_env(tok, lm):
    task = Task(lm="unused", reward="unused", train_prompts=MESSAGES, eval_prompts=MESSAGES, chat_template=True,
                system_prompt="you are brief")
    assert task.chat_template and Task.__dataclass_fields__["chat_template"].metadata["help"]
    from llm_envs.task import TaskSources

    sources = TaskSources(task=task, lm="unused", reward="unused", train_prompts=MESSAGES, eval_prompts=MESSAGES,
                          gold=None, world_path=None)
    kwargs = {**sources.env_kwargs(MESSAGES), "lm": lm, "tokenizer": tok, "reward": Recorder()}
    ctx = build_context(**kwargs)
    assert ctx.chat.system_prompt == "you are brief"
    assert ctx.prompts.prompts == [apply(tok, m, system="you are brief") for m in MESSAGES]
