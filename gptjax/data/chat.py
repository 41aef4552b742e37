"""The one conversation template shared by SFT, the reward model, PPO and the chat REPL.

A conversation is a list of turns ``{"role": "system" | "user" | "assistant", "content": str}``.
Rendered to token ids it reads::

    <|bos|> [<|system|> system text <|end_of_turn|>]
            <|user|> question <|end_of_turn|>
            <|assistant|> answer <|eos|>
            <|user|> follow-up <|end_of_turn|>
            <|assistant|> answer <|eos|>

System and user turns close with ``<|end_of_turn|>``; every assistant turn closes with ``<|eos|>``. EOS is the
sampler's single stop token, so what the model generates in a chat is re-rendered token for token as history on the
next turn, and a response scored by the reward model always ends at EOS, where the score is read. Role tokens and
content are never merged: content goes through ``tokenizer.encode``, which cannot produce special ids, so a user
typing "<|eos|>" gets plain text.

Teacher forcing trains on exactly the assistant content tokens and their closing EOS (``assistant_mask``); system,
user, role and BOS tokens are context only. For generation, ``render_prompt`` stops after ``<|assistant|>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gptjax.errors import DataFormatError

ROLES = ("system", "user", "assistant")
Conversation = Sequence[Mapping[str, Any]]


def _role_token(role: str) -> str:
    return f"<|{role}|>"


def validate(conversation: Conversation, *, where: str = "conversation",
             require_assistant: bool = True) -> None:
    """Raises DataFormatError (prefixed by `where`) unless `conversation` follows the template's rules.

    Rules: a non-empty list of {"role", "content"} turns; roles in ROLES; non-blank string content; a system turn
    only first; a user turn before the first assistant turn; with `require_assistant`, at least one assistant turn.
    """
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise DataFormatError(f"{where}: a conversation must be a list of {{'role', 'content'}} turns, "
                              f"got {type(conversation).__name__}")
    if not conversation:
        raise DataFormatError(f"{where}: the conversation has no turns")
    seen_user = False
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise DataFormatError(f"{where}: turn {i} must be an object with 'role' and 'content', got {turn!r}")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataFormatError(f"{where}: turn {i} has unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataFormatError(f"{where}: turn {i} ({role}) has empty content; every turn needs text")
        if role == "system" and i != 0:
            raise DataFormatError(f"{where}: turn {i} is a system turn; a system turn may only come first")
        if role == "assistant" and not seen_user:
            raise DataFormatError(f"{where}: turn {i} is an assistant turn before any user turn")
        seen_user |= role == "user"
    if not seen_user:
        raise DataFormatError(f"{where}: the conversation has no user turn")
    if require_assistant and not any(t["role"] == "assistant" for t in conversation):
        raise DataFormatError(f"{where}: the conversation has no assistant turn; SFT needs at least one answer "
                              "to learn from")


def _render_turns(conversation: Conversation, tokenizer) -> tuple[list[int], list[bool]]:
    eos_id, end_id = tokenizer.eos_id, tokenizer.special_id("<|end_of_turn|>")
    tokens, mask = [tokenizer.bos_id], [False]
    for turn in conversation:
        is_assistant = turn["role"] == "assistant"
        content = tokenizer.encode(turn["content"])
        tokens += [tokenizer.special_id(_role_token(turn["role"]))] + content + [eos_id if is_assistant else end_id]
        mask += [False] + [is_assistant] * (len(content) + 1)
    return tokens, mask


def render(conversation: Conversation, tokenizer, *, where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of a whole conversation, for teacher forcing.

    Returns (tokens_L int32, assistant_mask_L bool): mask[i] is True iff tokens[i] is an assistant content token or
    the EOS closing an assistant turn, i.e. a token the model is trained to produce. The last token is the final
    assistant turn's EOS when the conversation ends with an assistant turn.
    """
    validate(conversation, where=where, require_assistant=True)
    tokens, mask = _render_turns(conversation, tokenizer)
    return np.asarray(tokens, np.int32), np.asarray(mask, bool)


def render_prompt(conversation: Conversation, tokenizer, *, where: str = "prompt") -> np.ndarray:
    """Token ids (int32) of a conversation that awaits an answer, ending with the <|assistant|> role token.

    The conversation must end with a user turn (earlier assistant turns are history). Sampling from these tokens
    until EOS yields the answer; `render(conversation + [answer turn])` equals these tokens + answer + EOS.
    """
    validate(conversation, where=where, require_assistant=False)
    if conversation[-1]["role"] != "user":
        raise DataFormatError(f"{where}: a prompt must end with a user turn, got a final "
                              f"{conversation[-1]['role']} turn; drop the answer to make it a prompt")
    tokens, _ = _render_turns(conversation, tokenizer)
    return np.asarray(tokens + [tokenizer.special_id("<|assistant|>")], np.int32)


def render_response(text: str, tokenizer, *, where: str = "response") -> np.ndarray:
    """Token ids (int32) of an assistant answer as it follows `render_prompt`: content then EOS."""
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError(f"{where}: a response must be non-empty text, got {text!r}")
    return np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], np.int32)


def user_turn(text: str) -> list[dict[str, str]]:
    """A one-turn conversation asking `text` (how plain-text prompts enter the template)."""
    return [{"role": "user", "content": text}]
