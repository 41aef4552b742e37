"""Hugging Face bridge: a transformers GPT-2 directory in as a gptjax run, gptjax policies and reward models out.

``import_params``: a ``GPT2LMHeadModel`` directory (config.json + safetensors, or ``pytorch_model.bin`` read with
``weights_only``) as gptjax parameters for the GPT-2 BPE tokenizer. gptjax's vocabulary is the tokenizer's 50,263
ids (GPT-2's 50,257 plus our chat specials) rounded up to a multiple of 128; the rows GPT-2 lacks start at the
mean of its embeddings, so their logits start ordinary rather than dominant. ``experiments.hf import`` stores
the result as a finished checkpoint any stage can ``train.init_from``.

``export_policy`` / ``export_reward``: a pretraining/SFT/PPO policy as a ``GPT2LMHeadModel`` directory, a reward
model as a ``GPT2Model`` backbone plus ``score_head.safetensors``; both with tokenizer files that include the chat
specials and the chat template. The exported vocabulary is the tokenizer's (the padding rows, which gptjax never
samples, are cut), so ``model.generate`` chooses among the same ids as ``gptjax.sampling``; embeddings stay tied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gptjax import hf
from gptjax.errors import ConfigError
from gptjax.model import GPTConfig
from gptjax.tokenizers import SPECIAL_TOKENS, Tokenizer, _read_tiktoken_ranks, padded_vocab_size

GPT2_BPE_VOCAB = 50257
SCORE_HEAD_FILE = "score_head.safetensors"
# The chat template of gptjax/data/chat.py, in the Jinja that tokenizer.apply_chat_template runs.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end_of_turn|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
REWARD_README = """# gptjax reward model

A GPT-2 backbone (`GPT2Model`) and a linear score head (`{head}`: `weight` (1, d_model), `bias` (1,)); the
score of a conversation is the head applied to the backbone's last hidden state at its final token, the
`<|eos|>` closing the assistant's answer (gptjax `ScoreModel.reward`). The bias includes the shift that centres
the SFT demonstrations at 0, when the run fitted one.

```python
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Model

path = "{path}"
tokenizer = AutoTokenizer.from_pretrained(path)
backbone = GPT2Model.from_pretrained(path).eval()
head = load_file(f"{{path}}/{head}")
conversation = [{{"role": "user", "content": "Is 27 prime?"}}, {{"role": "assistant", "content": "No: 27 = 3 x 9."}}]
ids = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    hidden = backbone(ids).last_hidden_state[:, -1]        # the final <|eos|> token
    score = (hidden @ head["weight"].T + head["bias"])[:, 0]
```
"""


# ----------------------------------------------------------------------------------------------- import

def _mean_padded(table: np.ndarray, rows: int) -> np.ndarray:
    """``table`` (V, D) extended to ``rows`` rows that start at the mean embedding."""
    extra = np.broadcast_to(table.mean(axis=0, keepdims=True), (rows - table.shape[0], table.shape[1]))
    return np.concatenate([table, extra.astype(table.dtype)], axis=0)


def import_params(hf_dir: str | os.PathLike, tokenizer: Tokenizer, *, scan_layers: bool = True
                  ) -> tuple[GPTConfig, dict]:
    """(config, params) of a transformers GPT-2 directory, vocabulary padded for ``tokenizer`` (GPT-2 BPE)."""
    config_file = Path(hf_dir) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: missing; --hf_dir must be a transformers GPT-2 directory (config.json "
                          f"and model.safetensors or pytorch_model.bin)")
    hf_vocab = int(json.loads(config_file.read_text()).get("vocab_size", GPT2_BPE_VOCAB))
    if hf_vocab < GPT2_BPE_VOCAB:
        raise ConfigError(f"{config_file}: vocab_size={hf_vocab} is smaller than the GPT-2 BPE's {GPT2_BPE_VOCAB}; "
                          f"only checkpoints trained with GPT-2's tokenizer can be imported")
    source_cfg, params = hf.load_hf_checkpoint(hf_dir, scan_layers=scan_layers, dropout_embed=0.0,
                                               dropout_resid=0.0, dropout_attn=0.0)
    vocab = padded_vocab_size(max(hf_vocab, tokenizer.vocab_size))
    params = dict(params)
    decoder = dict(params["decoder"])
    decoder["wte"] = {"embedding": _mean_padded(np.asarray(decoder["wte"]["embedding"]), vocab)}
    params["decoder"] = decoder
    if "lm_head" in params:
        params["lm_head"] = _mean_padded(np.asarray(params["lm_head"]), vocab)
    return source_cfg.replace(vocab_size=vocab), params


def model_fields(cfg: GPTConfig) -> dict[str, Any]:
    """The ``model`` config section (configs/common.py) that rebuilds ``cfg`` from the gpt2-small preset."""
    if cfg.ln_eps != GPTConfig.ln_eps:
        raise ConfigError(f"HF config layer_norm_epsilon={cfg.ln_eps}: gptjax model configs use {GPTConfig.ln_eps}; "
                          f"this checkpoint cannot be stored as a run")
    return dict(preset="gpt2-small", vocab_size=cfg.vocab_size, max_len=cfg.max_len, num_layers=cfg.num_layers,
                d_model=cfg.d_model, num_heads=cfg.num_heads, d_head=cfg.head_dim, d_ff=cfg.ff_dim,
                dropout_embed=0.0, dropout_resid=0.0, dropout_attn=0.0, post_ln=False, attention_pattern="dense",
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers,
                init_std=cfg.init_std, tie_embeddings=cfg.tie_embeddings)


# ----------------------------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (its vocab.json / merges.txt alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _split_by_merges(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of ``token`` with merges ranked below ``max_rank``: the last step leaves the pair that forms it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], max_rank))
        if ranks.get(parts[best] + parts[best + 1], max_rank) >= max_rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _bpe_files(tokenizer: Tokenizer) -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt contents (GPT-2 BPE: rebuilt from the ranks; bytes: 256 tokens, no merges)."""
    chars = _bytes_to_unicode()
    if tokenizer.name == "bytes":
        return {chars[b]: b for b in range(256)}, []
    ranks = _read_tiktoken_ranks(tokenizer.path)
    vocab = {"".join(chars[b] for b in token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _split_by_merges(ranks, token, rank)
            merges.append("".join(chars[b] for b in left) + " " + "".join(chars[b] for b in right))
    return vocab, merges


def special_names(tokenizer: Tokenizer) -> dict[int, str]:
    """id -> token text of every special (GPT-2's EOS keeps its name, <|endoftext|>)."""
    return {tokenizer.special_id(t): tokenizer._special_text[tokenizer.special_id(t)] for t in SPECIAL_TOKENS}


def save_tokenizer(tokenizer: Tokenizer, out: Path, max_len: int) -> None:
    """vocab.json, merges.txt and tokenizer_config.json (specials, chat template) for AutoTokenizer."""
    if tokenizer.name not in ("gpt2", "bytes"):
        raise ConfigError(f"tokenizer.kind={tokenizer.name!r}: only the gpt2 and bytes tokenizers can be written "
                          f"as transformers tokenizer files")
    vocab, merges = _bpe_files(tokenizer)
    names = special_names(tokenizer)
    vocab.update({name: i for i, name in names.items()})
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    role = {"pad_token": tokenizer.pad_id, "bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id,
            "unk_token": tokenizer.eos_id}
    config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": max_len, "add_prefix_space": False,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(i): {"content": name, "lstrip": False, "rstrip": False, "normalized": False,
                                          "single_word": False, "special": True} for i, name in sorted(names.items())},
        "additional_special_tokens": [names[tokenizer.special_id(t)] for t in SPECIAL_TOKENS
                                      if tokenizer.special_id(t) not in role.values()],
        **{key: names[i] for key, i in role.items()},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in (*role, "additional_special_tokens")}, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------- export

