"""Prompt sources: lists, JSONL files, HF datasets (hub or local) and the embedded world.

`load_prompts` turns any of them into a `PromptSet` of non-empty prompt strings, optionally
dropping prompts longer than `max_prompt_tokens` (the Proxy-RLHF paper drops prompts over 256
tokens) and drawing a seeded, order-stable sample of `num_prompts`.

HH convention: Anthropic HH-RLHF rows hold whole dialogues (``"\\n\\nHuman: ...\\n\\nAssistant:
..."``) in ``chosen``/``rejected`` and no prompt column. When ``column="chosen"``, or when no
column is given, the data has no ``prompt`` column and has a ``chosen`` column, the prompt is
the ``chosen`` text up to and including its last ``"Assistant:"`` (the turn to be generated;
``hh_prompt="context"``), or, with ``hh_prompt="first_turn"``, the text of its first human turn alone
(single-turn prompts, as the Proxy-RLHF / safe-rlhf lineage uses HH).

Prompt templates: ``template="BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"`` renders every prompt
(the dataset's text, or the first human turn) into the LM's format: ``{input}`` is replaced by it, nothing
else of the template is interpreted. Every consumer then sees the rendered prompt (the length filter, the
envs, the reward model, which reads ``rendered prompt + response``). A template and a chat template are
two ways of rendering: use one.

Several parts of one dataset (Anthropic/hh-rlhf's ``helpful-base`` and ``harmless-base``): ``data_dir`` may
be a list, whose parts are read one after the other (each through ``datasets.load_dataset``) and joined in
the order given.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

if TYPE_CHECKING:  # transformers loads lazily: reading a config that names prompts needs no torch
    from transformers import PreTrainedTokenizerBase

    from llm_envs.chat import ChatFormat

HH_MARKER = "Assistant:"
HH_HUMAN = "Human:"
HH_PROMPTS = ("context", "first_turn")
TEMPLATE_FIELD = "{input}"
_DICT_KEYS = ("dataset", "split", "column", "name", "data_dir", "hh_prompt", "template")
_WORLD_SPLITS = {"world:train": "train_prompts", "world:test": "test_prompts"}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_OFFLINE_HINT = (
    "Use source='world:train' (or 'world:test') for the embedded offline world's prompts, or pass a "
    "local .jsonl file, a Dataset.save_to_disk directory, or a list of strings."
)


@dataclass(frozen=True)
class PromptSet:
    """Prompts ready for the envs, with how many were dropped as too long and where they came from."""

    prompts: list[str]
    dropped_too_long: int = 0
    source: str = ""
    messages: list[str] | None = None  # the user messages of chat-rendered prompts (None: not rendered)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self.prompts[index]


PromptSource = str | os.PathLike | Sequence[str] | Mapping[str, Any] | PromptSet


def hh_prompt(dialogue: str) -> str | None:
    """The HH-RLHF prompt of a dialogue: the text up to and including its last "Assistant:"."""
    cut = dialogue.rfind(HH_MARKER)
    return None if cut == -1 else dialogue[: cut + len(HH_MARKER)]


def hh_first_turn(dialogue: str) -> str | None:
    """The first human turn of an HH-RLHF dialogue, alone: the text after its first "Human:" up to the
    "Assistant:" that answers it, stripped (None when the dialogue has no such turn)."""
    start = dialogue.find(HH_HUMAN)
    if start == -1:
        return None
    start += len(HH_HUMAN)
    end = dialogue.find(HH_MARKER, start)
    text = dialogue[start:end].strip() if end != -1 else ""
    return text or None


def check_template(template: Any, where: str = "template") -> str | None:
    """A prompt template is None or a string holding ``{input}`` exactly once; anything else is a ValueError
    naming it and the fix."""
    if template is None:
        return None
    if not isinstance(template, str) or template.count(TEMPLATE_FIELD) != 1:
        raise ValueError(
            f"{where}={template!r}; expected a string holding {TEMPLATE_FIELD} exactly once, where each prompt goes, "
            "e.g. 'BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:' (or null for prompts as they are)."
        )
    return template


def render_template(template: str, text: str) -> str:
    """`template` with ``{input}`` replaced by `text` (no other braces are read: ``str.replace``, not format)."""
    return template.replace(TEMPLATE_FIELD, text)


def _is_tokenizer(obj: Any) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(obj, PreTrainedTokenizerBase)


def load_prompts(
    source: PromptSource,
    *,
    split: str | None = None,
    column: str | None = None,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    max_prompt_tokens: int | None = None,
    num_prompts: int | None = None,
    seed: int = 0,
    chat: ChatFormat | None = None,
    template: str | None = None,
    hh_prompt: str | None = None,
) -> PromptSet:
    """Load prompts from `source` (see the module docstring), render, filter and sample them.

    `source`: a list/tuple of str (or a PromptSet); a ``.jsonl`` file (one JSON object per line with a
    ``"prompt"`` key, or `column`); ``.json``/``.csv``/``.parquet`` files; a
    ``save_to_disk`` directory or a directory of data files; a HF hub dataset name; a dict
    ``{"dataset": ..., "split": ..., "column": ..., "name": ..., "data_dir": ...}``; or
    ``"world:train"`` / ``"world:test"`` for the embedded offline world. A dict may also say ``hh_prompt``
    (``"context"``, the default, or ``"first_turn"``) and ``template`` (these keywords' forms in a config).

    `hh_prompt` says how an HH dialogue becomes a prompt; `template` renders every prompt (``{input}``).
    With `tokenizer` and `max_prompt_tokens`, prompts longer than that many tokens (special
    tokens included, after rendering) are dropped and counted. `num_prompts` then draws a sample with
    ``numpy.random.default_rng(seed)``, kept in source order.
    """
    options = {"template": template, "hh_prompt": hh_prompt}
    if isinstance(source, Mapping):
        source, split, column, extra = _from_dict(source, split, column, options)
    else:
        extra = {}
    template = check_template(options["template"])
    hh_mode = _check_hh_prompt(options["hh_prompt"])
    if template is not None and chat is not None:
        raise ValueError(f"template={template!r} and the LM's chat template would both render the prompts; use one "
                         "(task.chat_template: false with a template, or drop the template).")
    prompts, desc = _read(source, split=split, column=column, extra=extra, hh_mode=hh_mode)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(
                f"prompt {i} of {desc} is {type(prompt).__name__} ({prompt!r:.80}); expected str."
            )
        if not prompt.strip():
            raise ValueError(
                f"prompt {i} of {desc} is empty or whitespace-only ({prompt!r}); remove it from the source "
                "or fix the column (an env cannot start an episode from an empty prompt)."
            )
    messages = None
    if template is not None:
        prompts = [render_template(template, p) for p in prompts]
        desc = f"{desc}, rendered through the template {template!r}"
    if chat is not None:  # the one place prompts are rendered
        messages = [chat.message_of(p) or p for p in prompts]
        prompts = [chat.prompt(p) for p in prompts]
    dropped = 0
    if max_prompt_tokens is not None:
        kept, dropped = _filter_long(prompts, tokenizer, max_prompt_tokens, desc)
        if messages is not None:
            messages = [m for m, keep in zip(messages, kept) if keep]
        prompts = [p for p, keep in zip(prompts, kept) if keep]
    elif tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) and not _is_tokenizer(tokenizer):
        raise TypeError(f"tokenizer={tokenizer!r}; expected a tokenizer, its directory or hub name.")
    if not prompts:
        raise ValueError(f"{desc} holds no prompts; pass a source with at least one prompt.")
    if num_prompts is not None:
        picked = _sample(len(prompts), num_prompts, seed, desc, dropped, max_prompt_tokens)
        prompts = [prompts[i] for i in picked]
        messages = None if messages is None else [messages[i] for i in picked]
        desc = f"{desc}, {num_prompts} sampled (seed={seed})"
    if chat is not None:
        desc = f"{desc}, rendered through {chat.tokenizer_name}'s chat template"
    return PromptSet(prompts=list(prompts), dropped_too_long=dropped, source=desc, messages=messages)


# ---------------------------------------------------------------------- dispatch
def _from_dict(
    spec: Mapping[str, Any], split: str | None, column: str | None, options: dict[str, Any]
) -> tuple[Any, str | None, str | None, dict[str, Any]]:
    """(dataset, split, column, load_dataset keywords) of a source dict; its `hh_prompt` / `template` go into
    `options` (given both ways, they must agree)."""
    for key in spec:
        if key not in _DICT_KEYS:
            hint = difflib.get_close_matches(str(key), _DICT_KEYS, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(
                f"prompt source dict has an unknown key {key!r}; expected keys {list(_DICT_KEYS)}.{extra}"
            )
    if "dataset" not in spec:
        raise ValueError(
            f"prompt source dict {dict(spec)!r} has no 'dataset' key; "
            "e.g. {'dataset': 'Anthropic/hh-rlhf', 'split': 'test'}."
        )
    for key, given in (("split", split), ("column", column), *options.items()):
        if given is not None and spec.get(key) not in (None, given):
            raise ValueError(
                f"{key}={given!r} conflicts with the source dict's {key}={spec[key]!r}; give it once."
            )
    for key in options:
        options[key] = options[key] if spec.get(key) is None else spec[key]
    extra = {k: spec[k] for k in ("name", "data_dir") if spec.get(k) is not None}
    return spec["dataset"], split or spec.get("split"), column or spec.get("column"), extra


def _check_hh_prompt(value: Any) -> str:
    if value is None:
        return "context"
    if value not in HH_PROMPTS:
        raise ValueError(f"hh_prompt={value!r}; expected 'context' (the dialogue up to its last 'Assistant:') or "
                         "'first_turn' (its first human turn alone, for single-turn templates).")
    return str(value)


def _read(
    source: Any, *, split: str | None, column: str | None, extra: dict[str, Any], hh_mode: str = "context"
) -> tuple[list[Any], str]:
    parts = extra.get("data_dir")
    if isinstance(parts, (list, tuple)):  # several parts of one dataset, joined in order
        if not parts or not all(isinstance(d, str) and d for d in parts):
            raise ValueError(f"data_dir={parts!r}; expected a folder name or a non-empty list of them, e.g. "
                             "[helpful-base, harmless-base].")
        values: list[Any] = []
        descs = []
        for part in parts:
            got, desc = _read(source, split=split, column=column, extra={**extra, "data_dir": part}, hh_mode=hh_mode)
            values += got
            descs.append(f"{desc} ({len(got)})")
        return values, " + ".join(descs)
    if hh_mode != "context" and isinstance(source, (list, tuple, PromptSet)):
        raise ValueError(f"hh_prompt={hh_mode!r} applies to HH dialogues read from a dataset or file, not to a list "
                         "of prompts; pass the prompts as they should be, or the dataset.")
    if isinstance(source, PromptSet) and split is None and column is None:
        return list(source.prompts), source.source or f"a list of {len(source)} prompts"  # keeps its name
    if isinstance(source, PromptSet):
        source = source.prompts
    if isinstance(source, (list, tuple)):
        if split is not None or column is not None:
            raise ValueError(
                "split= and column= apply to datasets and files, not to a list of prompts; drop them."
            )
        return list(source), f"a list of {len(source)} prompts"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"prompt source {source!r:.80} ({type(source).__name__}) is not supported; expected a list of "
            "str, a .jsonl path, a dataset name or directory, a dict {'dataset': ...}, or "
            "'world:train'/'world:test'."
        )
    text = str(os.fspath(source))
    if text.startswith("world:"):
        return _read_world(text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl" and not extra:
            return _read_jsonl(path, column, split, hh_mode)
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(
                f"prompt file {text!r} has an unknown extension; expected one of {sorted(_FILE_BUILDERS)}."
            )
        return _read_dataset(
            builder, split=split or "train", column=column, desc=text, hh_mode=hh_mode, data_files=str(path), **extra
        )
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _read_from_disk(path, split, column, hh_mode)
        return _read_dataset(str(path), split=split, column=column, desc=text, hh_mode=hh_mode, **extra)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or path.suffix in _FILE_BUILDERS
    if looks_like_path:
        raise FileNotFoundError(f"prompt source {text!r}: no such file or directory. {_OFFLINE_HINT}")
    from llm_envs.models import _hub_endpoint_reachable

    if not _hub_endpoint_reachable() and not _hub_cached(str(text)):
        raise ConnectionError(
            f"dataset {text!r} is neither a local path nor reachable: the Hugging Face hub cannot be contacted "
            "from this machine (offline or HF_HUB_OFFLINE=1; a copy in the local HF cache is used only when "
            f"HF_HUB_OFFLINE=1 is set before Python starts). {_OFFLINE_HINT}"
        )
    return _read_dataset(text, split=split, column=column, desc=f"hub dataset {text!r}", hh_mode=hh_mode, **extra)


def _hub_cached(name: str) -> bool:
    """Whether a cached copy may exist; only with HF_HUB_OFFLINE set, which makes `datasets` use it."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in {"1", "true", "yes"}:
        return False
    try:
        from datasets import config as ds_config
        from huggingface_hub import constants

        hub = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
        built = Path(ds_config.HF_DATASETS_CACHE) / name.replace("/", "___")
        return hub.is_dir() or built.is_dir()
    except Exception:  # pragma: no cover - best-effort probe
        return False


def _read_world(text: str) -> tuple[list[Any], str]:
    if text not in _WORLD_SPLITS:
        raise ValueError(
            f"prompt source {text!r} is not a world split; expected one of {sorted(_WORLD_SPLITS)}."
        )
    from llm_envs.world import load_world  # lazy: building the world is expensive

    world = load_world()
    return list(getattr(world, _WORLD_SPLITS[text])), f"embedded world ({text})"


def _read_jsonl(path: Path, column: str | None, split: str | None, hh_mode: str) -> tuple[list[Any], str]:
    if split is not None:
        raise ValueError(f"split={split!r} does not apply to the single JSONL file {str(path)!r}; drop it.")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{str(path)!r} line {lineno} is not valid JSON ({exc.msg}): {line.strip()!r:.120}"
                ) from exc
            if not isinstance(row, dict):
                raise ValueError(
                    f"{str(path)!r} line {lineno} is a JSON {type(row).__name__}; expected an object such as "
                    '{"prompt": "..."}.'
                )
            rows.append(row)
    desc = f"JSONL file {str(path)!r}"
    if not rows:
        return [], desc
    columns = list(dict.fromkeys(k for row in rows for k in row))
    name, hh = _pick_column(columns, column, desc)
    values = []
    for i, row in enumerate(rows):
        if name not in row:
            raise ValueError(
                f"row {i} of {desc} has no {name!r} key (it has {sorted(row)}); every line needs one."
            )
        values.append(row[name])
    return _apply_hh(values, hh, desc, hh_mode, name), f"{desc}, column {name!r}"


