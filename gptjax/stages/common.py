"""What every stage builds from its config and loads from a run: tokenizer, model config, parameters, samples.

A stage's runner turns its config into a tokenizer, a model, an objective and data iterators and hands them to a
loop (the shared ``train.loop.run_training``; PPO has its own in ``stages/ppo/loop.py``). Every stage after
pretraining starts from the previous stage's checkpoint (``train.init_from``); with ``model.preset =
"from_init"`` (the default of configs/sft.py, reward.py and ppo.py) the model and tokenizer are those of that
checkpoint, so a researcher only names the run to continue from (``resolve_from_init``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from gptjax import sampling, sharding
from gptjax.data import chat, shakespeare_sp
from gptjax.errors import ConfigError
from gptjax.model import GPT, GPTConfig, ScoreModel, count_params
from gptjax.presets import preset_config
from gptjax.tokenizers import Tokenizer, make_tokenizer, padded_vocab_size
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import aot, loop, state as state_lib

FROM_INIT = "from_init"  # model.preset / tokenizer.kind value: take the init_from run's model / tokenizer



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
    source = ckpt_lib.checkpoint_config(path, field)
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


def build_for_training(cfg, model_class, *, train_data: str = "") -> tuple[Tokenizer, nn.Module, Any, int]:
    """(tokenizer, ``model_class`` of the config's model, mesh, microbatch rows) of a run's config. With
    ``train_data`` (what ``data.train_path`` must name), an empty ``data.train_path`` is an error saying so."""
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = model_class(build_model_config(cfg.model, tokenizer, cfg.train.seq_len))
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    micro = micro_batch(cfg, mesh)
    if train_data and not cfg.data.train_path:
        raise ConfigError(f"data.train_path: give {train_data}")
    return tokenizer, model, mesh, micro


def held_out_batches(batches_fn: Callable, cfg, tokenizer: Tokenizer, micro: int, **kwargs):
    """The evaluation iterator over ``data.eval_path`` (None without one): ``batches_fn`` (a post-training reader)
    in file order, one pass, the last batch kept; ``train.eval_batch_size`` rows, else ``micro``. The file is read
    now (a bad one is an error before training starts); the trainer rewinds the iterator for each evaluation."""
    if not cfg.data.eval_path:
        return None
    eval_batch = int(cfg.train.eval_batch_size) or micro
    return batches_fn(cfg.data.eval_path, tokenizer, int(cfg.train.seq_len), eval_batch, shuffle=False,
                      num_epochs=1, drop_remainder=False, **kwargs)


def micro_batch(cfg, mesh) -> int:
    """Rows per accumulation microbatch (``train.batch_size / optim.grad_accum_steps``), checked against the
    mesh."""
    t = cfg.train
    for name, value in (("train.batch_size", t.batch_size), ("train.seq_len", t.seq_len),
                        ("optim.grad_accum_steps", cfg.optim.grad_accum_steps)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
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


def no_dropout(cfg: GPTConfig) -> GPTConfig:
    """``cfg`` with every dropout rate 0: networks are analysed, sampled from and trained by RL without it."""
    return cfg.replace(dropout_embed=0.0, dropout_resid=0.0, dropout_attn=0.0)


def eval_rows(stored) -> int:
    """Rows per evaluation batch of a stored config: ``train.eval_batch_size``, else the training microbatch."""
    return int(stored.train.eval_batch_size) or int(stored.train.batch_size) // int(stored.optim.grad_accum_steps)


def eval_loss(loss_fn, params, batches, max_batches: int) -> dict:
    """Token-weighted mean loss/accuracy over up to ``max_batches`` batches (the trainer's own eval step)."""
    step = jax.jit(loop.make_eval_step(loss_fn))
    loss_sum, weight, accuracy_sum, n = 0.0, 0.0, 0.0, 0
    for batch in batches:
        if n >= max_batches:
            break
        lw, w, sums = jax.device_get(step(params, batch))
        loss_sum, weight, accuracy_sum, n = loss_sum + float(lw), weight + float(w), \
            accuracy_sum + float(sums["accuracy"]), n + 1
    if weight == 0:
        raise ConfigError("the split produced no tokens to score (empty data?)")
    return {"loss": loss_sum / weight, "accuracy": accuracy_sum / weight, "num_tokens": weight, "num_batches": n}


def stored_config(path: str, field: str = "train.init_from") -> ml_collections.ConfigDict:
    """The config stored with the checkpoint at ``path`` (a run, its checkpoints/ or a step directory); ``field``
    is how messages name ``path``."""
    return ml_collections.ConfigDict(ckpt_lib.checkpoint_config(path, field))


def load_full_params(path: str, abstract_params, field: str, item_key: str = "params") -> dict:
    """Every parameter of the checkpoint at ``path`` into ``abstract_params``' shapes and shardings."""
    return ckpt_lib.unflatten(ckpt_lib.load_params(path, abstract_params, field=field, item_key=item_key))


def abstract_params_of(model, mesh) -> dict:
    """ShapeDtypeStructs (with the mesh's shardings) of ``model``'s parameters; nothing allocated."""
    boxed = state_lib.abstract_boxed_params(state_lib.default_init_params_fn(model, 8), jax.random.key(0))
    shardings = sharding.logical_to_sharding(boxed, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed),
                        shardings)


def expected_counts(model: nn.Module) -> dict[str, int]:
    """model.count_params of the decoder's GPTConfig, plus the score head (d_model + 1) for a ScoreModel."""
    counts = dict(count_params(model.cfg))
    if isinstance(model, ScoreModel):
        counts["total"] += model.cfg.d_model + 1
        counts["non_embedding"] += model.cfg.d_model + 1
    return counts


# --- ahead-of-time plans (gptjax.tools.plan) --------------------------------------------------------------------

PLAN_TOKENIZER = "gpt2"  # a from_init tokenizer with no run to take it from: the GPT presets' own


def planning_model_config(cfg, seq_len: int) -> tuple[GPTConfig, Tokenizer, list[str]]:
    """(GPTConfig, tokenizer, notes) of a config for planning: ``model.preset`` may name a preset where a run would
    take its model from ``train.init_from`` (then the tokenizer, when it is from_init too, is GPT-2's)."""
    notes = []
    if cfg.train.get("init_from") and FROM_INIT in (cfg.model.preset, cfg.tokenizer.kind):
        model_cfg, tok_cfg = resolve_from_init(cfg)
    else:
        model_cfg, tok_cfg = cfg.model, cfg.tokenizer
        if model_cfg.preset == FROM_INIT:
            raise ConfigError("model.preset='from_init' names no model without train.init_from; give a preset to "
                              "plan for, e.g. --config.model.preset=gpt3-6.7b")
        if tok_cfg.kind == FROM_INIT:
            tok_cfg = tok_cfg.copy_and_resolve_references()
            with tok_cfg.unlocked():
                tok_cfg.kind, tok_cfg.path = PLAN_TOKENIZER, ""
            notes.append(f"tokenizer.kind=from_init without a run: planned with the {PLAN_TOKENIZER} tokenizer")
    tokenizer = build_tokenizer(tok_cfg)
    return build_model_config(model_cfg, tokenizer, seq_len), tokenizer, notes


def plan_train_step(cfg, mesh, *, model_class, objective: Callable, contract, sizes: dict, flops_per_row: Callable,
                    unit_rows: int = 1, frozen_mesh=None) -> aot.StagePlan:
    """The plan of a stage trained by the shared loop: its train step on ``mesh`` (``objective`` and ``contract``
    as the stage registers them; ``sizes``: the contract's letters but B; ``flops_per_row(model_cfg)``: model
    FLOPs per batch row; ``unit_rows``: sequences per row, for the token count)."""
    if frozen_mesh is not None:
        raise ConfigError(f"config.stage={cfg.stage!r} trains one network; it has no frozen networks to place on "
                          f"other devices")
    seq_len = int(cfg.train.seq_len)
    model_cfg, _, notes = planning_model_config(cfg, seq_len)
    model = model_class(model_cfg)
    micro, accum, note = aot.resolve_microbatch(int(cfg.train.batch_size), int(cfg.optim.grad_accum_steps),
                                                sharding.data_parallel_size(mesh))
    notes += [note] if note else []
    program = aot.train_step_program(cfg, model, objective(cfg, model), contract, sizes, mesh, micro=micro,
                                     accum=accum, flops_per_row=flops_per_row(model_cfg))
    tokens = int(cfg.train.batch_size) * seq_len * unit_rows
    return aot.StagePlan("train step", [program], "tokens", tokens, tokens, model_cfg, notes,
                         {"optim.grad_accum_steps": accum},
                         shape={"batch": int(cfg.train.batch_size), "micro": micro, "accum": accum,
                                "seq_len": seq_len})
