"""safe-rlhf *score models* (``LlamaForScore``, ``LlamaModelForScore``, ...) as reward models.

Why this module exists: PKU-Alignment's reward and cost models (``beaver-7b-v1.0-reward`` /
``-cost``, the Proxy-RLHF and MARA lineage's RMs) are not sequence classifiers. Their checkpoint is a
transformer backbone plus a ``score_head`` linear layer; ``AutoModelForSequenceClassification`` loads
them with a *random* ``score`` head and no error, so every reward would be silently meaningless.
This module reads such a checkpoint as safe-rlhf does and gives a small torch module that the
reward wrapper uses like a HF sequence classifier (``model(input_ids, attention_mask).logits`` of
shape ``[batch, 1]``; ``.config``, ``.base_model`` and ``.score`` for the candidate prefix cache).

The layout and rules, as safe-rlhf's ``ScoreModelMixin`` writes and reads them:

- **Recognised** by its config's ``architectures`` (a name ending in ``ForScore``) or by
  ``score_head.*`` weights in the checkpoint (`is_score_checkpoint`).
- **Backbone**: the architecture's base model under its usual prefix (``model.`` for Llama),
  loaded here with ``AutoModel.from_pretrained``; a backbone weight the checkpoint lacks is refused.
- **Head**: ``score_head = Linear(hidden_size, score_dim, bias)``. ``score_dim`` (default 1) must be 1
  for a reward. The bias flag is ``score_bias`` in newer configs (default True) and ``bias`` in the
  v1.0-era ones (``LlamaModelForScore``, default False); a bias the config announces but the weights
  lack is refused.
- **End score** (``end_scores``): per-position scores ``score_head(h).float()``, read at the last
  position the attention mask keeps. Position ids follow the mask here, so a left-padded row scores
  as the same row unpadded (safe-rlhf pads on the right, where both agree).
- **Normalisation**, only when the config says ``do_normalize``: by ``score_type``, ``reward`` ->
  ``(s - mean) / (std + 1e-8)``, ``cost`` -> ``s / (std + 1e-8)``, ``critic`` -> ``s``; ``mean``/``var``
  from the checkpoint's ``normalizer.*`` buffers, else the config's ``mean``/``var``, else 0 and 1.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ModelOutput,
    cached_file,
)

__all__ = [
    "HEAD_PREFIX",
    "NORMALIZER_PREFIX",
    "ScoreHead",
    "ScoreModel",
    "ScoreModelOutput",
    "checkpoint_weight_names",
    "is_score_checkpoint",
    "load_score_model",
]

HEAD_PREFIX = "score_head."
NORMALIZER_PREFIX = "normalizer."
NORMALIZE_EPS = 1e-8  # safe-rlhf's Normalizer.normalize epsilon
SCORE_TYPES = ("reward", "cost", "critic")


class ScoreHead(nn.Module):
    """``score_head`` plus safe-rlhf's normalisation: hidden states ``[..., E]`` -> float scores ``[..., D]``.

    One module, so the reward wrapper's candidate prefix cache (which reads ``model.score`` on the
    backbone's hidden states) scores exactly as `ScoreModel.forward` does.
    """

    def __init__(self, linear: nn.Linear, *, normalize: str, mean: torch.Tensor, var: torch.Tensor) -> None:
        super().__init__()
        if normalize not in ("affine", "scale", "identity", "none"):
            raise ValueError(f"normalize={normalize!r}; expected 'affine', 'scale', 'identity' or 'none'.")
        self.linear = linear
        self.normalize = normalize
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("var", var.detach().float().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = self.linear(hidden).float()  # the head runs in the model's dtype, scores in float32
        if self.normalize == "affine":
            return (scores - self.mean) / (self.var.sqrt() + NORMALIZE_EPS)
        if self.normalize == "scale":
            return scores / (self.var.sqrt() + NORMALIZE_EPS)
        return scores


@dataclass
class ScoreModelOutput(ModelOutput):
    """`ScoreModel.forward`'s output: ``logits`` = the end scores ``[B, D]`` (the name the reward
    wrapper reads from HF classifiers), ``scores`` per position ``[B, L, D]``, ``end_index`` ``[B]``."""

    logits: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    end_index: torch.Tensor | None = None


class ScoreModel(nn.Module):
    """A safe-rlhf score model: a transformers backbone and a `ScoreHead`, read at the end token.

    Carries what the reward wrapper reads from a HF sequence classifier: ``config`` (the backbone's,
    with the checkpoint's score fields), ``device``, ``dtype``, ``base_model`` (the backbone) and
    ``score`` (the head over hidden states). ``architecture`` is the checkpoint's class name.
    """

    def __init__(self, backbone: PreTrainedModel, head: ScoreHead, *, architecture: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.score = head
        self.architecture = architecture
        self._takes_positions = "position_ids" in inspect.signature(backbone.forward).parameters

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    @property
    def base_model(self) -> PreTrainedModel:
        return self.backbone

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ScoreModelOutput:
        """End scores of a (right- or left-) padded batch: the score at each row's last kept position."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)}; a score model reads a 2-D [batch, length] "
                f"mask like input_ids {tuple(input_ids.shape)} (1 = token, 0 = padding)."
            )
        keep = attention_mask.bool()
        if not bool(keep.any(dim=-1).all()):
            raise ValueError("a row of attention_mask keeps no position; every row needs at least one token.")
        if position_ids is None and self._takes_positions:
            position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)  # padding-invariant positions
        if self._takes_positions:
            kwargs["position_ids"] = position_ids
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        scores = self.score(hidden)  # [B, L, D]
        length = keep.shape[-1]
        end_index = length - 1 - keep.flip(-1).long().argmax(-1)  # the last kept position of each row
        rows = torch.arange(scores.shape[0], device=scores.device)
        return ScoreModelOutput(logits=scores[rows, end_index.to(scores.device)], scores=scores, end_index=end_index)