def _tokenizer_vocab(params: dict, cfg: GPTConfig, tokenizer: Tokenizer) -> tuple[dict, GPTConfig]:
    """Params and config cut to the tokenizer's ids (the padding rows are never sampled or scored)."""
    params = dict(params)
    decoder = dict(params["decoder"])
    decoder["wte"] = {"embedding": np.asarray(decoder["wte"]["embedding"])[:tokenizer.vocab_size]}
    params["decoder"] = decoder
    if "lm_head" in params:
        params["lm_head"] = np.asarray(params["lm_head"])[:tokenizer.vocab_size]
    return params, cfg.replace(vocab_size=tokenizer.vocab_size)


def _write_model_config(out: Path, tokenizer: Tokenizer, architecture: str) -> None:
    config = json.loads((out / "config.json").read_text())
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    config.update(ids, architectures=[architecture])
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


def _fresh_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out={out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_policy(params: dict, cfg: GPTConfig, tokenizer: Tokenizer, out: str | os.PathLike) -> Path:
    """A GPT2LMHeadModel directory (weights, config, generation config, tokenizer files) of a gptjax policy."""
    out = _fresh_dir(out)
    try:
        params, cfg = _tokenizer_vocab(params, cfg, tokenizer)
        hf.save_hf_checkpoint(params, cfg, out)
        _write_model_config(out, tokenizer, "GPT2LMHeadModel")
        save_tokenizer(tokenizer, out, cfg.max_len)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def export_reward(params: dict, cfg: GPTConfig, tokenizer: Tokenizer, out: str | os.PathLike) -> Path:
    """A GPT2Model backbone + ``score_head.safetensors`` + tokenizer files + a README with the loading code."""
    import safetensors.numpy

    out = _fresh_dir(out)
    try:
        backbone, cfg = _tokenizer_vocab({"decoder": params["decoder"]}, cfg.replace(tie_embeddings=True), tokenizer)
        state = {k[len("transformer."):]: np.ascontiguousarray(v) for k, v in hf.params_to_hf(backbone, cfg).items()
                 if k.startswith("transformer.")}
        safetensors.numpy.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(hf.config_to_hf(cfg), indent=2, sort_keys=True) + "\n")
        _write_model_config(out, tokenizer, "GPT2Model")
        head = {"weight": np.asarray(params["score"]["kernel"], np.float32).T.copy(),
                "bias": np.asarray(params["score"]["bias"], np.float32).reshape(1)}
        safetensors.numpy.save_file(head, str(out / SCORE_HEAD_FILE), metadata={"format": "pt"})
        save_tokenizer(tokenizer, out, cfg.max_len)
        (out / "README.md").write_text(REWARD_README.format(head=SCORE_HEAD_FILE, path=out))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
