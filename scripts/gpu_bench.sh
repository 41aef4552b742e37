#!/usr/bin/env bash
# One-shot GPU benchmark: every workload of the target table (configs/bench.py) on this machine's GPU, one table, JSON.
#
#   scripts/gpu_bench.sh [OUT_DIR]          # default OUT_DIR: bench_results/<date-time>
#
# Needs the repository and a Python with jax[cuda] and the requirements (PY, default .venv/bin/python, else
# python3). Each config runs in its own process (so each row's peak memory is its own), most important first;
# the whole script stays inside BUDGET_S seconds (default 540: a 10-minute slot with start-up to spare) and skips
# what no longer fits. After the table's rows come variants that measure our choices (the fused cross-entropy
# backward, the trainer's host loop against its step alone, scanned layers, one decode loop, decoding through the layer scan, packed-document masks, the SFT/RM
# steps, the chunked LM loss, CUDA-graph loops) while time is left (EXTRA=0 skips them).
# OUT_DIR gets few files (some runners copy back only a handful): table.md and all.json (every row, at the end),
# runs.jsonl (each run's results appended as it ends: survives the script being killed; experiments.bench
# --merge=OUT_DIR/runs.jsonl prints its table), runs.log (every run's output), machine.txt, skipped.txt.
#
# Other environment: BENCH_CONFIGS="a b" runs just those configs (no variants), BENCH_ARGS adds flags to every
# run, REQUIRE_GPU=0 lets it run on a CPU (the smoke test: BENCH_CONFIGS=cpu-tiny REQUIRE_GPU=0).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/bench_results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute, before leaving the caller's directory
cd "$REPO"
rm -f "$OUT/runs.jsonl" "$OUT/runs.log" "$OUT/skipped.txt" "$OUT/all.json" "$OUT/table.md"
RUNS=$(mktemp -d "${TMPDIR:-/tmp}/gptjax_bench.XXXXXX")  # per-run files; what matters is collected in OUT
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
BUDGET_S=${BUDGET_S:-540}
EXTRA=${EXTRA:-1}
REQUIRE_GPU=${REQUIRE_GPU:-1}
read -r -a BENCH_ARGS <<< "${BENCH_ARGS:-}"
START=$(date +%s)
# JAX preallocates 75% of the card by default: the 6.7B state alone is ~107 GB of a 141 GB H200.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

elapsed() { echo $(( $(date +%s) - START )); }

# The recommended XLA flags (gptjax.tools.bench.recommended_xla_flags). An unknown flag aborts XLA, so jax is started
# with them once first; the same start reports the backend, the card and its usable memory.
IFS='|' read -r FLAGS EXPERIMENTAL <<< "$($PY -c '
from gptjax.tools.bench import EXPERIMENTAL_GPU_XLA_FLAGS, recommended_xla_flags
print(" ".join(recommended_xla_flags("gpu")), EXPERIMENTAL_GPU_XLA_FLAGS["cuda-graph-loops"], sep="|")')"
probe() {  # probe FLAGS -> "backend|usable GiB|device kind", or fails when jax does not start with them
  XLA_FLAGS="$1" $PY -c '
import jax
jax.numpy.zeros(8).block_until_ready()
d = jax.devices()[0]
print(jax.default_backend(), int((d.memory_stats() or {}).get("bytes_limit", 0)) >> 30, d.device_kind, sep="|")' \
    2>/dev/null | tail -1
}
INFO=$(probe "$FLAGS")
if [[ -z "$INFO" ]]; then
  echo "warning: jax did not start with XLA_FLAGS='$FLAGS'; running without them" >&2
  FLAGS=""
  INFO=$(probe "")
fi
IFS='|' read -r BACKEND MEM_GIB CARD <<< "$INFO"
if [[ "$BACKEND" != "gpu" ]]; then
  if [[ "$REQUIRE_GPU" == 1 ]]; then
    echo "error: jax's backend is '${BACKEND:-none}', not gpu: install jax[cuda] for $PY (or REQUIRE_GPU=0)" >&2
    exit 2
  fi
  FLAGS=""  # the flags are for GPUs; nothing is forced on a CPU
fi
echo "# gptjax benchmark on $CARD ($BACKEND, ${MEM_GIB} GiB usable), $(date -u +%Y-%m-%dT%H:%MZ)," \
  "XLA_FLAGS='${FLAGS}'"
{ echo "card: $CARD"; echo "backend: $BACKEND"; echo "usable_gib: $MEM_GIB"; echo "xla_flags: $FLAGS";
  nvidia-smi 2>/dev/null | head -15; } > "$OUT/machine.txt"

