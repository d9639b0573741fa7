"""The leaderboard: computed from the per-episode records, never edited by hand.

A method runs once per seed (`benchmarks.bench.seeds`: training seeds for trained methods, sampling
seeds for sampling methods, one run for deterministic ones). Every mean below is the mean over seeds
of each seed's mean over the prompts, so every seed weighs the same.

Row keys (leaderboard.json `rows`, also the columns of leaderboard.md):

| key | meaning |
|---|---|
| `method`, `kind` | the row's name and what it is (greedy, args, proxy, rrhf, ...) |
| `seeds` | the seeds run (leaderboard.md shows how many) |
| `episodes` | records: held-out prompts answered x seeds |
| `reward_mean`, `reward_ci95` | mean reward-model score and the half-width of its 95% CI **over prompts** (each prompt's score averaged over the seeds, then 1.96 sd / sqrt(prompts)); under a skip rule (`bench.metrics.reward_skip_tokens`, ARGS's protocol) over the responses scored |
| `reward_skipped` | responses the skip rule left unscored (their reward-model input reached `bench.metrics.reward_skip_tokens`), all seeds; 0 without a rule (json only; a note names them) |
| `seed_reward_means`, `seed_reward_sd` | each seed's mean, and their sample standard deviation (ddof=1; null with one seed): the **seed-to-seed spread**, shown as "sd" beside the CI |
| `gold_mean`, `gold_ci95`, `seed_gold_means`, `seed_gold_sd` | the same for the gold judge (null without a gold judge) |
| `rank_gold`, `rank_rm` | the row's rank by `gold_mean` and by `reward_mean` (1 = best; ties share the better rank): where they differ, the reward model and the judge disagree on the ordering |
| `gold_win_rate_vs_greedy` | share of prompts where the gold score beats greedy's (ties count half), mean over seeds |
| `diversity` | ARGS's `prod_{n=2..4} (1 - rep_n)`, mean over responses |
| `coherence` | cosine(prompt, response) sentence embeddings, mean over responses |
| `irregular_rate` | share of responses with a word repeated back to back or a repeated 4-gram |
| `response_len` | mean response length in LM tokens |
| `lm_forwards_per_response` | LM forward rows spent per response (prefill = 1; best-of-n counts all n samples) |
| `decisions_per_step` | RL agents played on an env: mean over episodes of decisions / steps, a decision being a step where the agent had a choice (TokenAccept: reject was legal under its decision mask; TokenChoice: more than one legal slot); null for decoders. `decisions_per_token` (json only): decisions / response tokens |
| `rm_calls_per_response` | reward-model calls while generating: best-of-n scores n whole responses; ARGS one batched forward per token over its k candidates (prefix KV-cached) |
| `seconds_per_response` | generation wall time / responses, all seeds (training excluded; scoring excluded); on a launch of several processes the wall time is the slowest process's (`benchmarks.bench.distributed`) |
| `train_seconds` | training wall time of one model, mean over seeds (proxy, RRHF; 0 for decoding-time methods) |
| `trainable_params` | parameters the method trains (proxy: the policy + value MLP; RRHF: the whole LM) |
| `peak_memory_mb` | peak resident memory of the process while generating (CUDA: peak allocated); on a launch of several processes the largest |
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agents.metrics import win_rate
from benchmarks.bench.records import read_method_records
from benchmarks.bench.seeds import by_seed, seed_mean, seed_stat

from llm_envs.io import atomic_write_json, atomic_write_text

REFERENCE_KIND = "greedy"
COLUMNS: tuple[tuple[str, str, str], ...] = (  # key, markdown header, format
    ("method", "method", "{}"),
    ("gold_mean", "gold", "{:+.3f}"),
    ("reward_mean", "RM reward", "{:+.2f}"),
    ("rank_gold", "rank gold", "{}"),
    ("rank_rm", "rank RM", "{}"),
    ("gold_win_rate_vs_greedy", "win vs greedy", "{:.0%}"),
    ("seeds", "seeds", "{}"),
    ("diversity", "diversity", "{:.3f}"),
    ("coherence", "coherence", "{:.3f}"),
    ("response_len", "length", "{:.1f}"),
    ("lm_forwards_per_response", "LM fwd / resp", "{:.1f}"),
    ("decisions_per_step", "decisions / step", "{:.2f}"),
    ("rm_calls_per_response", "RM calls / resp", "{:.1f}"),
    ("seconds_per_response", "s / resp", "{:.4f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
)


def _win_rate(episodes: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]], name: str
              ) -> tuple[float, dict[str, float]]:
    """Gold win rate against greedy's episodes (same prompts): mean over seeds; outcomes summed."""
    ref = {e["index"]: e["gold"] for e in reference}
    rates, totals = [], {"wins": 0, "ties": 0, "losses": 0}
    for mine in by_seed(episodes).values():
        if set(ref) != {e["index"] for e in mine}:
            raise ValueError(f"{name} and greedy answered different prompts; rerun both on one suite.")
        outcome = win_rate([e["gold"] for e in mine], [ref[e["index"]] for e in mine])
        rates.append(outcome.pop("win_rate"))
        totals = {k: totals[k] + outcome[k] for k in totals}
    return float(np.mean(rates)), totals


