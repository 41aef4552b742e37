"""The built-in scaling sweep: six GPT sizes on Shakespeare, 12.8k → 793k non-embedding parameters (62×).

    python -m experiments.sweep --sweep=configs/sweeps/shakespeare_sizes.py --root=workdirs/sweep
    python -m experiments.fit_scaling --results=workdirs/sweep/results.csv --out=workdirs/sweep
    python -m experiments.sweep --sweep=configs/sweeps/shakespeare_sizes.py --sizes_only   # check the span

Tokenizer: the base config's SentencePiece model (a few thousand pieces trained on the Shakespeare training
split). With GPT-2's 50k-token BPE the tied output layer would be ~90% of the largest model's FLOPs per token
(6·d·V against 6·N) and ~99% of the smallest's; at ~4k pieces it is ~40% of the largest's (the smallest, a
1-layer d_model 32 model, stays output-dominated at any useful vocabulary).

Every size trains on the same 500 × 16 × 128 = 1.02M tokens (under one epoch of the ~1.3M-token corpus) with
one learning rate, so the fit is L(N) at a fixed token budget, not Kaplan's converged L(N). Heads are 16 wide.
Budget: ~24 TFLOP in all (6·(N + d·V) + attention per token); ~20 min on a 2-core CPU at ~20 GFLOP/s.
"""

import ml_collections

# (layers, d_model): non-embedding params ≈ 12·layers·d_model² = 12.8k, 57k, 100k, 232k, 452k, 793k.
SIZES = ((1, 32), (2, 48), (2, 64), (3, 80), (3, 112), (4, 128))
HEAD_DIM = 16


def get_sweep() -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.base_config = "configs/pretrain.py:shakespeare-sp"
    sweep.overrides = {
        "tokenizer": {"kind": "sentencepiece"},
        "model": {"max_len": 128},
        "train": {"steps": 500, "batch_size": 16, "seq_len": 128,
                  # Evaluate mid-way and at the end on the same 24 × 16 × 128 = 49k validation tokens.
                  "eval_every": 250, "eval_batches": 24, "ckpt_every": 250},
        "optim": {"lr": 2e-3, "warmup_steps": 50},
    }
    sweep.combine = "product"
    sweep.axes = [[{"model.num_layers": layers, "model.d_model": d, "model.num_heads": d // HEAD_DIM}
                   for layers, d in SIZES]]
    return sweep