# run NAME LABEL CAP_S XLA_FLAGS [bench flags...]: one config in its own process, within the budget.
run() {
  local name=$1 label=$2 cap=$3 flags=$4
  shift 4
  local tag="$name${label:+_$label}" left=$(( BUDGET_S - $(elapsed) ))
  if (( left < 40 )); then
    echo "skipped $tag: budget spent ($(elapsed) s of $BUDGET_S)" | tee -a "$OUT/skipped.txt" >&2
    return
  fi
  local limit=$(( left < cap ? left : cap ))
  echo "running $tag (limit ${limit} s, at $(elapsed) s)" >&2
  XLA_FLAGS="$flags" timeout --signal=INT --kill-after=15 "$limit" \
    $PY -m experiments.bench --config="configs/bench.py:$name" --label="$label" --out="$RUNS/$tag.json" \
    "$@" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} > "$RUNS/$tag.log" 2>&1
  local rc=$?
  { echo "=== $tag: exit $rc at $(elapsed) s ==="; cat "$RUNS/$tag.log"; } >> "$OUT/runs.log"
  if [[ -f "$RUNS/$tag.json" ]]; then
    { tr -d '\n' < "$RUNS/$tag.json"; echo; } >> "$OUT/runs.jsonl"
    grep '^| ' "$RUNS/$tag.log" | tail -n +3 >&2  # this run's rows, as they come
  fi
  if (( rc == 124 || rc == 137 )); then
    echo "timed out $tag after ${limit} s (see runs.log)" | tee -a "$OUT/skipped.txt" >&2
  elif [[ ! -f "$RUNS/$tag.json" ]]; then
    echo "failed $tag (exit $rc): $(grep -v '^[WIEF][0-9]' "$RUNS/$tag.log" | tail -1)" \
      | tee -a "$OUT/skipped.txt" >&2
  fi
}

if [[ -n "${BENCH_CONFIGS:-}" ]]; then
  for name in $BENCH_CONFIGS; do run "$name" "" 600 "$FLAGS"; done
else
  # The target table, most important first.
  run gpt2-124m-b48 "" 150 "$FLAGS"
  run sample-124m "" 120 "$FLAGS"
  run ppo-124m "" 200 "$FLAGS"
  run gpt2-124m-b12 "" 120 "$FLAGS"
  run gpt2-350m-b16 "" 140 "$FLAGS"
  run gpt2-1.5b-b8 "" 170 "$FLAGS"
  run gpt3-xl-t2048-b4 "" 170 "$FLAGS"
  if (( MEM_GIB >= 120 )); then
    run gpt3-6.7b-t2048 "" 260 "$FLAGS"
  else
    echo "skipped gpt3-6.7b-t2048: its ~107 GB training state needs the 141 GB H200 (this card: $MEM_GIB GiB)" \
      | tee -a "$OUT/skipped.txt" >&2
  fi
  # Variants, while time is left: what packing-aware masks, the flags and CUDA-graph loops change.
  if [[ "$EXTRA" == 1 ]]; then
    run gpt2-124m-b48 fused-xent 120 "$FLAGS" --config.model.xent_backward=fused
    run gpt2-124m-b12 loop 150 "$FLAGS" --workloads=pretrain,loop
    run gpt2-124m-b48 scanned 120 "$FLAGS" --config.model.scan_layers=True
    run ppo-124m one-decode-loop 200 "$FLAGS" --config.sample.decode_segments=1
    run sample-124m scanned-decode 100 "$FLAGS" --config.sample.unroll_layers=False --config.model.scan_layers=True
    run gpt2-124m-b48 packed8 120 "$FLAGS" --config.pretrain_segments=8
    run gpt2-124m-b12 stages 150 "$FLAGS" --workloads=sft,reward
    run gpt2-124m-b48 loss-chunk256 120 "$FLAGS" --config.loss_chunk=256
    run sample-124m cuda-graph-loops 120 "$FLAGS $EXPERIMENTAL"
  fi
fi

echo
if [[ -s "$OUT/runs.jsonl" ]]; then
  $PY -m experiments.bench --merge="$OUT/runs.jsonl" --out="$OUT/all.json" 2>/dev/null | tee "$OUT/table.md"
else
  echo "no results"
fi
if [[ -f "$OUT/skipped.txt" ]]; then
  echo
  cat "$OUT/skipped.txt"
fi
rm -rf "$RUNS"
echo "total $(elapsed) s; results in $OUT/"
