"""PNG plots of a suite (matplotlib, no display needed):

- `reward_distribution.png`: the RM reward of every response, per method (violins), and greedy vs
  the proxy as overlaid histograms (the shape of Proxy-RLHF's Fig. 2a);
- `reward_vs_compute.png`: mean gold (or RM) score against LM forwards and against seconds per
  response: what each method's quality costs;
- `sweep_<param>.png` (`plot_sweep`): reward and gold against p_t or temperature, with the share of
  irregular (repetitive) outputs, as in the paper's Fig. 3 and appendix C.
"""

from __future__ import annotations

import io

from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from llm_envs.io import atomic_write_bytes  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    atomic_write_bytes(path, buffer.getvalue())  # a reader never sees half a PNG
    plt.close(fig)
    return path


def plot_reward_distribution(path: Path, rows: Sequence[dict[str, Any]],
                             episodes: dict[str, list[dict[str, Any]]]) -> Path:
    names = [r["method"] for r in rows if r["method"] in episodes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 2.5),
                                      gridspec_kw={"width_ratios": [3, 2]})
    data = [[e["reward"] for e in episodes[n]] for n in names]
    left.violinplot(data, orientation="horizontal", showmeans=True)
    left.set_yticks(range(1, len(names) + 1), names)
    left.invert_yaxis()
    left.set_xlabel("reward-model score per response")
    left.set_title("Reward distribution per method (best gold first)")
    kinds = {r["method"]: r["kind"] for r in rows}
    pair = [n for n in names if kinds[n] == "greedy"][:1] + [n for n in names if kinds[n] == "proxy"][:1]
    for name in pair or names[:2]:
        right.hist([e["reward"] for e in episodes[name]], bins=30, alpha=0.55, label=name)
    right.set_xlabel("reward-model score")
    right.set_ylabel("responses")
    right.set_title("Greedy (the SFT model) vs the proxy")
    right.legend()
    return _save(fig, path)


def plot_reward_vs_compute(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    use_gold = all(r["gold_mean"] is not None for r in rows)
    key, ci = ("gold_mean", "gold_ci95") if use_gold else ("reward_mean", "reward_ci95")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, x_key, label in ((axes[0], "lm_forwards_per_response", "LM forwards per response"),
                             (axes[1], "seconds_per_response", "seconds per response (generation)")):
        for row in rows:
            x = max(row[x_key], 1e-6)
            ax.errorbar(x, row[key], yerr=row[ci], fmt="o", capsize=3)
            ax.annotate(row["method"], (x, row[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("mean gold score" if use_gold else "mean reward-model score")
        ax.grid(alpha=0.3)
    fig.suptitle("Quality vs compute (error bars: 95% CI)")
    return _save(fig, path)


def write_suite_plots(suite_dir: Path, rows: Sequence[dict[str, Any]],
                      episodes: dict[str, list[dict[str, Any]]]) -> list[Path]:
    if not rows:
        return []
    return [plot_reward_distribution(suite_dir / "reward_distribution.png", rows, episodes),
            plot_reward_vs_compute(suite_dir / "reward_vs_compute.png", rows)]


def plot_sweep(path: Path, param: str, points: Sequence[dict[str, Any]]) -> Path:
    """Reward / gold vs the swept value (log x for p_t), and the irregular-output rate."""
    xs = [p["value"] for p in points]
    fig, (ax, irregular) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.errorbar(xs, [p["reward_mean"] for p in points], yerr=[p["reward_ci95"] for p in points], fmt="o-",
                capsize=3, label="reward model")
    if all(p.get("gold_mean") is not None for p in points):
        gold_ax = ax.twinx()
        gold_ax.errorbar(xs, [p["gold_mean"] for p in points], yerr=[p["gold_ci95"] for p in points], fmt="s--",
                         color="tab:orange", capsize=3, label="gold")
        gold_ax.set_ylabel("mean gold score", color="tab:orange")
        if len(points[0].get("seed_gold_means") or []) > 1:  # each seed's own mean: the training spread
            for p in points:
                gold_ax.scatter([p["value"]] * len(p["seed_gold_means"]), p["seed_gold_means"], s=12,
                                color="tab:orange", alpha=0.4)
    if "greedy_reward" in points[0]:
        ax.axhline(points[0]["greedy_reward"], color="gray", ls=":", label="greedy (the SFT model)")
    ax.set_ylabel("mean reward-model score")
    rates = [p["irregular_rate"] for p in points]
    irregular.plot(xs, rates, "o-", color="tab:red")
    irregular.set_ylim(0, max(0.05, 1.15 * max(rates)))
    irregular.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    irregular.set_ylabel("share of irregular (repetitive) responses")
    for a in (ax, irregular):
        a.set_xlabel(param)
        if param == "p_t":
            a.set_xscale("log")
        a.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(f"Proxy reward vs {param}")
    irregular.set_title("Irregular outputs (appendix C)")
    return _save(fig, path)