# ---------------------------------------------------------------------------- reading a checkpoint
def _checkpoint_file(source: str, name: str, local_only: bool) -> str | None:
    """The local path of one file of a checkpoint (directory or hub id, fetched when allowed), or None."""
    return cached_file(source, name, local_files_only=local_only, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def _weight_index(source: str, local_only: bool) -> dict[str, str] | None:
    """{weight name: file name} of a checkpoint (its index, or its one weights file); None when it has
    no weights transformers would read (safetensors or PyTorch ``.bin``)."""
    for index_name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index = _checkpoint_file(source, index_name, local_only)
        if index is not None:
            with open(index, encoding="utf-8") as f:
                return dict(json.load(f)["weight_map"])
    for single in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        path = _checkpoint_file(source, single, local_only)
        if path is not None:
            return {name: single for name in _tensor_names(path)}
    return None


def _tensor_names(path: str) -> list[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(_load_bin(path))


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` state dict, memory-mapped when its format allows (legacy files cannot be)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_tensors(source: str, index: Mapping[str, str], names: list[str], local_only: bool) -> dict[str, torch.Tensor]:
    """The tensors `names` (each present in `index`) read from the checkpoint files that hold them."""
    out: dict[str, torch.Tensor] = {}
    for file_name in sorted({index[n] for n in names}):
        path = _checkpoint_file(source, file_name, local_only)
        if path is None:
            raise FileNotFoundError(f"checkpoint {source!r} lists {file_name!r} in its weight index, but the file is "
                                    "missing; download the checkpoint again.")
        wanted = [n for n in names if index[n] == file_name]
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in wanted})
        else:
            state = _load_bin(path)
            out.update({n: state[n] for n in wanted})
    return out


def checkpoint_weight_names(source: str | os.PathLike, *, local_only: bool = True) -> list[str] | None:
    """The weight names a checkpoint holds (from its index or weights file, without loading tensors);
    None when it holds no safetensors/``.bin`` weights."""
    index = _weight_index(str(source), local_only)
    return sorted(index) if index is not None else None


def is_score_checkpoint(source: str | os.PathLike, config: PretrainedConfig, *, local_only: bool = True) -> bool:
    """A safe-rlhf score model: ``architectures`` names a ``*ForScore`` class, or (when the config names
    no sequence classifier) the checkpoint holds ``score_head.*`` weights."""
    architectures = [str(a) for a in getattr(config, "architectures", None) or []]
    if any(a.endswith("ForScore") for a in architectures):
        return True
    if architectures and all(a.endswith("ForSequenceClassification") for a in architectures):
        return False  # a classifier: no need to read its weight names
    return any(n.startswith(HEAD_PREFIX) for n in checkpoint_weight_names(source, local_only=local_only) or [])


# ---------------------------------------------------------------------------- building the model
@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while the backbone loads: it lists the head's weights as
    UNEXPECTED (true for the backbone alone, and alarming to read); real problems are raised here."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _head_bias(config: PretrainedConfig, names: set[str]) -> bool:
    """Whether the head has a bias, as safe-rlhf decides it: ``score_bias`` (newer configs), else
    ``bias`` (v1.0-era configs), else whether the checkpoint holds one."""
    for key in ("score_bias", "bias"):
        value = getattr(config, key, None)
        if isinstance(value, bool):
            return value
    return f"{HEAD_PREFIX}bias" in names


def _normalization(config: PretrainedConfig, what: str) -> str:
    """How end scores are normalised: 'none' unless the config says ``do_normalize``; then by ``score_type``."""
    score_type = getattr(config, "score_type", "reward") or "reward"
    if score_type not in SCORE_TYPES:
        raise ValueError(f"{what} has score_type={score_type!r}; safe-rlhf score models are one of "
                         f"{list(SCORE_TYPES)}. Fix score_type in its config.json.")
    if not getattr(config, "do_normalize", False):
        return "none"
    return {"reward": "affine", "cost": "scale", "critic": "identity"}[score_type]


def _mean_var(
    config: PretrainedConfig, tensors: Mapping[str, torch.Tensor], dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normaliser's mean and var: the checkpoint's buffers, else the config's lists, else 0 and 1."""
    stats = []
    for key, default in (("mean", 0.0), ("var", 1.0)):
        value = tensors.get(f"{NORMALIZER_PREFIX}{key}")
        if value is None and getattr(config, key, None) is not None:
            value = torch.as_tensor(getattr(config, key), dtype=torch.float32)
        stats.append(value.reshape(dim).float() if value is not None else torch.full((dim,), default))
    return stats[0], stats[1]


def _refuse_missing(what: str, missing: list[str], expected: str) -> None:
    if missing:
        shown = ", ".join(sorted(missing)[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(
            f"{what} lacks weights it needs: {shown}. They would be initialised at random, so every score would be "
            f"meaningless. Expected {expected}. Pass the complete checkpoint (all shards of a safe-rlhf score model: "
            "backbone weights plus score_head.*), or another reward model."
        )


def _head_linear(tensors: Mapping[str, torch.Tensor], hidden: int, bias: bool, what: str) -> nn.Linear:
    """``score_head`` as a Linear(hidden, 1) holding the checkpoint's weights (shapes checked)."""
    weight = tensors[f"{HEAD_PREFIX}weight"]
    if tuple(weight.shape) != (1, hidden):
        raise ValueError(f"{what} has score_head.weight of shape {tuple(weight.shape)}; expected (1, {hidden}) "
                         "(score_dim=1 over the backbone's hidden size). The checkpoint does not match its config.")
    linear = nn.Linear(hidden, 1, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias:
            linear.bias.copy_(tensors[f"{HEAD_PREFIX}bias"].reshape(1))
    return linear


def load_score_model(
    source: str,
    config: PretrainedConfig,
    *,
    local_only: bool,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> ScoreModel:
    """A frozen `ScoreModel` from a resolved checkpoint `source` (directory or hub id) and its `config`.

    The backbone comes from ``AutoModel.from_pretrained`` (transformers strips the ``model.`` prefix);
    the head's weights (and normaliser buffers) are read from the checkpoint files that hold them.
    """
    what = f"score model {source!r} ({', '.join(getattr(config, 'architectures', None) or ['no architectures'])})"
    index = _weight_index(source, local_only)
    names = set(index or {})
    if getattr(config, "score_dim", 1) != 1:
        raise ValueError(f"{what} has score_dim={config.score_dim}; a reward is one number per pair (score_dim=1). "
                         "Pass a score model with one output.")
    normalize = _normalization(config, what)  # checked before the backbone loads: a bad config fails at once
    bias = _head_bias(config, names)
    head_names = [f"{HEAD_PREFIX}weight"] + ([f"{HEAD_PREFIX}bias"] if bias else [])
    _refuse_missing(what, [n for n in head_names if n not in names], "a score_head.weight [1, hidden_size]"
                    + (" and a score_head.bias [1] (the config sets the head's bias)" if bias else ""))
    with _quiet_transformers():
        backbone, info = AutoModel.from_pretrained(source, local_files_only=local_only, dtype=dtype,
                                                   trust_remote_code=trust_remote_code, output_loading_info=True)
    _refuse_missing(what, sorted(info["missing_keys"]), f"every weight of its {type(backbone).__name__} backbone")
    stats = [n for n in (f"{NORMALIZER_PREFIX}mean", f"{NORMALIZER_PREFIX}var") if n in names]
    tensors = _read_tensors(source, index or {}, head_names + stats, local_only)
    linear = _head_linear(tensors, int(backbone.config.hidden_size), bias, what)
    mean, var = _mean_var(config, tensors, 1)
    head = ScoreHead(linear.to(dtype), normalize=normalize, mean=mean, var=var)
    architecture = (getattr(config, "architectures", None) or ["score model"])[0]
    model = ScoreModel(backbone, head, architecture=str(architecture)).to(device)
    model.eval()
    model.requires_grad_(False)
    return model
