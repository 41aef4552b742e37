"""gptjax.hf checked against transformers' own GPT2LMHeadModel (the independent implementation).

Models are built offline from random GPT2Configs (one with 6 heads, one with 5: not powers of two) and every
weight, LayerNorm included, is randomised so a mis-mapped tensor shows in the logits. Checks: fp32 logit
parity (max |Δ| <= 1e-4) scanned and unscanned on a batch of full-length sequences; the state-dict keys equal
transformers'; export -> import and import -> export are bitwise exact; a directory written by
save_hf_checkpoint loads in GPT2LMHeadModel.from_pretrained with the same logits; safetensors and
weights_only torch files load, pickled objects are refused; bad input raises one clear error.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import hf
from gptjax.errors import ConfigError
from gptjax.model import GPT, GPTConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_CONFIGS = {
    # 6 heads of 12, default d_ff, tied embeddings.
    "h6": dict(vocab_size=97, n_positions=32, n_embd=72, n_layer=2, n_head=6),
    # 5 heads of 12, explicit d_ff, another eps, the other tanh-GELU name, untied LM head.
    "h5": dict(vocab_size=128, n_positions=24, n_embd=60, n_layer=3, n_head=5, n_inner=100,
               layer_norm_epsilon=1e-6, activation_function="gelu_pytorch_tanh", tie_word_embeddings=False),
}
# Dropout off; no GPT-2 BPE special ids in these tiny vocabularies.
HF_COMMON = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
BATCH = 3


@pytest.fixture(scope="module", autouse=True)
def fp32_everywhere():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


@functools.lru_cache(maxsize=None)
def hf_model(name: str):
    """Random-weight GPT2LMHeadModel in eval mode: every parameter drawn so that logits are O(1)."""
    torch.manual_seed(sorted(HF_CONFIGS).index(name))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIGS[name], **HF_COMMON))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            is_ln_scale = ".ln_" in f".{param_name}" and param_name.endswith("weight")
            param.copy_((1.0 if is_ln_scale else 0.0) + 0.15 * torch.randn_like(param))
    return model.eval()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def tokens(name: str) -> np.ndarray:
    cfg = HF_CONFIGS[name]
    rng = np.random.default_rng(0)
    return rng.integers(0, cfg["vocab_size"], (BATCH, cfg["n_positions"]), dtype=np.int32)


def hf_logits(model, tokens_BT) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens_BT.astype(np.int64))).logits.numpy()


@functools.lru_cache(maxsize=None)
def forward(cfg: GPTConfig):
    return jax.jit(lambda params, tokens_BT: GPT(cfg).apply({"params": params}, tokens_BT)[0])


def gptjax_config(name: str, **overrides) -> GPTConfig:
    return hf.config_from_hf(hf_model(name).config.to_dict(), **overrides)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logit_parity_with_transformers(name, scan):
    model = hf_model(name)
    cfg = gptjax_config(name, scan_layers=scan)
    params = hf.params_from_hf(state_dict_numpy(model), cfg)
    assert "groups" in params["decoder"] if scan else "groups_0" in params["decoder"]
    expected_BTV = hf_logits(model, tokens(name))
    assert expected_BTV.std() > 0.5, "logits too small for the 1e-4 tolerance to mean anything"
    ours_BTV = np.asarray(forward(cfg)(params, jnp.asarray(tokens(name))))
    assert ours_BTV.dtype == np.float32 and ours_BTV.shape == expected_BTV.shape
    assert np.abs(ours_BTV - expected_BTV).max() <= 1e-4

    # The tolerance catches a layout slip: swapping two query heads of the last layer must break parity.
    qkv = "groups" if scan else f"groups_{cfg.num_layers - 1}"
    kernel = params["decoder"][qkv]["block_0"]["attn"]["qkv"]["kernel"]
    heads = np.arange(cfg.num_heads)
    heads[[0, 1]] = heads[[1, 0]]
    swapped = kernel.at[..., 0, :, :].set(kernel[..., 0, heads, :])
    broken = jax.tree.map(lambda x: x, params)
    broken["decoder"][qkv]["block_0"]["attn"]["qkv"]["kernel"] = swapped
    assert np.abs(np.asarray(forward(cfg)(broken, jnp.asarray(tokens(name)))) - expected_BTV).max() > 1e-2


def test_config_maps_every_field():
    cfg = gptjax_config("h5")
    assert (cfg.vocab_size, cfg.max_len, cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim) == \
           (128, 24, 3, 60, 5, 12)
    assert (cfg.ff_dim, cfg.ln_eps, cfg.tie_embeddings, cfg.post_ln) == (100, 1e-6, False, False)
    assert (cfg.dropout_embed, cfg.dropout_resid, cfg.dropout_attn) == (0.0, 0.0, 0.0)
    # GPT2Config's own defaults (dropout 0.1, d_ff 4·D) come through when fields are missing.
    default = hf.config_from_hf({"vocab_size": 50257})
    assert (default.d_model, default.num_layers, default.ff_dim, default.dropout_resid) == (768, 12, 3072, 0.1)
    back = transformers.GPT2Config(**hf.config_to_hf(cfg))
    assert (back.n_inner, back.layer_norm_epsilon, back.tie_word_embeddings, back.n_head) == (100, 1e-6, False, 5)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_round_trips_are_bitwise(name):
    model = hf_model(name)
    original = state_dict_numpy(model)
    for scan in (True, False):
        cfg = gptjax_config(name, scan_layers=scan)
        params = hf.params_from_hf(original, cfg)
        exported = hf.params_to_hf(params, cfg)
        assert list(exported) == list(model.state_dict())  # same keys, same order as transformers
        for key, value in original.items():
            assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
        reimported = hf.params_from_hf(exported, cfg)
        assert jax.tree.structure(reimported) == jax.tree.structure(params)
        assert all(a.dtype == b.dtype and np.array_equal(a, b)
                   for a, b in zip(jax.tree.leaves(reimported), jax.tree.leaves(params)))
    # bf16 parameters survive export -> import unchanged too.
    cfg16 = gptjax_config(name, param_dtype="bfloat16")
    params16 = hf.params_from_hf(original, cfg16)
    again16 = hf.params_from_hf(hf.params_to_hf(params16, cfg16), cfg16)
    assert all(a.dtype == jnp.bfloat16 and np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(params16), jax.tree.leaves(again16)))


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_saved_checkpoint_loads_in_transformers(name, tmp_path):
    cfg = gptjax_config(name)
    params = hf.params_from_hf(state_dict_numpy(hf_model(name)), cfg)
    hf.save_hf_checkpoint(params, cfg, tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    for key, value in state_dict_numpy(hf_model(name)).items():
        assert np.array_equal(loaded.state_dict()[key].numpy(), value), key
    ours_BTV = np.asarray(forward(cfg)(params, jnp.asarray(tokens(name))))
    assert np.abs(hf_logits(loaded, tokens(name)) - ours_BTV).max() <= 1e-4
    cfg_back, params_back = hf.load_hf_checkpoint(tmp_path)
    assert cfg_back == cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_back), jax.tree.leaves(params)))


class NotATensor:
    """Stands for any object a malicious pickle could carry."""


def test_checkpoint_files_from_transformers_and_torch(tmp_path):
    model = hf_model("h6")
    reference = hf.params_from_hf(state_dict_numpy(model), gptjax_config("h6"))

    def same(params):
        return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)))

    model.save_pretrained(tmp_path / "st")  # transformers' own safetensors writer
    assert same(hf.load_hf_checkpoint(tmp_path / "st")[1])

    # Legacy pytorch_model.bin as OpenAI's GPT-2 release has it: no "transformer." prefix, mask buffers.
    legacy = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    legacy["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "bin").mkdir()
    torch.save(legacy, tmp_path / "bin" / "pytorch_model.bin")
    model.config.to_json_file(tmp_path / "bin" / "config.json")
    assert same(hf.load_hf_checkpoint(tmp_path / "bin")[1])

    torch.save({"wte.weight": NotATensor()}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refused to load"):
        hf.load_hf_checkpoint(tmp_path / "bin")


def test_bad_input_gives_one_clear_error(tmp_path):
    cfg = gptjax_config("h6")
    good = state_dict_numpy(hf_model("h6"))

    wrong = dict(good, **{"transformer.h.1.mlp.c_fc.weight": good["transformer.h.1.mlp.c_fc.weight"].T})
    with pytest.raises(ValueError, match=r"'transformer.h.1.mlp.c_fc.weight' has shape \(288, 72\), "
                                         r"expected \(72, 288\)"):
        hf.params_from_hf(wrong, cfg)
    missing = {k: v for k, v in good.items() if k != "transformer.h.0.attn.c_proj.bias"}
    with pytest.raises(ValueError, match=r"missing key 'h.0.attn.c_proj.bias'"):
        hf.params_from_hf(missing, cfg)
    with pytest.raises(ValueError, match=r"unexpected key 'transformer.h.0.attn.q_attn.weight'"):
        hf.params_from_hf(dict(good, **{"transformer.h.0.attn.q_attn.weight": good["transformer.wte.weight"]}), cfg)
    with pytest.raises(ValueError, match=r"the state dict has 2 layers, model.num_layers=3"):
        hf.params_from_hf(good, cfg.replace(num_layers=3))
    untied = dict(good, **{"lm_head.weight": good["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match="differs from wte.weight"):
        hf.params_from_hf(untied, cfg)

    with pytest.raises(ConfigError, match=r"activation_function='relu'.*valid choices: \['gelu_new', "
                                          r"'gelu_pytorch_tanh'\]"):
        hf.config_from_hf({**HF_CONFIGS["h6"], "activation_function": "relu"})
    with pytest.raises(ConfigError, match="n_head=5 does not divide n_embd=72"):
        hf.config_from_hf({**HF_CONFIGS["h6"], "n_head": 5})
    with pytest.raises(ConfigError, match="post_ln"):
        hf.params_to_hf({"decoder": {}}, GPTConfig(vocab_size=16, max_len=8, num_layers=1, d_model=8,
                                                   num_heads=2, post_ln=True))
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS["h6"]))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_hf_checkpoint(tmp_path)
