"""`llm-envs bench` launched on several processes (`accelerate launch` or `torchrun`), one device each.

    accelerate launch --multi_gpu --num_processes 8 -m benchmarks.cli bench --config hh_gpu --no-progress

Each process decodes a share of the held-out prompts (`chunk_shard`): a contiguous run of whole
chunks, the very chunks a single process decodes (`agents.harness.generate_all`), so every prompt is
decoded beside the same neighbours, with the same padding and the same seed. The main process
gathers the generations in prompt order (`Processes.gather`), scores them all, writes the records and
the leaderboard: a deterministic method's records equal a single-process run's exactly (a sampled
method's too, its chunk seeds being the same).

Why the main process scores every response, not each process its share: the reward wrapper batches
the responses of one `score` call by length, and a response's score moves by ~1e-7 with its batch's
padding (measured on the world's reward model), so shares scored apart would not give a single
process's records. Scoring is one forward per response, far less than generating it.

A launch is as wide as the suite has chunks: a chunk is 4 x bench.batch_size prompts (one decoder
batch), so hh_gpu's 500 prompts at batch_size 64 make 2 chunks of 256 and keep 2 processes busy, while
bench.batch_size=16 makes 8 chunks of 64 (`run_suite` prints a note when processes would sit idle).

Devices: the task's device "auto" (and "cuda") is this process's GPU: `launch` makes it torch's
current CUDA device, which is where "cuda" without an index resolves. A one-process run never
imports accelerate. On a machine without GPUs, `accelerate launch --multi_gpu --num_processes N`
(or `torchrun --nproc_per_node N`) starts N CPU processes that join over gloo.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence, TypeVar

from agents.harness import Generated

# Set by torchrun / `accelerate launch` (WORLD_SIZE) and by MPI launchers: the variables accelerate's
# PartialState reads the process count from.
PROCESS_COUNT_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# The other processes wait at a barrier while the main process trains a proxy or samples RRHF's
# responses, hours on a real LM: torch's default timeout (30 minutes, 10 for NCCL) would end the launch.
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


def chunk_shard(total: int, chunk: int, count: int, index: int) -> range:
    """The prompts (positions in 0..total-1) that process `index` of `count` decodes: a contiguous run of
    whole chunks (chunk c = positions [c * chunk, (c + 1) * chunk)), the chunks dealt as evenly as whole
    chunks allow, the first processes taking one more; empty when there are fewer chunks than processes.
    Consecutive processes' shares are consecutive, so joining them in process order gives prompt order."""
    if total < 0 or chunk < 1 or count < 1 or not 0 <= index < count:
        raise ValueError(f"chunk_shard(total={total}, chunk={chunk}, count={count}, index={index}); expected "
                         "total >= 0, chunk >= 1, count >= 1 and 0 <= index < count.")
    chunks = -(-total // chunk)
    per_process, extra = divmod(chunks, count)
    first = index * per_process + min(index, extra)
    last = first + per_process + (index < extra)
    return range(min(first * chunk, total), min(last * chunk, total))


def idle_note(total: int, chunk: int, count: int) -> str | None:
    """What to tell the user when some of the launch's processes get no prompts (None when all get some)."""
    chunks = -(-total // chunk)
    if chunks >= count:
        return None
    return (f"{total} held-out prompts make {chunks} chunk(s) of {chunk} (4 x bench.batch_size) for {count} "
            f"processes, so {count - chunks} process(es) decode nothing. A smaller bench.batch_size spreads the "
            "prompts wider (other batches can change a response where two tokens nearly tie, as bf16 on a GPU "
            "may: compare runs made at one batch size).")


def joined(parts: Sequence[Generated | None]) -> Generated:
    """The processes' shares (None: a process with no prompts) as one prompt set's generations, in
    process order: the generation time is the slowest process's (they ran side by side), the peak
    memory the largest."""
    done = [p for p in parts if p is not None]
    if not done:
        raise ValueError("no process generated anything; the bench needs at least one held-out prompt.")
    memory = [p.peak_memory_mb for p in done if p.peak_memory_mb is not None]
    return Generated([g for p in done for g in p.generations], max(p.generate_seconds for p in done),
                     max(memory) if memory else None)
