"""A multi-turn chat with a trained policy, streaming tokens as they are decoded.

The conversation (system / user / assistant turns) is rendered with the one template of gptjax/data/chat.py and
re-encoded each turn, so the model always sees exactly what SFT trained on. Decoding reuses the model's KV-cache
API one token at a time (prefill the prompt, then a jitted single-token step) so each token can be printed as it
arrives; ``gptjax.sampling`` is the batched, fully-jitted engine used for rollouts.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Iterator, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.data import chat
from gptjax.errors import ConfigError
from gptjax.model import GPT, init_cache
from gptjax.tokenizers import StreamDecoder, Tokenizer


class ChatSession:
    """Holds the conversation; ``reply(user_text)`` yields the assistant's answer piece by piece."""

    def __init__(self, model: GPT, params, tokenizer: Tokenizer, *, system: str = "", temperature: float = 0.0,
                 max_new_tokens: int = 128, seed: int = 0):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self._key = jax.random.key(seed)
        self._step = jax.jit(functools.partial(_forward, model))

    def _choose(self, logits_V, key) -> int:
        logits_V = logits_V.at[self.tokenizer.vocab_size:].set(-jnp.inf)
        if self.temperature == 0:
            return int(jnp.argmax(logits_V))
        return int(jax.random.categorical(key, logits_V / self.temperature))

    def reply(self, user_text: str) -> Iterator[str]:
        self.messages.append({"role": "user", "content": user_text})
        prompt = chat.render_prompt(self.messages, self.tokenizer)
        max_len = self.model.cfg.max_len
        if len(prompt) >= max_len:
            raise ConfigError(f"the conversation is {len(prompt)} tokens, the model's context is {max_len}; "
                              f"start a new conversation (/reset)")
        budget = min(self.max_new_tokens, max_len - len(prompt))
        S = max_len  # one cache shape for every turn: the decode step compiles once
        cache = init_cache(self.model.cfg, 1, S)
        kv_valid = jnp.ones((1, S), bool)
        tokens = jnp.asarray(prompt, jnp.int32)[None]
        positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
        logits, cache = self._step(self.params, tokens, positions, cache, jnp.int32(0), kv_valid)
        decoder = StreamDecoder(self.tokenizer)
        answer_ids = []
        for i in range(budget):
            self._key, key = jax.random.split(self._key)
            token = self._choose(logits[0, -1], key)
            if token == self.tokenizer.eos_id:
                break
            answer_ids.append(token)
            piece = decoder.feed(token)
            if piece:
                yield piece
            if i + 1 == budget:
                break
            pos = len(prompt) + i
            logits, cache = self._step(self.params, jnp.asarray([[token]], jnp.int32),
                                       jnp.asarray([[pos]], jnp.int32), cache, jnp.int32(pos), kv_valid)
        tail = decoder.flush()
        if tail:
            yield tail
        answer = self.tokenizer.decode(answer_ids)
        if answer.strip():
            self.messages.append({"role": "assistant", "content": answer})
        else:  # nothing but EOS/whitespace: the template has no empty turns, so the exchange is forgotten
            self.messages.pop()

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]


def _forward(model: GPT, params, tokens_BT, positions_BT, cache, cache_index, kv_valid_BS):
    return model.apply({"params": params}, tokens_BT, positions_BT, cache=cache, cache_index=cache_index,
                       kv_valid_BS=kv_valid_BS)


def run_repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read-eval-print loop: tokens are written as they arrive; /reset starts over, /quit (or EOF) leaves."""
    out.write("Chat with the model. /reset starts a new conversation, /quit leaves.\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            out.write("(new conversation)\n")
            continue
        if not line:
            continue
        out.write("model> ")
        for piece in session.reply(line):
            out.write(piece)
            out.flush()
        out.write("\n")
