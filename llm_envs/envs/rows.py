"""Row state as arrays (struct of arrays), step infos by column, and the one host copy of a step.

A batched core keeps what its N rows hold in two places, split by who produces it:
- on the host, as numpy arrays with a leading row axis (`RowArrays`): what follows from the
  actions alone (steps, rejections, response tokens, costs, liveness) plus a mirror of what the
  last step copied back from the device (candidate ids and probabilities, masks, observations).
  Host arrays make the step's bookkeeping a handful of vectorised numpy operations instead of a
  Python loop over rows, and let the core validate the next actions against the mirrored masks
  without waiting on the device.
- on the engine's device, as torch tensors (the MDP module's pools, hidden states, logits).

`pack_rows` / `HostPack` move everything the host needs from a step's device tensors in ONE
device-to-host copy: the tensors are reinterpreted as bytes and concatenated per row, copied,
and viewed back as numpy arrays of their own dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, make_dataclass
from typing import Any

import numpy as np
import torch

from llm_envs.envs.pools import sync_free

__all__ = ["HostPack", "RowArrays", "StepInfos", "merge_infos", "pack_rows", "to_device"]


class RowArrays:
    """Named numpy arrays with a leading axis of N rows (`fields`: name -> (dtype, trailing shape)).

    Attribute access gives the array (`rows.steps[idx] += 1`); `clear(rows)` zeroes rows for a new
    episode; `copy()` / `restore()` give a step its undo (a step that raises leaves every row as it
    was); `row(i)` is a read-only snapshot of one row (a frozen dataclass, for tests and renders).
    """

    def __init__(self, num_rows: int, fields: Mapping[str, tuple[Any, tuple[int, ...]]]) -> None:
        self.num_rows = num_rows
        self._fields = dict(fields)
        self._arrays = {name: np.zeros((num_rows, *shape), dtype=dtype) for name, (dtype, shape) in fields.items()}
        self._snapshot_class = make_dataclass("RowSnapshot", list(self._fields), frozen=True)
        # Plain attributes (a __getattr__ costs a Python call on every access, dozens per step); the
        # arrays are only ever changed in place, so these references stay the arrays.
        self.__dict__.update(self._arrays)

    def clear(self, rows: Sequence[int] | np.ndarray) -> None:
        """Every field of `rows` back to zero (None for object fields)."""
        for array in self._arrays.values():
            array[rows] = None if array.dtype == object else 0

    def copy(self) -> dict[str, np.ndarray]:
        return {name: array.copy() for name, array in self._arrays.items()}

    def restore(self, saved: dict[str, np.ndarray]) -> None:
        for name, array in saved.items():
            self._arrays[name][...] = array

    def row(self, i: int) -> Any:
        values = {}
        for name, array in self._arrays.items():
            value = array[i]
            values[name] = value.copy() if isinstance(value, np.ndarray) else value
        return self._snapshot_class(**values)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without making the host wait: on CUDA through pinned memory and a
    non-blocking copy (a pageable copy would synchronise with the stream), on CPU shared as is."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class HostPack:
    """The host side of one `pack_rows` copy: `pack[name]` is that tensor's rows as numpy."""

    arrays: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def pack_rows(tensors: Mapping[str, torch.Tensor]) -> HostPack:
    """Copy tensors that share a leading row axis [R, ...] to the host in one transfer.

    Each is flattened per row and reinterpreted as bytes, the byte rows are concatenated into one
    [R, total] uint8 tensor, copied once (`.cpu()`), and split back into numpy views of the original
    dtypes and shapes. Bool tensors travel as uint8. Tensors already on the host (and not a test of
    the accelerator path) come back as numpy views: packing only pays off when it saves transfers.
    """
    rows = next(iter(tensors.values())).shape[0] if tensors else 0
    for name, tensor in tensors.items():
        if tensor.shape[0] != rows:
            raise ValueError(f"pack_rows: {name} has {tensor.shape[0]} rows, expected {rows}.")
    if not any(sync_free(tensor.device) for tensor in tensors.values()):
        return HostPack({name: tensor.numpy() for name, tensor in tensors.items()})
    names, parts, layout = [], [], []
    for name, tensor in tensors.items():
        flat = tensor.reshape(rows, -1)
        if flat.numel() and flat.stride(-1) != 1:  # also a "contiguous" [1, 1] view of a wider row
            flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        parts.append(flat.view(torch.uint8))
        names.append(name)
        layout.append((tensor.dtype, tuple(tensor.shape[1:]), flat.shape[1] * flat.element_size()))
    host = torch.cat(parts, 1).cpu().numpy() if parts else np.zeros((0, 0), dtype=np.uint8)
    arrays, start = {}, 0
    for name, (dtype, shape, width) in zip(names, layout):
        block = np.ascontiguousarray(host[:, start:start + width])
        start += width
        np_dtype = np.uint8 if dtype == torch.bool else torch.empty(0, dtype=dtype).numpy().dtype
        values = block.view(np_dtype).reshape(host.shape[0], *shape)
        arrays[name] = values.astype(bool) if dtype == torch.bool else values
    return HostPack(arrays)


