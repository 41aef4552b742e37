"""Stage runners: config in, trained run out. One function per stage, registered in ``STAGES``.

A runner turns its config into a tokenizer, a model, an objective and data iterators and hands them to the
shared loop (``train.loop.run_training``; PPO has its own loop in ``stages/ppo/loop.py``). Every stage after
pretraining starts from the previous stage's checkpoint (``train.init_from``); with ``model.preset =
"from_init"`` (the default of configs/sft.py, reward.py and ppo.py) the model and tokenizer are those of that
checkpoint, so a researcher only names the run to continue from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax import sampling, sharding
from gptjax.data import chat, post_training, shakespeare_sp
from gptjax.data.pipeline import make_lm_iterator
from gptjax.errors import ConfigError
from gptjax.model import GPT, GPTConfig, ScoreModel
from gptjax.presets import preset_config
from gptjax.stages.ppo import loop as ppo_loop
from gptjax.stages.pretrain import lm_loss
from gptjax.stages.reward import fit_reward_bias, reward_loss, shift_reward_bias
from gptjax.stages.sft import sft_loss
from gptjax.tokenizers import Tokenizer, make_tokenizer, padded_vocab_size
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import loop, state as state_lib

FROM_INIT = "from_init"  # model.preset / tokenizer.kind value: take the init_from run's model / tokenizer
REWARD_BIAS_FILE = "reward_bias.json"


# --- shared pieces ---------------------------------------------------------------------------------------------

def build_tokenizer(tok_cfg) -> Tokenizer:
    """The configured tokenizer; a SentencePiece ``path`` of ``shakespeare:<pieces>`` names a vocabulary trained
    on the Shakespeare training split (gptjax/data/shakespeare_sp.py), made on first use and cached."""
    path = tok_cfg.path or None
    try:
        if tok_cfg.kind == "sentencepiece" and path and shakespeare_sp.is_spec(path):
            path = shakespeare_sp.model_path(path)
        return make_tokenizer(tok_cfg.kind, path)
    except (ValueError, FileNotFoundError) as e:  # unknown kind / bad path: the message names the choices
        raise ConfigError(f"tokenizer: {e}") from None


def build_model_config(model_cfg, tokenizer: Tokenizer, seq_len: int) -> GPTConfig:
    """The preset's GPTConfig with every non-None ``model.*`` field applied; vocab from the tokenizer."""
    base = dataclasses.asdict(preset_config(model_cfg.preset))
    overrides = {k: v for k, v in model_cfg.items() if k != "preset" and v is not None}
    overrides.setdefault("vocab_size", padded_vocab_size(tokenizer))
    cfg = GPTConfig.from_dict({**base, **overrides})
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the {tokenizer.name} tokenizer's "
                          f"{tokenizer.vocab_size} ids; leave it unset (None) to derive it")
    if seq_len > cfg.max_len:
        raise ConfigError(f"train.seq_len={seq_len} exceeds the context model.max_len={cfg.max_len}; lower "
                          f"train.seq_len or raise model.max_len")
    return cfg


def resolve_from_init(cfg, path: str | None = None, field: str = "train.init_from"):
    """(model section, tokenizer section) of ``cfg``, with ``from_init`` entries replaced by the source run's."""
    model_cfg, tok_cfg = cfg.model, cfg.tokenizer
    if model_cfg.preset != FROM_INIT and tok_cfg.kind != FROM_INIT:
        return model_cfg, tok_cfg
    path = path or cfg.train.init_from
    if not path:
        raise ConfigError(f"model.preset / tokenizer.kind = {FROM_INIT!r} needs {field} (the run to continue)")
    source = ckpt_lib.checkpoint_config(path)
    model_cfg = model_cfg.copy_and_resolve_references()
    tok_cfg = tok_cfg.copy_and_resolve_references()
    with model_cfg.unlocked(), tok_cfg.unlocked():
        if model_cfg.preset == FROM_INIT:
            src = source["model"]
            for k, v in src.items():
                if k == "preset" or getattr(model_cfg, k, None) is None:
                    model_cfg[k] = v
        if tok_cfg.kind == FROM_INIT:
            tok_cfg.kind, tok_cfg.path = source["tokenizer"]["kind"], source["tokenizer"]["path"]
    return model_cfg, tok_cfg


