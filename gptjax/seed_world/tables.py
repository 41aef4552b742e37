"""The seed-world pipeline's tables: one run's per-stage gold table, and the per-seed summary with its checks."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# The policies the gold table evaluates, in the recipe's order (the reward model gets its own line).
POLICIES = ("pretrain", "sft", "ppo")

def format_table(results: dict) -> str:
    """The per-stage table the demo prints."""
    rows = [("stage", "balanced acc (T=1)", "balanced acc (greedy)", "valid reason (T=1)", "language match (T=1)",
             "KL to SFT")]
    for name in POLICIES:
        m = results[name]
        rows.append((name, f"{m['sampled/balanced_accuracy']:.3f}", f"{m['greedy/balanced_accuracy']:.3f}",
                     f"{m['sampled/valid_reason_rate']:.3f}", f"{m['sampled/language_match']:.3f}",
                     "-" if m["kl_to_sft"] != m["kl_to_sft"] else f"{m['kl_to_sft']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    if "reward" in results:
        lines.append(f"reward model: held-out pairwise accuracy {results['reward']['heldout_pairwise_accuracy']:.3f}")
    lines.append("")
    for name in POLICIES:
        for q, a in results[name]["showcase"].items():
            lines.append(f"[{name}] {q} → {a}")
    return "\n".join(lines)


SUMMARY_METRICS = ("sampled/balanced_accuracy", "greedy/balanced_accuracy", "sampled/valid_reason_rate",
                   "sampled/language_match", "kl_to_sft")


def summarize_seeds(all_results: Sequence[dict]) -> dict:
    """Per-seed values and their mean for the acceptance metrics, plus the demo's acceptance checks."""
    per_seed = {}
    for res in all_results:
        row = {f"{stage}/{m}": res[stage][m] for stage in POLICIES for m in SUMMARY_METRICS}
        row["reward/heldout_pairwise_accuracy"] = res["reward"]["heldout_pairwise_accuracy"]
        row["total_s"] = res["timings_s"]["total"]
        per_seed[str(res["seed"])] = row
    keys = list(next(iter(per_seed.values())))
    mean = {k: float(np.nanmean([row[k] for row in per_seed.values()])) for k in keys}
    checks = {
        "sampled: SFT >= pretrain + 0.05": mean["sft/sampled/balanced_accuracy"]
        >= mean["pretrain/sampled/balanced_accuracy"] + 0.05,
        "sampled: PPO >= SFT + 0.05": mean["ppo/sampled/balanced_accuracy"]
        >= mean["sft/sampled/balanced_accuracy"] + 0.05,
        "greedy: PPO >= SFT - 0.02": mean["ppo/greedy/balanced_accuracy"]
        >= mean["sft/greedy/balanced_accuracy"] - 0.02,
        "PPO language match >= 0.95": mean["ppo/sampled/language_match"] >= 0.95,
        "PPO KL to SFT <= 3 nats": mean["ppo/kl_to_sft"] <= 3.0,
        "RM held-out pairwise accuracy >= 0.65": mean["reward/heldout_pairwise_accuracy"] >= 0.65,
    }
    return {"per_seed": per_seed, "mean": mean, "checks": checks}


def format_seed_summary(summary: dict) -> str:
    """Markdown: one row per metric, one column per seed, then the mean; then the acceptance checks."""
    seeds = list(summary["per_seed"])
    lines = ["| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for k, mean in summary["mean"].items():
        vals = [summary["per_seed"][s][k] for s in seeds]
        fmt = (lambda v: f"{v:.0f}") if k == "total_s" else (lambda v: f"{v:.3f}")
        lines.append(f"| {k} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(mean)} |")
    lines.append("")
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in summary["checks"].items()]
    return "\n".join(lines)
