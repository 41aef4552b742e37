"""The Markdown table of benchmark results, and of the device ops of a traced call."""

from __future__ import annotations

from typing import Sequence

from gptjax.tools.bench.results import Result

TABLE_COLUMNS = ("workload", "config", "card", "model", "B x T", "tok/s", "MFU", "peak mem", "program mem",
                 "compile", "baseline", "target", "met?")


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table_row(r: Result) -> list[str]:
    name = r.workload + (f" [{r.label}]" if r.label else "")
    if r.status != "ok":
        return [name, r.config, r.device_kind, r.model, f"{r.batch} x {r.seq_len}", r.status, "", "", "", "",
                r.baseline, r.target, "no" if r.target else ""]
    rate = f"{r.tokens_per_s:,.0f}"
    if "rollout_share" in r.extra:
        rate += f" (rollout {100 * r.extra['rollout_share']:.0f}%)"
    return [name, r.config, r.device_kind, r.model, f"{r.batch} x {r.seq_len}", rate,
            "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%", format_bytes(r.peak_bytes),
            format_bytes(r.program_bytes),
            "n/a" if r.compile_s is None else f"{r.compile_s:.1f} s", r.baseline, r.target,
            "" if r.met is None else ("yes" if r.met else "no")]


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per result."""
    rows = [list(TABLE_COLUMNS)] + [table_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_op_times(ops: list[dict]) -> str:
    width = max((len(o["name"][:90]) for o in ops), default=4)
    rows = [f"{'op':<{width}}  {'ms':>9}  {'calls':>6}  share"]
    rows += [f"{o['name'][:90]:<{width}}  {o['ms']:9.3f}  {o['count']:6d}  {100 * o['share']:5.1f}%" for o in ops]
    return "\n".join(rows)