def resolved_config(cfg, path: str | None = None, field: str = "train.init_from"):
    """A copy of ``cfg`` whose ``from_init`` model/tokenizer sections are replaced by the source run's, so the
    config stored in the workdir (and checked on resume) names the concrete model."""
    model_cfg, tok_cfg = resolve_from_init(cfg, path, field)
    out = cfg.copy_and_resolve_references()
    with out.unlocked():
        out.model, out.tokenizer = model_cfg, tok_cfg
    return out


def _micro_batch(cfg, mesh) -> int:
    t = cfg.train
    if t.batch_size % cfg.optim.grad_accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by optim.grad_accum_steps="
                          f"{cfg.optim.grad_accum_steps}")
    micro = t.batch_size // cfg.optim.grad_accum_steps
    sharding.check_batch_divisible(micro, mesh, field="train.batch_size / optim.grad_accum_steps (microbatch)")
    return micro


def make_sample_fn(model: GPT, tokenizer: Tokenizer, train_cfg, mesh, *, chat_prompts: bool = False
                   ) -> Callable | None:
    """params -> one continuation per ``train.sample_prompts`` entry, via the KV-cache sampler.

    Pretraining continues raw text (after an EOS, like a fresh document); SFT answers each prompt as a user turn.
    """
    prompts = list(train_cfg.sample_prompts)
    if not prompts or prompts == [""] and chat_prompts:
        return None
    if chat_prompts:
        ids = [chat.render_prompt(chat.user_turn(p), tokenizer).tolist() for p in prompts]
    else:
        ids = [[tokenizer.eos_id, *tokenizer.encode(p)] for p in prompts]
    longest = max(map(len, ids))
    max_new = min(int(train_cfg.sample_max_new_tokens), model.cfg.max_len - longest)
    if max_new < 1:
        raise ConfigError(f"train.sample_prompts: a prompt of {longest} tokens leaves no room in the context "
                          f"model.max_len={model.cfg.max_len}")
    tokens_BP, valid_BP = sampling.left_pad(ids, tokenizer.pad_id)
    sampler = sampling.make_sampler(model, sampling.SamplingConfig(
        max_new_tokens=max_new, temperature=float(train_cfg.sample_temperature), eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size))
    rng = jax.random.key(int(train_cfg.seed) + 1)

    def sample_fn(params):
        with loop.mesh_context(mesh):
            out = jax.device_get(sampler(params, tokens_BP, valid_BP, rng))
        return [p + " → " * chat_prompts + tokenizer.decode(np.asarray(row)[np.asarray(mask)].tolist())
                for p, row, mask in zip(prompts, out.tokens_BN, out.mask_BN)]

    return sample_fn


# --- stage 0: pretraining --------------------------------------------------------------------------------------

def run_pretrain(cfg, workdir: str) -> loop.TrainResult:
    t = cfg.train
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = GPT(build_model_config(cfg.model, tokenizer, t.seq_len))
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    micro = _micro_batch(cfg, mesh)
    common = dict(seq_len=int(t.seq_len), seed=int(t.seed))
    train_iter = make_lm_iterator(cfg.data, tokenizer, split="train", global_batch_size=micro, **common)
    eval_iter = None
    if cfg.data.source == "tfds" or cfg.data.val_fraction > 0:
        eval_batch = int(t.eval_batch_size) or micro
        sharding.check_batch_divisible(eval_batch, mesh, field="train.eval_batch_size")
        eval_iter = make_lm_iterator(cfg.data, tokenizer, split="validation", global_batch_size=eval_batch,
                                     num_epochs=1, **common)
    loss_fn = functools.partial(lm_loss, model=model, loss_chunk=int(t.loss_chunk))
    return loop.run_training(cfg, workdir, model=model, loss_fn=loss_fn, train_iter=train_iter, eval_iter=eval_iter,
                             sample_fn=make_sample_fn(model, tokenizer, t, mesh), mesh=mesh)


# --- stage 1: SFT ----------------------------------------------------------------------------------------------