def _read_from_disk(path: Path, split: str | None, column: str | None, hh_mode: str) -> tuple[list[Any], str]:
    from datasets import load_from_disk

    data = load_from_disk(str(path))
    return _from_loaded(data, split, column, f"dataset directory {str(path)!r}", hh_mode)


def _read_dataset(
    name: str, *, split: str | None, column: str | None, desc: str, hh_mode: str = "context", **kwargs: Any
) -> tuple[list[Any], str]:
    import datasets

    try:
        data = datasets.load_dataset(name, **kwargs)
    except (ConnectionError, FileNotFoundError) as exc:
        raise ConnectionError(f"could not load dataset {name!r} ({exc}). {_OFFLINE_HINT}") from exc
    if kwargs.get("data_dir"):
        desc = f"{desc}, data_dir {kwargs['data_dir']!r}"
    return _from_loaded(data, split, column, desc, hh_mode)


def _from_loaded(data: Any, split: str | None, column: str | None, desc: str, hh_mode: str = "context"
                 ) -> tuple[list[Any], str]:
    from datasets import DatasetDict

    if isinstance(data, DatasetDict):
        splits = list(data.keys())
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"{desc} has splits {splits}; pass split= (one of them).")
            split = splits[0]
        if split not in data:
            raise ValueError(f"split={split!r} is not in {desc}; available splits: {splits}.")
        data = data[split]
    elif split is not None and split != "train":
        raise ValueError(f"{desc} is a single dataset without splits; drop split={split!r}.")
    desc = f"{desc}, split {split!r}" if split else desc
    name, hh = _pick_column(list(data.column_names), column, desc)
    return _apply_hh(list(data[name]), hh, desc, hh_mode, name), f"{desc}, column {name!r}"


