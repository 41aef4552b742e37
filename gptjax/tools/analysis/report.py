"""The analysis report: ``report.md`` and its PNG plots, and ``analysis.json`` (what ``analyze`` returned)."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np

from gptjax.tools.analysis.params import layer_index, module_type


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_table(values: Mapping[str, float]) -> tuple[list[str], dict[int, dict[str, float]]]:
    """Module types (columns) and {layer: {type: value}} for the modules inside layers."""
    rows: dict[int, dict[str, float]] = {}
    types: list[str] = []
    for module, v in values.items():
        i = layer_index(module)
        if i is None:
            continue
        t = module_type(module)
        if t not in types:
            types.append(t)
        rows.setdefault(i, {})[t] = v
    return types, dict(sorted(rows.items()))


def _plot_layers(values: Mapping[str, float], path: str, title: str, ylabel: str, log: bool = False) -> str | None:
    types, rows = _layer_table(values)
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    layers = list(rows)
    for t in types:
        ax.plot(layers, [rows[i].get(t, np.nan) for i in layers], marker="o", label=t)
    ax.set(xlabel="layer", ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_counts(counts: Mapping[str, int], path: str, title: str) -> str:
    plt = _pyplot()
    names = sorted(counts, key=lambda k: counts[k])
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(names) + 1.2))
    ax.barh(names, [counts[n] for n in names])
    ax.set(xlabel="parameters (all layers)", title=title)
    ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_layer_table(values: Mapping[str, float], fmt: str) -> list[str]:
    types, rows = _layer_table(values)
    if not rows:
        return []
    lines = ["| layer | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    lines += [f"| {i} | " + " | ".join(format(r[t], fmt) if t in r else "-" for t in types) + " |"
              for i, r in rows.items()]
    outside = {m: v for m, v in values.items() if layer_index(m) is None}
    if outside:
        lines += ["", "Outside the layers: " + ", ".join(f"{m} {format(v, fmt)}" for m, v in sorted(outside.items()))]
    return lines


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎")


def _component_section(name: str, comp: dict, step: int, out_dir: str, written: list[str]) -> list[str]:
    """Parameter counts, weight norms and update norms of one network (plots added to ``written``)."""
    prefix = "" if name == "model" else f"{name}_"
    counts, expected = comp["counts"], comp["expected_counts"]
    L = ["", f"## Parameters ({name})", "",
         f"Total **{counts['total']:,}** in {counts['layers']} layers; model.count_params: total "
         f"{expected['total']:,} (embedding {expected['embedding']:,}, non-embedding "
         f"{expected['non_embedding']:,}).", "", "| module | parameters | share |", "|---|---|---|"]
    for t, n in sorted(counts["by_module_type"].items(), key=lambda kv: -kv[1]):
        L.append(f"| {t} | {n:,} | {n / counts['total']:.1%} |")
    path = _plot_counts(counts["by_module_type"], os.path.join(out_dir, f"{prefix}param_counts.png"),
                        f"parameters per module ({name})")
    written.append(path)
    L += ["", f"![parameters]({os.path.basename(path)})", "", f"## Weight norms per layer ({name})", "",
          "Frobenius norm of each module's parameters (weights and biases).", ""]
    L += _md_layer_table(comp["weight_norms"], ".4g")
    path = _plot_layers(comp["weight_norms"], os.path.join(out_dir, f"{prefix}weight_norms.png"),
                        f"weight norms ({name}, step {step})", "‖θ‖")
    if path:
        written.append(path)
        L += ["", f"![weight norms]({os.path.basename(path)})"]
    L += ["", f"## Update norms per layer ({name})", ""]
    if "update" in comp:
        up = comp["update"]
        L += [f"‖θ_{step} − θ_{up['from_step']}‖ / ‖θ_{up['from_step']}‖ per module "
              f"(in all: {up['total']['relative']:.4g}, absolute {up['total']['diff']:.4g}).", ""]
        rel = {m: v["relative"] for m, v in up["modules"].items()}
        L += _md_layer_table(rel, ".3g")
        path = _plot_layers(rel, os.path.join(out_dir, f"{prefix}update_norms.png"),
                            f"relative update, step {up['from_step']} → {step} ({name})", "‖Δθ‖ / ‖θ‖", log=True)
        if path:
            written.append(path)
            L += ["", f"![update norms]({os.path.basename(path)})"]
    else:
        L.append(f"Only one checkpoint at or before step {step} is kept, so there is no update to "
                 f"measure (keep more with train.keep_ckpts, or pass --compare).")
    return L


def _loss_section(loss: dict) -> list[str]:
    L = ["", f"## Loss on the {loss['split']} split", "", f"Data: `{loss['source']}`.", ""]
    if "pairwise_accuracy" in loss:
        L.append(f"Pairwise accuracy **{loss['pairwise_accuracy']:.4f}** over {loss['num_pairs']} ranked pairs of "
                 f"{loss['num_rankings']} rankings; K-wise ranking loss {loss['ranking_loss']:.4f}.")
    elif "accuracy" in loss and "num_tokens" in loss:
        L.append(f"Token loss **{loss['loss']:.4f}** nats (perplexity {math.exp(min(loss['loss'], 50)):.3g}), "
                 f"accuracy {loss['accuracy']:.4f}, over {loss['num_tokens']:.0f} tokens in {loss['num_batches']} "
                 f"batch{'es' * (loss['num_batches'] != 1)}.")
    else:  # a stage's own loss: its figures as they are
        L += _value_table({k: v for k, v in loss.items() if k not in ("split", "source")})
    return L


def _value_table(values: Mapping) -> list[str]:
    return ["| metric | value |", "|---|---|"] + [
        f"| {k} | {v:.5g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in values.items()]


def _answers_section(a: dict) -> list[str]:
    note = (f"centred on the demonstrations (bias shift {a['bias_shift']:.4g} applied)" if a["centred"]
            else "raw (no demonstration-centring bias fitted for this step)")
    L = ["", "## Reward-model scores of the given answers", "", f"Scores are {note}.", "",
         "| prompt | response | reward |", "|---|---|---|"]
    return L + [f"| {_esc(s['prompt'])} | {_esc(s['response'])} | {s['score']:.4f} |" for s in a["scores"]]


def _kl_section(k: dict) -> list[str]:
    return ["", "## KL(policy ‖ reference)", "",
            f"Reference: `{k['reference']}`. Sampled {k['num_samples']} responses (temperature {k['temperature']}) "
            f"to prompts of `{k['prompts']}`: KL = **{k['kl_mean']:.4f} ± {k['kl_stderr']:.4f}** nats per response "
            f"({k['kl_per_token']:.4f} per token; mean length {k['mean_response_length']:.1f}, EOS rate "
            f"{k['eos_rate']:.2f}). √KL = {math.sqrt(max(k['kl_mean'], 0.0)):.3f}."]


def _compare_section(c: dict, out_dir: str, written: list[str]) -> list[str]:
    L = ["", "## Comparison with another checkpoint", "",
         f"`{c['other']}` ({c['other_stage']}, step {c['other_step']}): ‖θ − θ_other‖ / ‖θ_other‖ per "
         f"module of the {c['component']} (in all: **{c['total']['relative']:.4g}**).", ""]
    rel = {m: v["relative"] for m, v in c["modules"].items()}
    L += _md_layer_table(rel, ".3g")
    for key, label in (("only_in_first", "only in this checkpoint"), ("only_in_second", "only in the other"),
                       ("shape_differs", "shapes differ")):
        if c[key]:
            L.append(f"\nNot compared ({label}): {', '.join(c[key])}")
    path = _plot_layers(rel, os.path.join(out_dir, "compare.png"), "relative difference to the other checkpoint",
                        "‖θ − θ_other‖ / ‖θ_other‖", log=True)
    if path:
        written.append(path)
        L += ["", f"![comparison]({os.path.basename(path)})"]
    return L


def _metrics_section(lm: dict) -> list[str]:
    L = []
    for kind in ("train", "eval"):
        if lm.get(kind):
            L += ["", f"## Last {kind} record of metrics.jsonl (step {lm[kind].get('step')})", "", "| metric | value |",
                  "|---|---|"]
            L += [f"| {k} | {v:.5g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                  for k, v in sorted(lm[kind].items()) if k != "step"]
    return L


# Sections of ``analyze``'s result with their own renderer; any other key a stage's report adds gets a table.
_KNOWN = ("workdir", "stage", "step", "steps", "model", "components", "loss", "samples", "answer_scores", "kl",
          "compare", "last_metrics")


def write_report(result: dict, out_dir: str) -> list[str]:
    """report.md, analysis.json and the PNGs in ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    L = [f"# Checkpoint analysis: `{result['workdir']}`", "",
         f"Stage **{result['stage']}**, step **{result['step']}** (finished checkpoints: {result['steps']}).", ""]
    for name, m in result["model"].items():
        L.append(f"- {name}: {m['class']}, {m['num_layers']} layers, d_model {m['d_model']}, {m['num_heads']} heads, "
                 f"vocab {m['vocab_size']}, context {m['max_len']}")
    for name, comp in result["components"].items():
        L += _component_section(name, comp, result["step"], out_dir, written)
    if "loss" in result:
        L += _loss_section(result["loss"])
    if "samples" in result:
        L += ["", "## Samples", "", "| prompt | response |", "|---|---|"]
        L += [f"| {_esc(s['prompt'])} | {_esc(s['response'])}{'' if s['finished'] else ' …'} |"
              for s in result["samples"]]
    if "answer_scores" in result:
        L += _answers_section(result["answer_scores"])
    if "kl" in result:
        L += _kl_section(result["kl"])
    for key in (k for k in result if k not in _KNOWN and isinstance(result[k], Mapping)):
        L += ["", f"## {key}", ""] + _value_table(result[key])
    if "compare" in result:
        L += _compare_section(result["compare"], out_dir, written)
    L += _metrics_section(result.get("last_metrics", {}))
    report = os.path.join(out_dir, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(L) + "\n")
    data = os.path.join(out_dir, "analysis.json")
    with open(data, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False, default=float)
    return [report, data] + written
