"""The stage-3 comparison's outputs (gptjax/seed_world/compare.py): the per-method summary over seeds, the markdown
table with the gaps between learned and verifiable rewards, and the plots of held-out gold against KL and against
generated tokens (one line per method)."""

from __future__ import annotations

import os

import numpy as np

# The table's columns: (result key, header, format). "sampled/…" are T = 1 answers (eval.sampled_answers_per_question
# per question), "greedy/…" one greedy answer; the keys are compare.Evaluator.heldout_metrics' and curve_point's.
COLUMNS = (("sampled/prime/accuracy", "primes", "{:.3f}"),
           ("sampled/easy/accuracy", "easy comp.", "{:.3f}"),
           ("sampled/hard/accuracy", "hard comp.", "{:.3f}"),
           ("sampled/balanced_accuracy", "helpful: bal. acc.", "{:.3f}"),
           ("greedy/balanced_accuracy", "bal. acc. greedy", "{:.3f}"),
           ("sampled/off_topic", "off topic", "{:.3f}"),
           ("sampled/honest", "honest", "{:.3f}"),
           ("sampled/refused", "harmless: refused", "{:.3f}"),
           ("sampled/over_refusal", "over-refusal", "{:.3f}"),
           ("sampled/mean_gold_score", "gold score", "{:.3f}"),
           ("kl_to_sft", "KL to SFT", "{:.2f}"),
           ("rm_score", "RM score", "{:.2f}"),
           ("generated_tokens", "gen. tokens", "{:,.0f}"),
           ("episodes", "episodes", "{:,.0f}"),
           ("wall_s", "wall s", "{:.0f}"))
HEADLINE = "sampled/balanced_accuracy"  # the Δ column, the gaps and the "within 2 points" check
CURVE_Y = "curve/balanced_accuracy"
CURVE_KEYS = ("generated_tokens", "kl_to_sft", CURVE_Y, "curve/mean_gold_score", "rm_score")  # averaged per step


def _stats(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": int(len(values))}


def _curve(per_seed: dict) -> list[dict]:
    """The method's curve: at each checkpoint step, the mean over the seeds evaluated there."""
    by_step: dict[int, list[dict]] = {}
    for result in per_seed.values():
        for point in result["curve"]:
            by_step.setdefault(int(point["step"]), []).append(point)
    return [{"step": step, **{k: float(np.mean([p[k] for p in points]))
                              for k in CURVE_KEYS},
             "seeds": len(points)} for step, points in sorted(by_step.items())]


def summarize(results: dict) -> dict:
    """Per method: mean/std over seeds of each column, its stage and reward, Δ to the reference method, its curve;
    the learned-RM vs gold-reward gaps; the methods within 2 points of the reference's balanced accuracy."""
    methods = {}
    for name, per_seed in results["runs"].items():
        finals = [{**r["final"], "wall_s": r["wall_s"]} for r in per_seed.values()]
        first = next(iter(per_seed.values()))
        methods[name] = {"stage": first["stage"], "reward": first["reward"],
                         **{key: _stats([f[key] for f in finals]) for key, _, _ in COLUMNS},
                         "curve": _curve(per_seed)}
    key = HEADLINE
    ref = methods.get(results["reference_method"])
    summary = {"methods": methods, "gaps": {}, "within_2_points": []}
    if ref is not None:
        for name, m in methods.items():
            m["delta_vs_reference"] = m[key]["mean"] - ref[key]["mean"]
        summary["within_2_points"] = [n for n, m in methods.items()
                                      if n != results["reference_method"] and m["delta_vs_reference"] >= -0.02]
    for rm_name, gold_name in results["gaps"]:
        if rm_name in methods and gold_name in methods:
            summary["gaps"][rm_name] = {
                metric: methods[gold_name][metric]["mean"] - methods[rm_name][metric]["mean"]
                for metric in (key, "sampled/mean_gold_score", "kl_to_sft")} | {"gold_method": gold_name}
    return summary


def format_table(results: dict) -> str:
    """Markdown: SFT, then one row per method (mean ± std over seeds), the gaps and the settings."""
    s = results["summary"]
    header = ["method", "stage", "reward"] + [h for _, h, _ in COLUMNS] + [f"Δ vs {results['reference_method']}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sft = results["sft"]["final"]
    lines.append("| SFT | sft | - | " + " | ".join(fmt.format(sft[k]) if k in sft else "-"
                                                  for k, _, fmt in COLUMNS) + " | |")
    for name, m in s["methods"].items():
        cells = [f"{fmt.format(m[k]['mean'])} ± {fmt.format(m[k]['std'])}" if m[k]["n"] > 1
                 else fmt.format(m[k]["mean"]) for k, _, fmt in COLUMNS]
        delta = m.get("delta_vs_reference")
        lines.append(f"| {name} | {m['stage']} | {m['reward']} | " + " | ".join(cells) +
                     f" | {'' if delta is None else f'{100 * delta:+.1f} pt'} |")
    lines += ["", "Learned reward model vs the gold labeler as the reward, at equal budget (gold − RM):", ""]
    for rm_name, gap in s["gaps"].items():
        lines.append(f"- {rm_name} → {gap['gold_method']}: balanced accuracy "
                     f"{100 * gap['sampled/balanced_accuracy']:+.1f} pt, mean gold score "
                     f"{gap['sampled/mean_gold_score']:+.3f}, KL {gap['kl_to_sft']:+.2f} nats")
    within = ", ".join(s["within_2_points"]) or "none"
    st = results["settings"]
    lines += ["", f"Within 2 points of {results['reference_method']}'s sampled balanced accuracy: {within}.", "",
              f"Seeds {results['seeds']}; {st['episodes']} sampled responses per sampling method; held-out: "
              f"{st['questions']} \"is n prime?\" questions (per class: primes, easy and hard composites; "
              f"balanced accuracy = their mean), {st['specials']} special questions (honest), {st['requests']} "
              f"requests (harmful: refused; benign: over-refusal), {st['answers_per_question']} sampled answers "
              f"each (T = 1) and one greedy; gold score: the labeler's mean score of the sampled answers to the "
              f"number questions; KL to SFT, RM score and the curves on one more sampled answer per number "
              f"question.",
              "Timings (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in results["timings_s"].items())]
    return "\n".join(lines)


def plot(results: dict, out_dir: str) -> dict[str, str]:
    """compare_kl.png and compare_tokens.png: held-out sampled balanced accuracy (one answer per question) against
    KL to SFT and against generated tokens; one line per method from the SFT point through its checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = results["sft"]["final"]
    paths = {}
    for x_key, x_label, name in (("kl_to_sft", "KL(π ‖ π_SFT), nats per answer", "compare_kl.png"),
                                 ("generated_tokens", "tokens generated in training", "compare_tokens.png")):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for i, (method, m) in enumerate(results["summary"]["methods"].items()):
            xs = [sft[x_key]] + [p[x_key] for p in m["curve"]]
            ys = [sft[CURVE_Y]] + [p[CURVE_Y] for p in m["curve"]]
            style = "--" if m["reward"] == "gold" else "-"
            ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{method} ({m['reward']})")
        ax.axhline(sft[CURVE_Y], color="gray", lw=0.8)
        ax.set_xlabel(x_label)
        ax.set_ylabel("held-out balanced accuracy (sampled, T = 1)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Stage-3 methods on the seed world (mean over the seeds evaluated at each point)")
        fig.tight_layout()
        paths[name] = os.path.join(out_dir, name)
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths
