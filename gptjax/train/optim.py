"""AdamW with the GPT-3 recipe: warmup + cosine schedule, global-norm clipping, weight-decay mask, batch ramp.

GPT-3 (Brown et al. 2020, §2.3 / App. B): Adam β1 0.9, β2 0.95, ε 1e-8, global-norm clip 1.0, weight decay 0.1,
linear warmup then cosine decay to 10% of the peak, batch size ramped linearly up from 32k tokens.

Which parameters decay (nanoGPT's rule, by parameter role rather than by ``ndim`` — a scanned bias has a
leading layer axis and DenseGeneral's qkv bias is 3-D, so ``ndim >= 2`` would mis-classify them):
every matrix a token is multiplied by or looked up in decays — Dense/DenseGeneral ``kernel``s, ``embedding``
tables (token and position) and an untied ``lm_head``; biases and LayerNorm ``scale``/``bias`` do not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.errors import ConfigError

DECAYED_PARAM_NAMES = ("kernel", "embedding", "lm_head")
UNDECAYED_PARAM_NAMES = ("bias", "scale")


def lr_schedule(peak_lr: float, *, warmup_steps: int, decay_steps: int,
                final_lr_fraction: float) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup to ``peak_lr`` then cosine decay to ``final_lr_fraction * peak_lr``.

    With ``count`` the number of updates applied so far (optax's count, 0 for the first update):
      count < warmup:         peak · (count + 1) / warmup          (the first update already moves: no lr-0 step)
      warmup <= count:        final + (peak − final) · ½(1 + cos(π·p)),  p = (count − warmup)/(decay − warmup) ∈ [0, 1]
    and ``final`` from ``decay_steps`` on.
    """
    final_lr = peak_lr * final_lr_fraction
    cosine_steps = max(decay_steps - warmup_steps, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak_lr * (count + 1.0) / max(warmup_steps, 1)
        progress = jnp.clip((count - warmup_steps) / cosine_steps, 0.0, 1.0)
        cosine = final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup_steps, warm, jnp.where(count >= decay_steps, final_lr, cosine))

    return schedule


def decay_mask(params) -> Any:
    """Tree of bools (True = weight decay applies), by the leaf's parameter name; see the module docstring."""

    def rule(path, _):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        if name in DECAYED_PARAM_NAMES:
            return True
        if name in UNDECAYED_PARAM_NAMES:
            return False
        raise ConfigError(f"parameter {jax.tree_util.keystr(path)} has no weight-decay rule; name it one of "
                          f"{DECAYED_PARAM_NAMES} (decayed) or {UNDECAYED_PARAM_NAMES} (not decayed), or extend "
                          f"gptjax/train/optim.py")

    return jax.tree_util.tree_map_with_path(rule, params)


def decay_steps_of(optim_cfg, total_steps: int) -> int:
    """``optim.decay_steps``, or the run's total steps when it is 0."""
    return int(optim_cfg.decay_steps) or int(total_steps)


def make_optimizer(optim_cfg, total_steps: int, params) -> tuple[optax.GradientTransformation, Callable]:
    """(AdamW chain, lr schedule) from the ``optim`` config section; ``params`` may be abstract (shapes only)."""
    _check_optim_config(optim_cfg, total_steps)
    schedule = lr_schedule(optim_cfg.lr, warmup_steps=int(optim_cfg.warmup_steps),
                           decay_steps=decay_steps_of(optim_cfg, total_steps),
                           final_lr_fraction=optim_cfg.final_lr_fraction)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask(params)))
    frozen = tuple(optim_cfg.get("frozen", None) or ())
    trainable_ids = tuple(optim_cfg.get("trainable_token_ids", None) or ())
    if trainable_ids and not frozen:
        raise ConfigError("optim.trainable_token_ids names rows of a frozen token embedding, but optim.frozen is "
                          f"empty; add {TOKEN_EMBEDDING.rsplit('/', 1)[0]!r} to optim.frozen or drop the ids")
    if frozen:
        # Zero the frozen parameters' gradients before clipping and Adam (they count in neither) and their update
        # after (AdamW's weight decay would still move them).
        hold = freeze(params, frozen, trainable_ids)
        parts = [hold, *parts, hold]
    return optax.chain(*parts), schedule


FROZEN = "frozen"
TOKEN_EMBEDDING = "decoder/wte/embedding"


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def freeze(params, prefixes, trainable_token_ids=()) -> optax.GradientTransformation:
    """Zeroes the updates of the parameters under ``prefixes`` (see frozen_labels), except, when the token
    embedding is frozen, its rows ``trainable_token_ids``: those pass unchanged."""
    labels = frozen_labels(params, prefixes)
    held: dict[str, np.ndarray | None] = {}  # frozen parameter -> rows that still train (None: none)
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
        if label == FROZEN:
            held[_path_name(path)] = None
    if trainable_token_ids:
        if TOKEN_EMBEDDING not in held:
            raise ConfigError(f"optim.trainable_token_ids names rows of {TOKEN_EMBEDDING}, which optim.frozen "
                              f"{tuple(prefixes)} does not freeze; freeze 'decoder/wte' or drop the ids")
        vocab = _leaf(params, TOKEN_EMBEDDING).shape[0]
        ids = np.asarray(trainable_token_ids, np.int64)
        if ids.min() < 0 or ids.max() >= vocab:
            raise ConfigError(f"optim.trainable_token_ids: {int(ids.max() if ids.max() >= vocab else ids.min())} "
                              f"is not a row of the {vocab}-row token embedding; give ids in [0, {vocab})")
        rows_V1 = np.zeros((vocab, 1), bool)
        rows_V1[ids] = True
        held[TOKEN_EMBEDDING] = rows_V1

    def update(updates, state, params=None):
        del params

        def hold(path, u):
            name = _path_name(path)
            if name not in held:
                return u
            rows = held[name]
            # where, not a product: a NaN gradient in a frozen row must not leak into the update
            return jnp.zeros_like(u) if rows is None else jnp.where(rows, u, jnp.zeros_like(u))
        return jax.tree_util.tree_map_with_path(hold, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _leaf(tree, name: str):
    for part in name.split("/"):
        tree = tree[part]
    return tree


def frozen_labels(params, prefixes) -> Any:
    """Tree of FROZEN / "trained" labels: a parameter is frozen when its '/'-joined path is a prefix or lies under
    one ("decoder/wte" freezes the token embedding, which a tied LM head shares)."""
    used = set()

    def label(path, _):
        name = _path_name(path)
        hits = [p for p in prefixes if name == p.rstrip("/") or name.startswith(p.rstrip("/") + "/")]
        used.update(hits)
        return FROZEN if hits else "trained"

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [p for p in prefixes if p not in used]
    if unused:
        raise ConfigError(f"optim.frozen: {unused} match no parameter; give '/'-joined parameter paths such as "
                          f"'decoder/wte' (top-level names here: {sorted(params)})")
    return labels


def _check_optim_config(o, total_steps: int) -> None:
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {o.lr}")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    decay = decay_steps_of(o, total_steps)
    if decay < o.warmup_steps:
        raise ConfigError(f"optim.decay_steps (or train.steps when it is 0) = {decay} is shorter than "
                          f"optim.warmup_steps={o.warmup_steps}")
    if not 0.0 <= o.final_lr_fraction <= 1.0:
        raise ConfigError(f"optim.final_lr_fraction must be in [0, 1], got {o.final_lr_fraction}")
    for name in ("b1", "b2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    if o.grad_accum_steps < 1:
        raise ConfigError(f"optim.grad_accum_steps must be >= 1, got {o.grad_accum_steps}")


@dataclasses.dataclass
class BatchRamp:
    """GPT-3's batch-size ramp: sequences per step as a function of tokens seen.

    The target grows linearly from ``start_tokens`` to the full batch over the first ``ramp_tokens`` tokens
    and is rounded (half up) to a multiple of the microbatch, at least one microbatch. The trainer realises it
    by running that many gradient-accumulation microbatches per step (a dynamic loop count in one compiled
    program), so no compute is spent on unused rows and the data iterator is advanced by exactly the rows
    used. ``start_tokens = 0`` switches the ramp off.
    The microbatch is a multiple of the data-parallel size, so every step's batch is too.
    """

    full_batch: int  # sequences per step once ramped (train.batch_size)
    micro_batch: int  # sequences per accumulation microbatch: the ramp's granularity
    seq_len: int
    start_tokens: int = 0
    ramp_tokens: int = 0
    _micro_per_step: list[int] = dataclasses.field(default_factory=list, repr=False)
    _tokens_before: list[int] = dataclasses.field(default_factory=lambda: [0], repr=False)

    def __post_init__(self):
        if self.full_batch % self.micro_batch:
            raise ConfigError(f"train.batch_size={self.full_batch} is not a multiple of the microbatch "
                              f"{self.micro_batch} (batch_size / optim.grad_accum_steps)")

    @property
    def enabled(self) -> bool:
        return self.start_tokens > 0 and self.ramp_tokens > 0

    @property
    def max_microbatches(self) -> int:
        return self.full_batch // self.micro_batch

    def batch_size_for_tokens(self, tokens_seen: int) -> int:
        if not self.enabled:
            return self.full_batch
        frac = min(tokens_seen / self.ramp_tokens, 1.0)
        target_tokens = self.start_tokens + (self.full_batch * self.seq_len - self.start_tokens) * frac
        micro = math.floor(target_tokens / self.seq_len / self.micro_batch + 0.5)
        return min(max(micro, 1), self.max_microbatches) * self.micro_batch

    def microbatches_at(self, step: int) -> int:
        """Accumulation microbatches at 0-based ``step`` (the full count when the ramp is off)."""
        if not self.enabled:
            return self.max_microbatches
        while len(self._micro_per_step) <= step:  # host-side, cumulative: tokens seen depend on earlier steps
            k = self.batch_size_for_tokens(self._tokens_before[-1]) // self.micro_batch
            self._micro_per_step.append(k)
            self._tokens_before.append(self._tokens_before[-1] + k * self.micro_batch * self.seq_len)
        return self._micro_per_step[step]

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps 0..step-1."""
        if not self.enabled:
            return step * self.full_batch * self.seq_len
        self.microbatches_at(step)
        return self._tokens_before[step]
