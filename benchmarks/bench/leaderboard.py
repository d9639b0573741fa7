"""The leaderboard: computed from the per-episode records, never edited by hand.

Row keys (leaderboard.json `rows`, also the columns of leaderboard.md):

| key | meaning |
|---|---|
| `method`, `kind` | the row's name and what it is (greedy, args, proxy, rrhf, ...) |
| `episodes` | held-out prompts answered |
| `reward_mean`, `reward_ci95` | mean reward-model score and the half-width of its 95% CI |
| `gold_mean`, `gold_ci95` | mean gold-judge score (null without a gold judge) |
| `gold_win_rate_vs_greedy` | share of prompts where the gold score beats greedy's (ties count half) |
| `diversity` | ARGS's `prod_{n=2..4} (1 - rep_n)`, mean over responses |
| `coherence` | cosine(prompt, response) sentence embeddings, mean over responses |
| `irregular_rate` | share of responses with a word repeated back to back or a repeated 4-gram |
| `response_len` | mean response length in LM tokens |
| `lm_forwards_per_response` | LM forward rows spent per response (prefill = 1; best-of-n counts all n samples) |
| `rm_calls_per_response` | reward-model calls while generating: best-of-n scores n whole responses; ARGS one batched forward per token over its k candidates (prefix KV-cached) |
| `seconds_per_response` | generation wall time / prompts (training excluded; scoring excluded) |
| `train_seconds` | training wall time (proxy, RRHF; 0 for decoding-time methods) |
| `trainable_params` | parameters the method trains (proxy: the policy + value MLP; RRHF: the whole LM) |
| `peak_memory_mb` | peak resident memory of the process while generating (CUDA: peak allocated) |
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agents.metrics import mean_ci95, win_rate
from benchmarks.bench.records import read_method_records

from llm_envs.io import atomic_write_json, atomic_write_text

REFERENCE_KIND = "greedy"
COLUMNS: tuple[tuple[str, str, str], ...] = (  # key, markdown header, format
    ("method", "method", "{}"),
    ("gold_mean", "gold", "{:+.3f}"),
    ("gold_win_rate_vs_greedy", "win vs greedy", "{:.0%}"),
    ("reward_mean", "RM reward (±95% CI)", "{:+.2f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("coherence", "coherence", "{:.3f}"),
    ("response_len", "length", "{:.1f}"),
    ("lm_forwards_per_response", "LM fwd / resp", "{:.1f}"),
    ("rm_calls_per_response", "RM calls / resp", "{:.1f}"),
    ("seconds_per_response", "s / resp", "{:.4f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
)


def _mean(episodes: Sequence[dict[str, Any]], key: str) -> float:
    return float(np.mean([e[key] for e in episodes]))


def method_row(episodes: Sequence[dict[str, Any]], meta: dict[str, Any],
               reference: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    """One leaderboard row from a method's records; `reference` = greedy's episodes (same prompts)."""
    reward, reward_ci = mean_ci95([e["reward"] for e in episodes])
    has_gold = all(e.get("gold") is not None for e in episodes)
    row: dict[str, Any] = {"method": meta["name"], "kind": meta["kind"], "episodes": len(episodes),
                           "reward_mean": reward, "reward_ci95": reward_ci,
                           "gold_mean": None, "gold_ci95": None, "gold_win_rate_vs_greedy": None}
    if has_gold:
        row["gold_mean"], row["gold_ci95"] = mean_ci95([e["gold"] for e in episodes])
        if reference is not None:
            ref = {e["index"]: e["gold"] for e in reference}
            if set(ref) != {e["index"] for e in episodes}:
                raise ValueError(f"{meta['name']} and greedy answered different prompts; rerun both on one suite.")
            outcome = win_rate([e["gold"] for e in episodes], [ref[e["index"]] for e in episodes])
            row["gold_win_rate_vs_greedy"] = outcome.pop("win_rate")
            row["gold_vs_greedy"] = outcome
    row.update(
        diversity=_mean(episodes, "diversity"),
        coherence=_mean(episodes, "coherence"),
        irregular_rate=_mean(episodes, "irregular"),
        response_len=_mean(episodes, "response_len"),
        lm_forwards_per_response=_mean(episodes, "lm_forwards"),
        rm_calls_per_response=_mean(episodes, "rm_calls"),
        seconds_per_response=meta["generate_seconds"] / max(len(episodes), 1),
        train_seconds=meta.get("train_seconds", 0.0),
        trainable_params=int(meta.get("trainable_params", 0)),
        peak_memory_mb=meta.get("peak_memory_mb"),
    )
    return row


def build_leaderboard(suite_dir: Path, method_names: Sequence[str], fingerprint: str | None = None
                      ) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (best gold first, else best reward) of the named methods that have records; and notes
    on the ones that have none. With `fingerprint`, records of another suite setting are an error."""
    loaded: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    notes = []
    for name in method_names:
        records = read_method_records(suite_dir, name)
        if records is None:
            notes.append(f"{name}: no records yet (run llm-envs bench --methods {name})")
            continue
        loaded[name] = records
    prints = {meta["fingerprint"] for _, meta in loaded.values()}
    if fingerprint is not None:
        prints.add(fingerprint)
    if len(prints) > 1:
        stale = [n for n, (_, m) in loaded.items() if m["fingerprint"] != (fingerprint or next(iter(prints)))]
        raise ValueError(
            f"records in {suite_dir} were made under different suite settings (prompts, LM, reward model, budget "
            f"or seed): {stale} differ. Rerun them with the current config (llm-envs bench --methods "
            f"{','.join(stale)}) or run the whole suite again."
        )
    reference = next((eps for eps, meta in loaded.values() if meta["kind"] == REFERENCE_KIND), None)
    rows = [method_row(eps, meta, reference) for eps, meta in loaded.values()]
    rows.sort(key=lambda r: -(r["gold_mean"] if r["gold_mean"] is not None else r["reward_mean"]))
    return rows, notes