def run_sft(cfg, workdir: str) -> loop.TrainResult:
    """Teacher forcing on conversations (JSONL ``data.train_path``), loss on assistant tokens only."""
    cfg = resolved_config(cfg)
    t = cfg.train
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = GPT(build_model_config(cfg.model, tokenizer, t.seq_len))
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    micro = _micro_batch(cfg, mesh)
    if not cfg.data.train_path:
        raise ConfigError("data.train_path: give the SFT conversations (JSONL, one {\"messages\": [...]} per line)")
    train_iter = post_training.sft_batches(cfg.data.train_path, tokenizer, int(t.seq_len), micro, seed=int(t.seed))
    eval_iter = None
    if cfg.data.eval_path:
        eval_batch = int(t.eval_batch_size) or micro
        eval_iter = functools.partial(post_training.sft_batches, cfg.data.eval_path, tokenizer, int(t.seq_len),
                                      eval_batch, shuffle=False, num_epochs=1, drop_remainder=False)
    loss_fn = functools.partial(sft_loss, model=model, loss_chunk=int(t.loss_chunk))
    return loop.run_training(cfg, workdir, model=model, loss_fn=loss_fn, train_iter=train_iter, eval_iter=eval_iter,
                             sample_fn=make_sample_fn(model, tokenizer, t, mesh, chat_prompts=True), mesh=mesh)


# --- stage 2: reward model -------------------------------------------------------------------------------------

def demonstration_rows(path: str, tokenizer: Tokenizer, seq_len: int, batch_size: int):
    """(tokens, valid) batches of whole conversations, one per row, right-padded: the RM bias's reference set."""
    rendered = post_training.render_sft(path, tokenizer, seq_len)
    for i in range(0, len(rendered), batch_size):
        chunk = rendered[i:i + batch_size]
        tokens = np.full((len(chunk), seq_len), tokenizer.pad_id, np.int32)
        valid = np.zeros((len(chunk), seq_len), bool)
        for r, (toks, _) in enumerate(chunk):
            tokens[r, :len(toks)], valid[r, :len(toks)] = toks, True
        yield {"tokens": tokens, "valid": valid}


def run_reward(cfg, workdir: str) -> loop.TrainResult:
    """K-wise ranking loss on ``data.train_path`` rankings; then the bias that centres demonstrations at 0."""
    cfg = resolved_config(cfg)
    t = cfg.train
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = ScoreModel(build_model_config(cfg.model, tokenizer, t.seq_len))
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    micro = _micro_batch(cfg, mesh)
    if not cfg.data.train_path:
        raise ConfigError("data.train_path: give the rankings (JSONL, {\"prompt\": ..., \"responses\": [best..worst]})")
    slots = int(cfg.data.num_slots) or None
    train_iter = post_training.ranking_batches(cfg.data.train_path, tokenizer, int(t.seq_len), micro,
                                               seed=int(t.seed), num_slots=slots)
    eval_iter = None
    if cfg.data.eval_path:
        eval_batch = int(t.eval_batch_size) or micro
        eval_iter = functools.partial(post_training.ranking_batches, cfg.data.eval_path, tokenizer, int(t.seq_len),
                                      eval_batch, shuffle=False, num_epochs=1, drop_remainder=False,
                                      num_slots=slots)
    loss_fn = functools.partial(reward_loss, model=model)
    result = loop.run_training(cfg, workdir, model=model, loss_fn=loss_fn, train_iter=train_iter,
                               eval_iter=eval_iter, mesh=mesh, loss_is_token_nll=False)
    if cfg.data.demos_path:
        params = jax.device_get(result.state.params)
        # Scored at the model's whole context, not the training rows' length: a demonstration (a system turn and a
        # long answer, say) may outgrow the rankings' rows, and this one-off inference pass costs little.
        demos = demonstration_rows(cfg.data.demos_path, tokenizer, model.cfg.max_len, micro)
        _, shift = fit_reward_bias(params, demos, model=model)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, REWARD_BIAS_FILE), "w") as f:
                json.dump({"shift": shift, "demos": cfg.data.demos_path, "step": result.step}, f, indent=2)
    return result


def load_reward_params(path: str, abstract_params, field: str) -> dict:
    """Reward-model params of the run at ``path`` with its demonstration-centring bias applied (if fitted)."""
    params = load_full_params(path, abstract_params, field)
    bias_file = os.path.join(path, REWARD_BIAS_FILE)
    if os.path.exists(bias_file):
        with open(bias_file) as f:
            params = shift_reward_bias(params, json.load(f)["shift"])
    return params


def load_full_params(path: str, abstract_params, field: str, item_key: str = "params") -> dict:
    """Every parameter of the checkpoint at ``path`` into ``abstract_params``' shapes and shardings."""
    return ckpt_lib.unflatten(ckpt_lib.load_params(path, abstract_params, field=field, item_key=item_key))


def abstract_params_of(model, mesh) -> dict:
    """ShapeDtypeStructs (with the mesh's shardings) of ``model``'s parameters; nothing allocated."""
    boxed = state_lib.abstract_boxed_params(state_lib.default_init_params_fn(model, 8), jax.random.key(0))
    shardings = sharding.logical_to_sharding(boxed, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed),
                        shardings)


