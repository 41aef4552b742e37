"""gptjax.flops against a hand count of GPT-2 small and against nanoGPT's published MFU figures.

The hand count is written out from the architecture (Radford et al. 2019: 12 layers, d 768, 12 heads,
vocab 50257, context 1024, biases everywhere, tied embeddings), independently of the module's own count.
The MFU figures are nanoGPT's, measured on one H100 (2026-11-26; docs/references.md), in the same convention.
"""

import types

import pytest

from gptjax import flops
from gptjax.presets import preset_config


def gpt2_small_hand_count():
    L, d, V, T, ff = 12, 768, 50257, 1024, 4 * 768
    qkv = d * 3 * d + 3 * d  # fused q/k/v projection + bias
    attn_out = d * d + d
    mlp_fc = d * ff + ff
    mlp_proj = ff * d + d
    layer_norms = 2 * (d + d)  # ln_1, ln_2: scale + bias
    per_layer = qkv + attn_out + mlp_fc + mlp_proj + layer_norms
    assert per_layer == 7_087_872
    non_embedding = L * per_layer + 2 * d  # + final LayerNorm
    output_layer = V * d  # the tied unembedding is still a V x d matmul per token
    attention = 12 * L * d * T  # QK^T and PV: 2 matmuls x 2 FLOPs x T x d per layer, x3 for fwd+bwd
    return 6 * (non_embedding + output_layer) + attention, attention


def test_gpt2_small_equals_hand_count():
    expected, attention = gpt2_small_hand_count()
    cfg = preset_config("gpt2-small")
    assert flops.flops_per_token(cfg, 1024) == expected == 855_166_464
    assert flops.flops_per_token(cfg, 1024, causal_attention_half=True) == expected - attention / 2


@pytest.mark.parametrize("preset,seq_len,tokens_per_s,reported_mfu", [
    ("gpt2-small", 1024, 404_923, 35.0),
    ("gpt2-small", 1024, 482_766, 41.7),
    ("gpt2-medium", 1024, 179_904, 44.1),
    ("gpt2-xl", 1024, 42_242, 43.9),
    ("gpt3-xl", 2048, 60_115, 55.2),  # measured on an H200, same 989 TFLOP/s peak
    ("gpt3-6.7b", 2048, 10_022, 43.7),
])
def test_mfu_reproduces_nanogpt_figures(preset, seq_len, tokens_per_s, reported_mfu):
    cfg = preset_config(preset)
    util = flops.mfu(tokens_per_s, flops.flops_per_token(cfg, seq_len), 989e12)
    assert 100 * util == pytest.approx(reported_mfu, abs=0.05)


@pytest.mark.parametrize("kind,platform,peak", [
    ("NVIDIA H100 80GB HBM3", "gpu", 989e12),
    ("NVIDIA H100 PCIe", "gpu", 756e12),
    ("NVIDIA H200", "gpu", 989e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312e12),
    ("TPU v4", "tpu", 275e12),
    ("TPU v5 lite", "tpu", 197e12),
    ("TPU v5", "tpu", 459e12),
    ("TPU v5p", "tpu", 459e12),
    ("cpu", "cpu", None),
    ("Some Future Chip", "gpu", None),
])
def test_device_peak_table(kind, platform, peak):
    device = types.SimpleNamespace(device_kind=kind, platform=platform)
    assert flops.device_peak_flops(device) == peak


def test_mfu_without_peak_is_none():
    assert flops.mfu(1e6, 1e9, None) is None
    assert flops.mfu(1e6, 1e9, 1e15) == pytest.approx(1.0)
