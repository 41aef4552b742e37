"""Sampling many responses and scoring them on the host side: what analysis, the over-optimisation study and any
stage that samples, picks and fine-tunes (rejection sampling) share.

``RolloutEngine`` samples with the KV-cache sampler (``gptjax.sampling``) in fixed-size batches (one compiled
shape) and scores the sampled tokens' log-probs with a full forward pass; ``Rollouts`` holds the rows (left-padded
prompt, then the right-padded response). ``samples`` is one continuation per prompt, for reports.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import sampling
from gptjax import sharding as sharding_lib
from gptjax.data import chat
from gptjax.errors import ConfigError
from gptjax.model import GPT
from gptjax.stages import rl
from gptjax.tokenizers import Tokenizer


@dataclasses.dataclass
class Rollouts:
    """Sampled responses as full rows: left-padded prompt then right-padded response (T = P + N)."""

    tokens_BT: np.ndarray
    valid_BT: np.ndarray  # real tokens
    response_mask_BT: np.ndarray  # response tokens up to and including EOS
    finished_B: np.ndarray  # the response ended with EOS
    sampler_logprobs_BN: np.ndarray  # the sampler's log π of each response token (0 where masked)

    def response_ids(self, i: int) -> list[int]:
        return self.tokens_BT[i][self.response_mask_BT[i]].tolist()

    def rows(self, start: int, stop: int) -> "Rollouts":
        """Rows ``start:stop`` (one of several prompt sets sampled in one call)."""
        return Rollouts(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))


def response_logprobs(params, tokens_BT, valid_BT, *, model: GPT, temperature: float = 1.0,
                      vocab_size: int | None = None):
    """log π(token_t | tokens_<t) for every column t (0 in column 0) under the distribution the sampler draws from:
    logits / temperature with ids >= ``vocab_size`` (the model's padded vocabulary) excluded. float32 (B, T).

    (stages/ppo/objective.sequence_logprobs normalises over the padded vocabulary too, which is fine for PPO's
    ratios but not for a KL between the sampled distributions.)
    """
    positions_BT, segment_ids_BT = rl.positions_and_segments(valid_BT)
    logits_BTV, _ = model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT, deterministic=True)
    logits_BTV = logits_BTV / temperature
    if vocab_size is not None:
        logits_BTV = jnp.where(jnp.arange(logits_BTV.shape[-1]) < vocab_size, logits_BTV, -jnp.inf)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(logp_BT, ((0, 0), (1, 0)))


class RolloutEngine:
    """Samples responses from a GPT policy and scores their log-probs; its jitted programs are built once.

    With a ``mesh`` whose data axes hold several devices (and divide ``batch_size``), each batch's rows are split
    over them and the parameters replicated: on several XLA CPU devices this runs the devices' shares in parallel
    instead of every device repeating the whole batch."""

    def __init__(self, model: GPT, cfg: sampling.SamplingConfig, batch_size: int = 64, mesh=None):
        self.model, self.cfg, self.batch_size = model, cfg, batch_size
        self.mesh = sharding_lib.row_mesh(mesh, batch_size)
        self._sample = sampling.make_sampler(model, cfg)
        self._logprobs = jax.jit(functools.partial(response_logprobs, model=model,
                                                   temperature=cfg.temperature if cfg.temperature > 0 else 1.0,
                                                   vocab_size=cfg.vocab_size))

    def generate(self, params, prompts: Sequence[Sequence[int]], seed: int, *,
                 prompt_len: int | None = None) -> Rollouts:
        """One response per prompt; prompts are left-padded to the longest, or to exactly ``prompt_len`` (so prompt
        sets of similar lengths share one compiled program); batches padded to ``batch_size``."""
        longest = max(len(p) for p in prompts)
        if prompt_len is not None and prompt_len < longest:
            raise ValueError(f"prompt_len={prompt_len} is shorter than the longest prompt ({longest} tokens)")
        P, B = prompt_len or longest, self.batch_size
        params, parts = self._replicated(params), []
        for start in range(0, len(prompts), B):
            chunk = [list(p) for p in prompts[start:start + B]]
            n = len(chunk)
            chunk += [chunk[-1]] * (B - n)  # one compiled shape
            tokens_BP, valid_BP = sampling.left_pad(chunk, self.cfg.pad_id, length=P)
            key = jax.random.fold_in(jax.random.key(seed), start)
            rows = sharding_lib.split_rows(self.mesh, tokens_BP, valid_BP)
            out = jax.device_get(self._sample(params, *rows, key))
            parts.append((np.concatenate([tokens_BP, np.asarray(out.tokens_BN)], 1)[:n],
                          np.concatenate([valid_BP, np.asarray(out.mask_BN)], 1)[:n],
                          np.concatenate([np.zeros_like(valid_BP), np.asarray(out.mask_BN)], 1)[:n],
                          np.asarray(out.finished_B)[:n], np.asarray(out.logprobs_BN)[:n]))
        return Rollouts(*(np.concatenate(xs) for xs in zip(*parts)))

    def sequence_logprobs(self, params, rollouts: Rollouts) -> np.ndarray:
        """Σ over each row's response tokens of log π(token | prefix), by a full forward pass. (B,)"""
        out, B = [], self.batch_size
        n = len(rollouts.tokens_BT)
        params = self._replicated(params)
        for start in range(0, n, B):
            t, v = rollouts.tokens_BT[start:start + B], rollouts.valid_BT[start:start + B]
            m = rollouts.response_mask_BT[start:start + B]
            k = len(t)
            if k < B:
                t, v, m = (np.concatenate([x, np.repeat(x[-1:], B - k, 0)]) for x in (t, v, m))
            rows = sharding_lib.split_rows(self.mesh, t, v)
            logp_BT = np.asarray(self._logprobs(params, *rows))
            out.append(np.sum(np.where(m, logp_BT, 0.0), axis=1)[:k])
        return np.concatenate(out)

    def _replicated(self, params):
        """Parameters on every device of the mesh, once per call (host arrays are copied; placed ones stay)."""
        if self.mesh is None:
            return params
        return jax.device_put(params, sharding_lib.replicated(self.mesh))

    def kl(self, params, ref_params, rollouts: Rollouts) -> np.ndarray:
        """Per-row Σ_t log π − log π_ref over the response: its mean estimates KL(π ‖ π_ref) in nats when the
        rollouts were sampled from π (with this engine's temperature)."""
        return self.sequence_logprobs(params, rollouts) - self.sequence_logprobs(ref_params, rollouts)


def response_texts(tokenizer: Tokenizer, tokens_BT, response_mask_BT) -> list[str]:
    """Each row's response as text (special tokens such as EOS dropped, surrounding whitespace stripped)."""
    tokens_BT, mask_BT = np.asarray(tokens_BT), np.asarray(response_mask_BT, bool)
    return [tokenizer.decode(row[mask].tolist()).strip() for row, mask in zip(tokens_BT, mask_BT)]


def render_prompts(texts: Sequence[str], tokenizer: Tokenizer, chat_format: bool) -> list[list[int]]:
    """Chat stages answer a user turn; a pretrained model continues raw text after an EOS (a fresh document)."""
    if chat_format:
        return [chat.render_prompt(chat.user_turn(t), tokenizer).tolist() for t in texts]
    return [[tokenizer.eos_id, *tokenizer.encode(t)] for t in texts]


def samples(model: GPT, params, tokenizer: Tokenizer, prompts: Sequence[str], *, chat_format: bool,
            temperature: float, max_new_tokens: int, seed: int) -> list[dict]:
    """One continuation per prompt (greedy at temperature 0)."""
    ids = render_prompts(prompts, tokenizer, chat_format)
    room = model.cfg.max_len - max(map(len, ids))
    if room < 1:
        raise ConfigError(f"--prompts: the longest prompt leaves no room in the context max_len={model.cfg.max_len}")
    cfg = sampling.SamplingConfig(max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    rollouts = RolloutEngine(model, cfg, batch_size=len(ids)).generate(params, ids, seed)
    return [{"prompt": p, "response": tokenizer.decode(rollouts.response_ids(i)),
             "finished": bool(rollouts.finished_B[i])} for i, p in enumerate(prompts)]
