"""PNG plots of a suite (matplotlib, no display needed):

- `reward_distribution.png`: the RM reward of every response, per method (violins), and greedy vs
  the proxy as overlaid histograms (the shape of Proxy-RLHF's Fig. 2a);
- `reward_vs_compute.png`: mean gold (or RM) score against LM forwards and against seconds per
  response: what each method's quality costs;
- `sweep_<param>.png` (`plot_sweep`): reward and gold against p_t or temperature, with the share of
  irregular (repetitive) outputs, as in the paper's Fig. 3 and appendix C;
- `sweep_best_of_n.png`, `sweep_args_w.png` (`plot_overoptimisation`): mean RM reward and mean gold side
  by side against n or w, each seed's mean as a dot, the peaks marked: the over-optimisation curve.
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
    data = [[e["reward"] for e in episodes[n] if e["reward"] is not None] or [float("nan")] for n in names]
    left.violinplot(data, orientation="horizontal", showmeans=True)
    left.set_yticks(range(1, len(names) + 1), names)
    left.invert_yaxis()
    left.set_xlabel("reward-model score per response")
    left.set_title("Reward distribution per method (best gold first)")
    kinds = {r["method"]: r["kind"] for r in rows}
    pair = [n for n in names if kinds[n] == "greedy"][:1] + [n for n in names if kinds[n] == "proxy"][:1]
    for name in pair or names[:2]:
        right.hist([e["reward"] for e in episodes[name] if e["reward"] is not None], bins=30, alpha=0.55, label=name)
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


OVEROPTIMISATION_LABELS = {"best_of_n": "n (best-of-n; log scale)", "args_w": "w (ARGS-greedy reward weight)"}


def _seed_dots(ax: Any, points: Sequence[dict[str, Any]], key: str, color: str) -> None:
    """Each seed's own mean (the seed-to-seed spread), when there are several seeds."""
    for p in points:
        means = p.get(key) or []
        if len(means) > 1:
            ax.scatter([p["value"]] * len(means), means, s=12, color=color, alpha=0.4)


def plot_overoptimisation(path: Path, param: str, points: Sequence[dict[str, Any]], peaks: dict[str, Any]) -> Path:
    """RM reward (left) and gold (right) against n or w, error bars the 95% CI over prompts, a star on
    each curve's peak and greedy as a dotted line: gold peaking before RM is over-optimisation."""
    xs = [p["value"] for p in points]
    panels = [("reward", "mean reward-model score", "tab:blue", "rm_peak")]
    if all(p.get("gold_mean") is not None for p in points):
        panels.append(("gold", "mean gold score", "tab:orange", "gold_peak"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, label, color, peak_key) in zip(axes[0], panels):
        means = [p[f"{key}_mean"] for p in points]
        ax.errorbar(xs, means, yerr=[p[f"{key}_ci95"] for p in points], fmt="o-", color=color, capsize=3)
        _seed_dots(ax, points, f"seed_{key}_means", color)
        best = xs.index(peaks[peak_key])
        ax.plot([xs[best]], [means[best]], marker="*", markersize=16, color="black", ls="none",
                label=f"peak ({param} = {xs[best]:g})")
        if points[0].get(f"greedy_{key}") is not None:
            ax.axhline(points[0][f"greedy_{key}"], color="gray", ls=":", label="greedy")
        if param == "best_of_n":
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(OVEROPTIMISATION_LABELS.get(param, param))
        ax.set_ylabel(label)
        ax.set_title(f"{'RM reward' if key == 'reward' else 'Gold'} vs {param}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("Over-optimisation: RM reward and gold side by side (error bars: 95% CI over prompts)")
    return _save(fig, path)