class StepInfos:
    """A step's infos: per-step keys as columns (one array over all rows), the few per-row extras
    (an ended episode's final info) as dicts.

    Built without a loop over rows; each face reads the layout it needs: `row(i)` (the single env,
    SB3's list), `vector()` (Gymnasium's vector layout, `info[key]` plus its mask `info["_" + key]`).
    """

    def __init__(self, num_rows: int, present: np.ndarray) -> None:
        self.num_rows = num_rows
        self.present = present  # [N] bool: rows that have an info this step (others get {})
        self.columns: dict[str, np.ndarray] = {}
        self.extra: dict[int, dict[str, Any]] = {}

    def row(self, i: int) -> dict[str, Any]:
        if not self.present[i]:
            return {}
        info = {key: python_scalar(values[i]) for key, values in self.columns.items()}
        info.update(self.extra.get(i, {}))
        return info

    def as_list(self) -> list[dict[str, Any]]:
        return [self.row(i) for i in range(self.num_rows)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.row(i)

    def __len__(self) -> int:
        return self.num_rows

    def vector(self) -> dict[str, Any]:
        """Gymnasium's vector info layout (as `VectorEnv._add_info` builds it row by row)."""
        merged: dict[str, Any] = {}
        if not self.present.any():
            return {}
        for key, values in self.columns.items():
            merged[key] = _typed_column(values, self.present)
            merged[f"_{key}"] = self.present.copy()
        if self.extra:
            rows = sorted(self.extra)
            extra = merge_infos([self.extra[r] for r in rows], rows, self.num_rows)
            merged.update(extra)
        return merged


def _typed_column(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """A column as `merge_infos` types it: by the first present row's value (int, float, bool,
    numpy number: a typed array, 0 elsewhere; anything else: objects, None elsewhere)."""
    first = python_scalar(values[present][0])
    if type(first) in (int, float, bool) or isinstance(first, np.number):
        column = np.zeros(len(values), dtype=type(first))
        column[present] = values[present]
        return column
    column = np.full(len(values), None, dtype=object)
    column[present] = values[present]
    return column


def python_scalar(value: Any) -> Any:
    """A numpy scalar as the Python value a single env's info has always held."""
    return value.item() if isinstance(value, np.generic) else value


def merge_infos(row_infos: Sequence[dict[str, Any]], rows: Sequence[int], num_envs: int) -> dict[str, Any]:
    """Gymnasium's vector info layout (what `VectorEnv._add_info` builds row by row: `info[key]`
    an array over envs, `info["_" + key]` its mask; nested dicts recursively; `final_obs` an
    object array), built key by key: one array write per key instead of several dict and array
    operations per row and key, which cost ~1 ms per step at N=64."""
    columns: dict[str, tuple[list[int], list[Any]]] = {}
    for info, row in zip(row_infos, rows):
        for key, value in info.items():
            at, values = columns.setdefault(key, ([], []))
            at.append(row)
            values.append(value)
    merged: dict[str, Any] = {}
    for key, (at, values) in columns.items():
        first = values[0]
        if key != "final_obs" and isinstance(first, dict):
            merged[key] = merge_infos(values, at, num_envs)
        elif key != "final_obs" and (type(first) in (int, float, bool) or isinstance(first, np.number)):
            merged[key] = np.zeros(num_envs, dtype=type(first))
            merged[key][at] = values
        elif key != "final_obs" and isinstance(first, np.ndarray):
            merged[key] = np.zeros((num_envs, *first.shape), dtype=first.dtype)
            merged[key][at] = values
        else:  # objects (lists, str, None, final_obs): one element each, never broadcast
            merged[key] = np.full(num_envs, fill_value=None, dtype=object)
            for row, value in zip(at, values):
                merged[key][row] = value
        mask = np.zeros(num_envs, dtype=np.bool_)
        mask[at] = True
        merged[f"_{key}"] = mask
    return merged