def _pick_column(columns: list[str], column: str | None, desc: str) -> tuple[str, bool]:
    """(column to read, whether to apply the HH cut)."""
    if column is not None:
        if column not in columns:
            hint = difflib.get_close_matches(column, columns, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(
                f"column {column!r} is not in {desc}; available columns: {columns}.{extra} "
                "Pass column= one of them."
            )
        return column, column == "chosen"
    if "prompt" in columns:
        return "prompt", False
    if "chosen" in columns:
        return "chosen", True
    raise ValueError(
        f"{desc} has no 'prompt' column (nor an HH-style 'chosen' column); available columns: {columns}. "
        "Pass column= naming the prompt column."
    )


def _apply_hh(values: list[Any], hh: bool, desc: str, hh_mode: str = "context", name: str = "chosen"
              ) -> list[Any]:
    if not hh:
        if hh_mode != "context":
            raise ValueError(
                f"hh_prompt={hh_mode!r} applies to HH dialogues (a 'chosen' column of '\\n\\nHuman: ...\\n\\n"
                f"Assistant: ...' text), but {desc} is read from its column {name!r}. Pass column: chosen if that "
                "column holds the dialogues, or drop hh_prompt."
            )
        return values
    first = hh_mode == "first_turn"
    out = []
    for i, value in enumerate(values):
        prompt = (hh_first_turn(value) if first else hh_prompt(value)) if isinstance(value, str) else None
        if prompt is None:
            what = f"no {HH_HUMAN!r} turn answered by {HH_MARKER!r}" if first else f"no {HH_MARKER!r}"
            raise ValueError(
                f"row {i} of {desc}, column 'chosen', has {what} ({value!r:.80}): not "
                "HH-RLHF format ('\\n\\nHuman: ...\\n\\nAssistant: ...'). Pass column= naming a plain prompt column."
            )
        out.append(prompt)
    return out


# ---------------------------------------------------------------------- filtering / sampling
def _filter_long(
    prompts: list[str], tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None, limit: int, desc: str
) -> tuple[list[bool], int]:
    """Which prompts have at most `limit` tokens as the envs encode them (`llm_envs.chat.encode_prompt`:
    a chat-rendered prompt without a second BOS), and how many do not."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_prompt_tokens={limit!r}; expected a positive int (the paper uses 256).")
    if tokenizer is None:
        raise ValueError(f"max_prompt_tokens={limit} needs tokenizer= (the LM's tokenizer) to count tokens.")
    if isinstance(tokenizer, (str, os.PathLike)):
        from llm_envs.models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    from llm_envs.chat import chat_format_of, encode_prompt

    if chat_format_of(tokenizer) is None:  # one batched call (the common case)
        lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []
    else:
        lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    kept = [n <= limit for n in lengths]
    dropped = len(prompts) - sum(kept)
    if prompts and not any(kept):
        raise ValueError(
            f"all {dropped} prompts of {desc} are longer than max_prompt_tokens={limit} "
            f"(shortest: {min(lengths)} tokens); raise max_prompt_tokens or use shorter prompts."
        )
    return kept, dropped


def _sample(total: int, num: int, seed: int, desc: str, dropped: int, limit: int | None) -> list[int]:
    """The indices of a seeded sample of `num` of `total` prompts, in source order."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num_prompts={num!r}; expected a positive int (or None for all prompts).")
    if num > total:
        after = f" after dropping {dropped} longer than max_prompt_tokens={limit}" if dropped else ""
        raise ValueError(
            f"num_prompts={num} but {desc} has only {total} prompts{after}; lower num_prompts or pass "
            "num_prompts=None for all of them."
        )
    picked = np.sort(np.random.default_rng(seed).choice(total, size=num, replace=False))
    return [int(i) for i in picked]