def _run_costs(meta: dict[str, Any], episodes: int) -> dict[str, Any]:
    """What generating (all seeds) and training (one model, mean over seeds) cost."""
    runs = meta["runs"]
    memory = [r["peak_memory_mb"] for r in runs if r.get("peak_memory_mb") is not None]
    return {"seconds_per_response": sum(r["generate_seconds"] for r in runs) / max(episodes, 1),
            "train_seconds": float(np.mean([r.get("train_seconds") or 0.0 for r in runs])),
            "trainable_params": int(max(r.get("trainable_params") or 0 for r in runs)),
            "peak_memory_mb": max(memory) if memory else None}


def method_row(episodes: Sequence[dict[str, Any]], meta: dict[str, Any],
               reference: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    """One leaderboard row from a method's records (every seed); `reference` = greedy's episodes (one
    seed, same prompts). Means are over seeds (`benchmarks.bench.seeds.seed_stat`)."""
    reward = seed_stat(episodes, "reward")
    row: dict[str, Any] = {"method": meta["name"], "kind": meta["kind"], "seeds": sorted(by_seed(episodes)),
                           "episodes": len(episodes), "reward_mean": reward.mean, "reward_ci95": reward.ci95,
                           "seed_reward_means": reward.seed_means, "seed_reward_sd": reward.seed_sd,
                           "gold_mean": None, "gold_ci95": None, "seed_gold_means": None, "seed_gold_sd": None,
                           "gold_win_rate_vs_greedy": None,
                           "reward_skipped": sum(bool(e.get("reward_skipped")) for e in episodes)}
    if all(e.get("gold") is not None for e in episodes):
        gold = seed_stat(episodes, "gold")
        row.update(gold_mean=gold.mean, gold_ci95=gold.ci95, seed_gold_means=gold.seed_means,
                   seed_gold_sd=gold.seed_sd)
        if reference is not None:
            row["gold_win_rate_vs_greedy"], row["gold_vs_greedy"] = _win_rate(episodes, reference, meta["name"])
    row.update(
        diversity=seed_mean(episodes, "diversity"),
        coherence=seed_mean(episodes, "coherence"),
        irregular_rate=seed_mean(episodes, "irregular"),
        response_len=seed_mean(episodes, "response_len"),
        lm_forwards_per_response=seed_mean(episodes, "lm_forwards"),
        rm_calls_per_response=seed_mean(episodes, "rm_calls"),
        **_run_costs(meta, len(episodes)),
        **decision_rates(episodes),
    )
    return row


def decision_rates(episodes: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """How often an env agent was asked (the decision-mask ablation's column): decisions per step and per
    response token, means over seeds like the other columns; None for methods that played no env (their
    records have no decisions)."""
    extras = [e.get("extra") or {} for e in episodes]
    if not extras or not all("decisions" in x for x in extras):
        return {"decisions_per_step": None, "decisions_per_token": None}
    rates = [{"seed": e["seed"], "step": x["decisions"] / max(x["steps"], 1),
              "token": x["decisions"] / max(e["response_len"], 1)} for x, e in zip(extras, episodes)]
    return {"decisions_per_step": seed_mean(rates, "step"), "decisions_per_token": seed_mean(rates, "token")}


def ranks(values: Sequence[float | None]) -> list[int | None]:
    """Rank of each value, highest first (1 = best); ties share the better rank; None stays unranked."""
    known = [v for v in values if v is not None]
    return [None if v is None else 1 + sum(other > v for other in known) for v in values]


def add_ranks(rows: Sequence[dict[str, Any]]) -> None:
    """`rank_gold` and `rank_rm` of every row, so a reader sees where the judge and the RM disagree."""
    for key, rank in (("gold_mean", "rank_gold"), ("reward_mean", "rank_rm")):
        for row, value in zip(rows, ranks([r[key] for r in rows])):
            row[rank] = value


def _seed_notes(loaded: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]],
                expected: dict[str, Sequence[int]] | None) -> list[str]:
    """A note for every method whose records hold other seeds than the config asks for."""
    notes = []
    for name, (_, meta) in loaded.items():
        want = list((expected or {}).get(name, meta["seeds"]))
        if sorted(meta["seeds"]) != sorted(want):
            notes.append(f"{name}: the records hold seeds {meta['seeds']} but the config asks for {want}; the row "
                         f"shows the records' (rerun it: llm-envs bench --methods {name})")
    return notes


