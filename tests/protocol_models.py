"""Tiny stand-ins for the protocol suites' hub models and datasets, written offline in each one's layout.

Nothing here is committed as weights: every test builds what it needs into a temp directory.

- `save_sft_lm`: a Llama causal LM with its tokenizer (stands in for ``PKU-Alignment/alpaca-7b-reproduced``
  and ``argsearch/llama-7b-sft-float32``);
- `save_score_model`: a safe-rlhf score model (``LlamaForScore``: ``model.*`` backbone + ``score_head.*``, the
  score read at the last token) with its tokenizer (``PKU-Alignment/beaver-7b-v1.0-reward``);
- `save_sequence_rm`: a ``LlamaForSequenceClassification`` (num_labels=1) saved *without* a tokenizer, as the
  ARGS RM is scored with the SFT model's (``argsearch/llama-7b-rm-float32``);
- `save_bert_encoder`: a BERT with its pooler and a WordPiece tokenizer
  (``princeton-nlp/sup-simcse-bert-base-uncased``);
- `write_hh_rlhf`: ``Anthropic/hh-rlhf``'s layout (``helpful-base/`` and ``harmless-base/`` folders of
  ``{train,test}.jsonl.gz`` with ``chosen``/``rejected`` dialogues);
- `write_full_hh_rlhf`: ``Dahoas/full-hh-rlhf``'s (``data/{train,test}-00000-of-00001.parquet`` with ``prompt``,
  ``response``, ``chosen``, ``rejected``).

The tokenizer is word-level over `WORDS` and prepends ``<bos>`` like a Llama tokenizer (EOS ``<eos>``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    PreTrainedTokenizerFast,
)

QUESTIONS = [
    "how do i bake bread ?",
    "what is a good name for a cat ?",
    "can you help me plan a trip ?",
    "why is the sky blue ?",
    "how do i fix my bike ?",
    "what should i cook tonight ?",
    "how can i sleep better ?",
    "is it safe to swim after eating ?",
]
ANSWERS = ["sure , here is how .", "i am not sure .", "you can try this .", "no , sorry ."]
WORDS = sorted({w for text in QUESTIONS + ANSWERS for w in text.split()}
               | set("Human: Assistant: human: USER: ASSISTANT: BEGINNING OF CONVERSATION: thanks more please :".split()))
WORDS = ["<unk>", "<pad>", "<eos>", "<bos>", *WORDS]
HIDDEN = 16


def word_tokenizer(words: Sequence[str] = WORDS) -> PreTrainedTokenizerFast:
    """Word-level over `words` (the first four: unk, pad, eos, bos), splitting on whitespace, with a
    leading ``<bos>`` (as Llama's)."""
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def llama_config(words: Sequence[str] = WORDS, **extra: Any) -> LlamaConfig:
    """A tiny Llama config over `word_tokenizer(words)`'s ids; `extra` sets more fields (a score model's)."""
    config = LlamaConfig(vocab_size=len(words), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=1, bos_token_id=3, eos_token_id=2, initializer_range=0.5)
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def save_sft_lm(path: Path, *, seed: int = 0) -> Path:
    """A tiny Llama causal LM and its tokenizer, as `save_pretrained` writes them."""
    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config()).eval().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