def load_policy(workdir: str, mesh=None) -> tuple[GPT, dict, Tokenizer, str]:
    """(model, params, tokenizer, stage) of the policy a pretraining, SFT or PPO run ended with (dropout off)."""
    stored = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(workdir))
    stage = stored.get("stage", "pretrain")
    if stage == "reward":
        raise ConfigError(f"{workdir} is a reward-model run; give a pretraining, SFT or PPO run")
    tokenizer = build_tokenizer(stored.tokenizer)
    seq_len = int(stored.sampling.max_prompt_len) if stage == "ppo" else int(stored.train.seq_len)
    gpt_cfg = build_model_config(stored.model, tokenizer, seq_len)
    model = GPT(gpt_cfg.replace(dropout_embed=0.0, dropout_resid=0.0, dropout_attn=0.0))
    mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
    key = "policy_params" if stage == "ppo" else "params"
    return model, load_full_params(workdir, abstract_params_of(model, mesh), workdir, key), tokenizer, stage


# --- stage 3: PPO ----------------------------------------------------------------------------------------------

def run_ppo(cfg, workdir: str, eval_fn=None) -> ppo_loop.PPOResult:
    """PPO(-ptx): policy and reference from ``train.init_from`` (SFT), reward and value from ``ppo_init.reward_from``."""
    t = cfg.train
    if not t.init_from or not cfg.ppo_init.reward_from:
        raise ConfigError("PPO needs train.init_from (the SFT run) and ppo_init.reward_from (the reward-model run)")
    cfg = resolved_config(cfg)
    tokenizer = build_tokenizer(cfg.tokenizer)
    gpt_cfg = build_model_config(cfg.model, tokenizer, int(cfg.sampling.max_prompt_len))
    policy_model = GPT(gpt_cfg.replace(dropout_embed=0.0, dropout_resid=0.0, dropout_attn=0.0))  # dropout off in RL
    # The reward/value model's own architecture (it may differ from the policy's), as its run stored it.
    rm_model_cfg = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(cfg.ppo_init.reward_from)["model"])
    rm_cfg = build_model_config(rm_model_cfg, tokenizer, int(cfg.sampling.max_prompt_len))
    reward_model = ScoreModel(rm_cfg.replace(dropout_embed=0.0, dropout_resid=0.0, dropout_attn=0.0))
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))

    policy_params = load_full_params(t.init_from, abstract_params_of(policy_model, mesh), "train.init_from")
    reward_abstract = abstract_params_of(reward_model, mesh)
    reward_params = load_reward_params(cfg.ppo_init.reward_from, reward_abstract, "ppo_init.reward_from")
    value_params = load_full_params(cfg.ppo_init.reward_from, reward_abstract, "ppo_init.reward_from")
    if not cfg.data.prompts_path:
        raise ConfigError("data.prompts_path: give the PPO prompts (JSONL, one {\"prompt\": ...} per line)")
    prompts = post_training.prompt_examples(cfg.data.prompts_path, tokenizer, int(cfg.sampling.max_prompt_len))
    if int(cfg.sampling.max_prompt_len) + int(cfg.sampling.max_new_tokens) > gpt_cfg.max_len:
        raise ConfigError(f"sampling.max_prompt_len + sampling.max_new_tokens = "
                          f"{int(cfg.sampling.max_prompt_len) + int(cfg.sampling.max_new_tokens)} exceeds the "
                          f"context model.max_len={gpt_cfg.max_len}")
    ptx_iter = None
    if cfg.ppo.ptx_coef > 0:
        ptx_iter = make_lm_iterator(cfg.ptx, tokenizer, split="train", global_batch_size=int(cfg.ppo.minibatch_size),
                                    seq_len=int(cfg.ptx_seq_len), seed=int(t.seed))
    return ppo_loop.run_ppo(cfg, workdir, policy_model=policy_model, value_model=reward_model,
                            reward_model=reward_model, policy_params=policy_params, value_params=value_params,
                            reward_params=reward_params, prompts=prompts, pad_id=tokenizer.pad_id,
                            eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size, ptx_iter=ptx_iter, eval_fn=eval_fn, mesh=mesh)


# config.stage -> runner(cfg, workdir)
STAGES: dict[str, Callable] = {"pretrain": run_pretrain, "sft": run_sft, "reward": run_reward, "ppo": run_ppo}
