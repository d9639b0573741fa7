"""One launch of several processes (`accelerate launch` or `torchrun`), one device each, as the bench and
RRHF see it: which process this is, a barrier, main-process-first blocks, gathering Python objects.

A plain one-process run never imports accelerate (`SINGLE_PROCESS`: every method trivial). Under a
launcher, `launch(device)` joins accelerate's process group: gloo when the device is the CPU ("auto"
without a GPU too), NCCL otherwise, each process on its own GPU ("auto" and "cuda" then mean it).
`accelerate launch --multi_gpu --num_processes N` (or `torchrun --nproc_per_node N`) starts N local
processes; on a machine without GPUs they join over gloo.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, TypeVar

# Set by torchrun / `accelerate launch` (WORLD_SIZE) and by MPI launchers: the variables accelerate's
# PartialState reads the process count from.
PROCESS_COUNT_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# The other processes wait at a barrier while the main process trains a proxy, or samples, scores or
# evaluates RRHF's responses, hours on a real LM: the process group's default timeout (30 minutes, 10 for
# NCCL) would end the launch. A process that dies still ends the others at once (the launcher stops them).
WAIT_TIMEOUT = timedelta(hours=24)

T = TypeVar("T")


def launched_process_count() -> int:
    """How many processes the launcher started (1 for a plain `llm-envs bench`), from its environment."""
    for name in PROCESS_COUNT_VARS:
        value = os.environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError as error:
                raise ValueError(f"{name}={value!r} is not a process count; expected an int (the launcher sets "
                                 "it: unset it for a one-process run).") from error
    return 1


@dataclass(frozen=True)
class Processes:
    """This process's place in the launch: `index` of `count`; `state` is accelerate's `PartialState`
    when there are several (None for one process: then every method below does nothing or is trivial)."""

    index: int = 0
    count: int = 1
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.state is not None:
            self.state.wait_for_everyone()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. trains, builds the world) while the others wait;
        then the others run it (and find the main process's result)."""
        if self.state is None:
            yield
            return
        with self.state.main_process_first():
            yield

    def gather(self, item: T) -> list[T]:
        """Every process's `item`, in process order (on every process)."""
        if self.state is None:
            return [item]
        from accelerate.utils import gather_object

        return gather_object([item])

    def close(self) -> None:
        """End the launch's process group (after the last collective), so that every process exits cleanly."""
        if self.state is not None:
            self.state.destroy_process_group()


SINGLE_PROCESS = Processes()


def launch(device: str) -> Processes:
    """This process's `Processes`: one process unless a launcher started several; then accelerate's
    process group (gloo when `device` is "cpu" or there is no GPU, else NCCL, one GPU per process)."""
    if launched_process_count() <= 1:
        return SINGLE_PROCESS
    import torch
    from accelerate import PartialState

    from llm_envs.models import resolve_device

    # cpu=True on CPU ("auto" without a GPU too): without it accelerate makes every CPU process a
    # one-process run of its own. RRHF's run and training then join this state (their cpu= flag asks no
    # more than it has).
    state = PartialState(cpu=resolve_device(device).type == "cpu", timeout=WAIT_TIMEOUT)
    if state.device.type == "cuda":  # "auto" and "cuda" (no index) then mean this process's GPU
        torch.cuda.set_device(state.device)
    return Processes(state.process_index, state.num_processes, state)
