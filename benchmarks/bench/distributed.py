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

from typing import Sequence

from agents.harness import Generated


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