class ScoreCheckpoint:
    """A score model written in safe-rlhf's layout, and what a hand computation of its end score needs."""

    def __init__(self, path: Path, backbone: LlamaModel, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.path, self.backbone, self.weight, self.bias = path, backbone, weight, bias

    def end_score(self, ids: list[int]) -> float:
        """``h_last @ w + b`` at the last token of the unpadded sequence `ids`."""
        with torch.no_grad():
            hidden = self.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return float(hidden @ self.weight[0]) + float(self.bias[0])


def save_score_model(path: Path, *, seed: int = 1) -> ScoreCheckpoint:
    """A tiny ``LlamaForScore``: config.json with ``architectures``/``score_dim``/``score_bias``, safetensors of
    ``model.*`` + ``score_head.*``, and the tokenizer (as PKU-Alignment's reward and cost models ship)."""
    torch.manual_seed(seed)
    fields = {"architectures": ["LlamaForScore"], "score_dim": 1, "score_type": "reward", "do_normalize": False,
              "normalizer_type": None, "score_bias": True}
    backbone = LlamaModel(llama_config()).eval()
    weight, bias = torch.randn(1, HIDDEN), torch.randn(1)
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state.update({"score_head.weight": weight, "score_head.bias": bias})
    path.mkdir(parents=True)
    llama_config(**fields).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return ScoreCheckpoint(path, backbone, weight, bias)


def save_sequence_rm(path: Path, *, seed: int = 2) -> LlamaForSequenceClassification:
    """A tiny ``LlamaForSequenceClassification`` (num_labels=1) saved without a tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(llama_config(num_labels=1)).eval()
    model.save_pretrained(path)
    return model


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w.lower() for w in WORDS[4:]} | {":"})]


def save_bert_encoder(path: Path, *, seed: int = 3) -> BertModel:
    """A tiny BERT with its pooler (SimCSE's 'cls' embedding is the pooler output) and a WordPiece tokenizer
    read from a vocab.txt, as ``princeton-nlp/sup-simcse-bert-base-uncased`` ships them."""
    from transformers import BertTokenizer

    torch.manual_seed(seed)
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n", encoding="utf-8")
    config = BertConfig(vocab_size=len(BERT_WORDS), hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512, initializer_range=0.5)
    model = BertModel(config, add_pooling_layer=True).eval()
    model.save_pretrained(path)
    BertTokenizer(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    return model


def dialogue(question: str, answer: str, follow_up: bool) -> str:
    """An HH-RLHF dialogue: ``\\n\\nHuman: ...\\n\\nAssistant: ...`` (with a second exchange when `follow_up`)."""
    text = f"\n\nHuman: {question}\n\nAssistant: {answer}"
    return text + "\n\nHuman: thanks , more please\n\nAssistant: sure ." if follow_up else text


def write_hh_rlhf(root: Path, *, train_rows: int = 4, test_rows: int = 3) -> Path:
    """``Anthropic/hh-rlhf``'s layout: ``{helpful,harmless}-base/{train,test}.jsonl.gz`` of chosen/rejected."""
    for part, offset in (("helpful-base", 0), ("harmless-base", 4)):
        (root / part).mkdir(parents=True)
        for split, count in (("train", train_rows), ("test", test_rows)):
            rows = []
            for i in range(count):
                question = QUESTIONS[(offset + i + (split == "test")) % len(QUESTIONS)]
                rows.append({"chosen": dialogue(question, ANSWERS[i % 4], follow_up=i % 2 == 1),
                             "rejected": dialogue(question, ANSWERS[(i + 1) % 4], follow_up=i % 2 == 1)})
            with gzip.open(root / part / f"{split}.jsonl.gz", "wt", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_full_hh_rlhf(root: Path, *, train_rows: int = 4, test_rows: int = 6) -> Path:
    """``Dahoas/full-hh-rlhf``'s layout: ``data/{train,test}-00000-of-00001.parquet`` with prompt, response,
    chosen and rejected (the prompt is the dialogue up to the last ``Assistant:``)."""
    import pandas as pd

    (root / "data").mkdir(parents=True)
    for split, count in (("train", train_rows), ("test", test_rows)):
        rows = []
        for i in range(count):
            question = QUESTIONS[(i + 3 * (split == "test")) % len(QUESTIONS)]
            full = dialogue(question, ANSWERS[i % 4], follow_up=i % 3 == 2)
            cut = full.rfind("Assistant:") + len("Assistant:")
            rows.append({"prompt": full[:cut], "response": full[cut:], "chosen": full[cut:],
                         "rejected": " " + ANSWERS[(i + 1) % 4]})
        pd.DataFrame(rows).to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    return root