def format_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = fmt.format(value)
    if key == "reward_mean":
        text += f" ± {row['reward_ci95']:.2f}"
    if key == "gold_mean" and row.get("gold_ci95") is not None:
        text += f" ± {row['gold_ci95']:.2f}"
    return text


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if k == "method" else "---:" for k, _, _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row, k, f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def short_hash(world_hash: str) -> str:
    """A world hash as tables show it: its first 12 hex digits (the full hash is in the JSON)."""
    return world_hash[:12]


def write_leaderboard(suite_dir: Path, rows: Sequence[dict[str, Any]], header: dict[str, Any]) -> None:
    """leaderboard.json ({..header, rows}) and leaderboard.md (the table, then how it was made)."""
    atomic_write_json(suite_dir / "leaderboard.json", {**header, "rows": list(rows)})
    prov = header.get("provenance", {})
    lib = prov.get("libraries", {})
    world = f" (world `{short_hash(header['world_hash'])}`)" if header.get("world_hash") else ""
    md = [f"# Leaderboard: suite `{header['suite']}`", "",
          f"{header['num_prompts']} held-out prompts ({header['prompts']}), max {header['max_new_tokens']} new "
          f"tokens, LM `{header['lm']}`, reward model `{header['reward']}`{world}, "
          f"gold judge: {header['gold'] or 'none'}. "
          "Every method's responses are scored by the same reward wrapper. Generated from `records/` by "
          "`llm-envs bench`; do not edit.", "", markdown_table(rows), "",
          "Columns are defined in `benchmarks/bench/leaderboard.py`; ± is the 95% CI half-width.", "",
          f"git {prov.get('git_commit')}, torch {lib.get('torch')}, transformers {lib.get('transformers')}, "
          f"sb3-contrib {lib.get('sb3-contrib')}, {prov.get('hardware', {}).get('cpu_count')} CPUs"
          f"{', GPU ' + prov['hardware']['gpu'] if prov.get('hardware', {}).get('gpu') else ''}, "
          f"{prov.get('time')}, `{prov.get('command')}`."]
    atomic_write_text(suite_dir / "leaderboard.md", "\n".join(md) + "\n")
