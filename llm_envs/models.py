"""Loading causal LMs, reward models and tokenizers by hub name, local directory or object.

Every component of llm_envs (engine, reward wrapper, agents) loads models through these
functions, so hub names, local directories and already-loaded models behave the same way
everywhere. Offline, an unknown name fails fast (seconds, not the hub client's retries) with
a message that says how to use the embedded world instead.

The small facts every caller needs about a loaded model live here too, written once:
`context_length` (how many positions it supports), `resolve_tokenizer` (the tokenizer that goes
with an `lm=` argument), and the KV-cache keyword of ``forward`` (`cache_kwargs`,
`output_cache`), which transformers renamed from ``past_key_values`` to ``cache`` in 5.24.
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

ModelSpec = str | os.PathLike | PreTrainedModel


class ModelNotFoundError(OSError):
    """A model name is neither a local directory nor reachable on the hub."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`"auto"`/None -> cuda when available, else cpu; anything else is passed to torch."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available on this machine; "
            "pass device='auto' (cuda when present, else cpu) or device='cpu'."
        )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`"auto"`/None -> float32 (bit-exact reference numerics); names as in `DTYPES`."""
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected one of {sorted(DTYPES)}.")
    resolved = DTYPES[dtype]
    if resolved == torch.float16 and device.type == "cpu":
        raise ValueError(
            "dtype='float16' is not supported on cpu (half-precision matmuls are slow or missing); "
            "use dtype='float32' or 'bfloat16' on cpu, or run on a CUDA device."
        )
    return resolved


def _hub_endpoint_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint: seconds instead of the client's retry loop."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _resolve_source(name_or_path: str | os.PathLike, what: str) -> tuple[str, bool]:
    """Return (source, local_files_only) for from_pretrained, or raise a clear error."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise ModelNotFoundError(
            f"{what} {text!r} is a file, not a model directory; pass the directory that holds "
            "config.json (the one you gave to save_pretrained)."
        )
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not an "org/name" id
        raise ModelNotFoundError(
            f"{what} {text!r}: no such local directory. Pass an existing directory holding "
            "config.json, or a hub id such as 'org/name'."
        )
    # A hub id ("org/name" or "name"): use the local hub cache if it already holds it.
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(text, "config.json")
        if isinstance(cached, str):
            return text, True
    except Exception:  # pragma: no cover - cache probing is best-effort
        pass
    if not _hub_endpoint_reachable():
        raise ModelNotFoundError(
            f"{what} {text!r} is neither a local directory nor reachable: the Hugging Face hub "
            "cannot be contacted from this machine (offline or HF_HUB_OFFLINE=1) and the model "
            "is not in the local cache. Pass a local directory (save_pretrained output), or use "
            "the embedded offline world: leave lm/reward unset, or "
            "`llm_envs.world.load_world().lm_dir` / `.rm_dir`."
        )
    return text, False


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    padding_side: str = "left",
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it batch-ready: a pad token (EOS when missing) and a padding side.

    Left padding is the default because every consumer here appends tokens at the right end.
    """
    if padding_side not in {"left", "right"}:
        raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'.")
    source, local_only = _resolve_source(name_or_path, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(
        source, local_files_only=local_only, trust_remote_code=trust_remote_code
    )
    return prepare_tokenizer(tokenizer, padding_side=padding_side)


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, *, padding_side: str = "left"
) -> PreTrainedTokenizerBase:
    """Give a tokenizer a pad token (its EOS when it has none) and set the padding side."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token; "
                "set tokenizer.pad_token before passing it in."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _load_model(
    auto_cls: Any,
    spec: ModelSpec,
    what: str,
    *,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    trust_remote_code: bool,
    **extra: Any,
) -> PreTrainedModel:
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    if isinstance(spec, PreTrainedModel):
        model = spec
        if dtype is not None and dtype != "auto":
            model = model.to(dtype=target_dtype)
        if device is not None:
            model = model.to(target_device)
    else:
        source, local_only = _resolve_source(spec, what)
        model = auto_cls.from_pretrained(
            source,
            local_files_only=local_only,
            trust_remote_code=trust_remote_code,
            dtype=target_dtype,
            **extra,
        ).to(target_device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_causal_lm(
    spec: ModelSpec,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A frozen causal LM (eval mode, no grad) from a hub name, local dir or loaded model."""
    return _load_model(
        AutoModelForCausalLM,
        spec,
        "causal LM",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )


def load_reward_model(
    spec: ModelSpec,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A frozen sequence-classification reward model with one output (num_labels=1)."""
    model = _load_model(
        AutoModelForSequenceClassification,
        spec,
        "reward model",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model {model.config.name_or_path!r} has num_labels={model.config.num_labels}; "
            "a reward model must output one scalar (num_labels=1)."
        )
    return model


def load_encoder(
    spec: ModelSpec, *, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto"
) -> PreTrainedModel:
    """A frozen base model (`AutoModel`, no head), e.g. a sentence encoder for the coherence metric."""
    from transformers import AutoModel

    return _load_model(AutoModel, spec, "encoder", device=device, dtype=dtype, trust_remote_code=False)


def model_source_name(spec: ModelSpec) -> str:
    """Where a model came from (for tokenizer loading and result provenance)."""
    if isinstance(spec, PreTrainedModel):
        return str(spec.config.name_or_path or type(spec).__name__)
    return str(spec)


def resolve_tokenizer(
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None, lm: Any, model: PreTrainedModel
) -> PreTrainedTokenizerBase:
    """The batch-ready tokenizer for an LM given as ``lm`` (spec) and loaded as ``model``.

    A tokenizer object is prepared as is (`prepare_tokenizer`), a name or directory is loaded;
    ``None`` loads the one saved beside the LM (its directory / hub name, or for a loaded model
    its ``config.name_or_path``, which must then be set).
    """
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return prepare_tokenizer(tokenizer)
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    source = lm if not isinstance(lm, PreTrainedModel) else model.config.name_or_path
    if not source:
        raise ValueError(
            "lm= was given as a loaded model with no name_or_path, so its tokenizer cannot be "
            "found; pass tokenizer= (a tokenizer object, hub name or directory)."
        )
    return load_tokenizer(source)


def context_length(model_or_config: Any) -> int | None:
    """The most positions a model supports (``max_position_embeddings`` / ``n_positions`` of
    its text config); None when the config does not say. Takes a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):  # multimodal configs keep the LM's limit in a sub-config
        config = config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if limit else None


# ---------------------------------------------------------------------------- the KV-cache keyword
# transformers 5.24 renamed forward's ``past_key_values=`` to ``cache=`` (the old name warns and
# goes away in 5.40) and outputs carry ``cache``; 5.0-5.23 only know ``past_key_values``. The
# name is read from the installed forward's signature, once per model class.
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values")
_cache_kwarg_by_class: dict[type, str] = {}


def cache_kwarg(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache under: ``"cache"`` (transformers >= 5.24)
    or ``"past_key_values"`` (older 5.x, and forwards that only take ``**kwargs``)."""
    cls = type(model)
    name = _cache_kwarg_by_class.get(cls)
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = next((n for n in CACHE_KWARGS if n in params), "past_key_values")
        _cache_kwarg_by_class[cls] = name
    return name


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a call of `model` (see `cache_kwarg`): ``model(..., **cache_kwargs(model, c))``."""
    return {cache_kwarg(model): cache}


def output_cache(output: Mapping[str, Any]) -> Any:
    """The KV cache a forward returned, under either name (None when it returned none).

    Reads the output's keys, not its attributes: the ``past_key_values`` attribute of a 5.24
    output is a deprecated alias that logs a warning.
    """
    for name in CACHE_KWARGS:
        if name in output.keys():
            return output[name]
    return None
