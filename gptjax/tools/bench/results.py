"""Benchmark results: one ``Result`` row per workload, its JSON file format (``SCHEMA``) and the targets a row
is checked against."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Sequence

import jax

from gptjax import flops as flops_lib
from gptjax.errors import ConfigError

SCHEMA = "gptjax.bench/1"


@dataclasses.dataclass
class Result:
    """One table row. ``tokens_per_s`` counts training tokens (all rows × positions of a step, × micro-batches
    and epochs) for training workloads, and new (generated) tokens for ``sample`` and ``ppo-rollout``."""

    workload: str  # pretrain | sft | reward | ppo-rollout | ppo-update | ppo | sample
    config: str  # configs/bench.py name
    label: str  # variant tag set on the command line ("" for the config as written)
    status: str  # "ok", or why there is no measurement
    device_kind: str
    num_devices: int  # devices the workload ran on (MFU is against their summed peak)
    model: str  # preset and shape, e.g. "gpt2-small 12L d768 bf16"
    batch: int  # rows per call (sampling / rollout: sequences)
    seq_len: int  # tokens per row (sampling / rollout: prompt + new tokens)
    tokens_per_call: int  # tokens the rate counts per timed call
    step_s: float | None  # median seconds per call
    step_s_all: list[float]  # every timed call
    tokens_per_s: float | None
    flops_per_token: float | None  # model FLOPs per counted token (None where no training FLOPs apply)
    mfu: float | None  # fraction of the devices' dense bf16 peak; None on CPU / unknown devices
    peak_bytes: int | None  # allocator peak_bytes_in_use after the workload (process-wide); None on CPU
    program_bytes: int | None  # the compiled program's memory estimate (arguments + temporaries + outputs)
    compile_s: float | None  # trace + lower + compile (+ GPU autotuning)
    baseline: str = ""  # the reference figure on the same card, e.g. nanoGPT's (docs/references.md); "" when none
    target: str = ""  # e.g. ">= 600,000 tok/s"
    met: bool | None = None  # None when there is no target or no measurement
    extra: dict = dataclasses.field(default_factory=dict)  # workload-specific figures (e.g. rollout_share)


RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(Result))


def environment() -> dict:
    """What the numbers were measured on (JSON "meta")."""
    dev = jax.devices()[0]
    return {"schema": SCHEMA, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jax": jax.__version__,
            "jaxlib": _jaxlib_version(), "platform": dev.platform,
            "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "peak_flops_per_device": flops_lib.device_peak_flops(dev),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}


def _jaxlib_version() -> str | None:
    try:
        import jaxlib
        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def write_json(path: str, results: Sequence[Result], meta: dict | None = None) -> None:
    payload = {"meta": meta or environment(), "results": [dataclasses.asdict(r) for r in results]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def read_json(path: str) -> tuple[dict, list[Result]]:
    """(meta, results) of a file ``write_json`` wrote, or of a ``.jsonl`` file holding one such payload per line
    (gpu_bench.sh appends each run's; the first line's meta is returned)."""
    with open(path) as f:
        text = f.read()
    lines = [ln for ln in text.splitlines() if ln.strip()] if path.endswith(".jsonl") else [text]
    metas, results = [], []
    for line_no, line in enumerate(lines, 1):
        where = f"{path}:{line_no}" if path.endswith(".jsonl") else path
        try:
            payload = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e})") from None
        if not isinstance(payload, dict) or "results" not in payload:
            raise ConfigError(f"{where}: not a benchmark result (expected an object with 'meta' and 'results')")
        metas.append(payload.get("meta", {}))
        for i, row in enumerate(payload["results"]):
            missing = [k for k in RESULT_FIELDS if k not in row and k not in ("baseline", "target", "met", "extra")]
            if missing:
                raise ConfigError(f"{where}: result {i} lacks field(s) {missing}")
            results.append(Result(**{k: row[k] for k in RESULT_FIELDS if k in row}))
    return (metas[0] if metas else {}), results


def apply_target(r: Result, target_cfg) -> None:
    """Fill ``baseline``, ``target`` and ``met`` of ``r`` from a config's ``targets.<workload>`` entry."""
    r.baseline = str(target_cfg.get("baseline", ""))
    if "min_tokens_per_s" in target_cfg:
        r.target = f">= {target_cfg['min_tokens_per_s']:,.0f} tok/s"
        if r.status == "ok":
            r.met = r.tokens_per_s >= target_cfg["min_tokens_per_s"]
    if "max_rollout_share" in target_cfg:
        r.target = f"rollout <= {100 * target_cfg['max_rollout_share']:.0f}% of the iteration"
        if r.status == "ok":
            r.met = r.extra["rollout_share"] <= target_cfg["max_rollout_share"]