def build_leaderboard(suite_dir: Path, method_names: Sequence[str], fingerprint: str | None = None,
                      seeds: dict[str, Sequence[int]] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (best gold first, else best reward) of the named methods that have records; and notes
    on the ones that have none, or other seeds than `seeds` (method -> the seeds the config runs).
    With `fingerprint`, records of another suite setting are an error."""
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
    if reference is not None:
        reference = next(iter(by_seed(reference).values()))  # greedy is deterministic: one seed
    rows = [method_row(eps, meta, reference) for eps, meta in loaded.values()]
    rows.sort(key=lambda r: -(r["gold_mean"] if r["gold_mean"] is not None else r["reward_mean"]))
    add_ranks(rows)
    return rows, notes + _seed_notes(loaded, seeds) + skip_notes(rows)


def skip_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A note for every row some of whose responses the protocol's skip rule left unscored."""
    return [f"{r['method']}: {r['reward_skipped']} of {r['episodes']} responses were not scored (their reward-model "
            "input reached bench.metrics.reward_skip_tokens, as ARGS's evaluation skips them); its RM reward is the "
            "mean over the rest" for r in rows if r.get("reward_skipped")]


def with_spread(text: str, ci: float | None, sd: float | None) -> str:
    """`mean ± CI`, then the seed-to-seed sd when there are several seeds."""
    if ci is not None:
        text += f" ± {ci:.2f}"
    return text + (f" (sd {sd:.2f})" if sd is not None else "")


def format_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key == "seeds":
        return str(len(value))
    text = fmt.format(value)
    if key == "reward_mean":
        text = with_spread(text, row["reward_ci95"], row.get("seed_reward_sd"))
    if key == "gold_mean":
        text = with_spread(text, row.get("gold_ci95"), row.get("seed_gold_sd"))
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
          "`llm-envs bench`; do not edit.", "",
          *([f"Protocol: {header['protocol']}. Compare these rows with results of the same protocol only.", ""]
            if header.get("protocol") else []),
          markdown_table(rows), "",
          "Columns are defined in `benchmarks/bench/leaderboard.py`. A row is the mean over its seeds of each seed's "
          "mean; ± is the half-width of the 95% CI over prompts (each prompt averaged over the seeds); (sd x) is the "
          "seed-to-seed spread, the sample standard deviation of the seed means (rows with one seed have none). "
          "rank gold / rank RM order the rows by gold and by RM reward: where they differ, the reward model and the "
          "judge disagree.", "", *[f"- note: {note}" for note in header.get("notes", [])],
          *([""] if header.get("notes") else []),
          f"git {prov.get('git_commit')}, torch {lib.get('torch')}, transformers {lib.get('transformers')}, "
          f"sb3-contrib {lib.get('sb3-contrib')}, {prov.get('hardware', {}).get('cpu_count')} CPUs"
          f"{', GPU ' + prov['hardware']['gpu'] if prov.get('hardware', {}).get('gpu') else ''}, "
          f"{prov.get('time')}, `{prov.get('command')}`."]
    atomic_write_text(suite_dir / "leaderboard.md", "\n".join(md) + "\n")
