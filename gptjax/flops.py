"""The one FLOPs count of the project, model FLOPs utilisation (MFU) and a peak-throughput table per device.

Convention (PaLM, Chowdhery et al. 2022, App. B; nanoGPT's ``estimate_mfu``): training costs

    6·N_matmul + 12·L·d_attn·T   FLOPs per token,

where ``N_matmul`` counts every weight a token is multiplied by — all non-embedding parameters plus the
output projection (V·d, tied or not); embedding lookups do no arithmetic — and the second term is the
attention score (QKᵀ) and value (PV) products, 2·2·T·d_attn per layer forward, ×3 for forward+backward.
It counts the FULL T×T attention matrix, as PaLM and nanoGPT do; a causal kernel skips about half of it, and
``causal_attention_half=True`` halves that term. Every MFU this project reports uses the full-matrix
convention, so it compares directly with nanoGPT's figures (those this project compares with: docs/references.md).
"""

from __future__ import annotations

import jax

from gptjax.model import GPTConfig, count_params

# Dense bf16 peak FLOP/s per device (one JAX device), without the "with sparsity" doubling.
# Matched against ``jax.Device.device_kind`` by substring, first match wins (so more specific names first).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # same compute as H100 SXM, more and faster memory
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
)


def matmul_params(cfg: GPTConfig) -> int:
    """Parameters a token is multiplied by: non-embedding params + the output projection V·d."""
    return count_params(cfg)["non_embedding"] + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: GPTConfig, seq_len: int, *, causal_attention_half: bool = False) -> float:
    """Training (forward + backward) FLOPs per token at context ``seq_len``; see the module docstring."""
    attention = 12 * cfg.num_layers * cfg.attn_width * seq_len
    if causal_attention_half:
        attention /= 2
    return 6 * matmul_params(cfg) + attention


def score_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """``flops_per_token`` of the decoder without the V×d output projection (a score head has none)."""
    return flops_per_token(cfg, seq_len) - 6 * cfg.vocab_size * cfg.d_model


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak of ``device`` (default: the first device); None when unknown (e.g. CPU)."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for pattern, peak in PEAK_FLOPS:
        if pattern.lower() in kind.lower():
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Fraction of peak: achieved model FLOP/s ÷ peak. ``tokens_per_s`` and ``peak_flops`` must be per device
    or both summed over devices. None when the peak is unknown."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops
