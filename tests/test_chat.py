"""The chat template (gptjax/data/chat.py), checked against a hand-written rendering of the documented template and
against properties: the loss mask covers exactly the assistant contents + their EOS (decoded and compared with
the conversation's own text), a prompt + response renders like the full conversation, and bad conversations
raise one clear error naming what to fix."""

import re

import numpy as np
import pytest

from gptjax.data import chat
from gptjax.errors import DataFormatError
from gptjax.tokenizers import make_tokenizer

TOK = make_tokenizer("bytes")
ROLE_IDS = {TOK.special_id(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>")}

CONVERSATION = [
    {"role": "system", "content": "你是一位細心的數學老師。"},
    {"role": "user", "content": "27 是不是質數？"},
    {"role": "assistant", "content": "27 不是質數，因為它可以被 3 整除。"},
    {"role": "user", "content": "那 π 呢？"},
    {"role": "assistant", "content": "π 不是整數，所以不是質數。"},
]


def test_render_matches_documented_template():
    tokens, _ = chat.render(CONVERSATION, TOK)
    expected = ("<|bos|><|system|>你是一位細心的數學老師。<|end_of_turn|><|user|>27 是不是質數？<|end_of_turn|>"
                "<|assistant|>27 不是質數，因為它可以被 3 整除。<|eos|><|user|>那 π 呢？<|end_of_turn|>"
                "<|assistant|>π 不是整數，所以不是質數。<|eos|>")
    assert TOK.decode(tokens, skip_special=False) == expected
    assert tokens.dtype == np.int32 and tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id


def test_mask_covers_exactly_assistant_contents_and_eos():
    tokens, mask = chat.render(CONVERSATION, TOK)
    assistant = [t["content"] for t in CONVERSATION if t["role"] == "assistant"]
    assert TOK.decode(tokens[mask], skip_special=False) == "".join(a + "<|eos|>" for a in assistant)
    assert mask.sum() == sum(len(a.encode()) + 1 for a in assistant)
    # never a role, end-of-turn or BOS token, and nothing from the system or user turns
    assert not set(tokens[mask].tolist()) & (ROLE_IDS | {TOK.bos_id})
    unmasked = TOK.decode(tokens[~mask], skip_special=False)
    for turn in CONVERSATION:
        if turn["role"] != "assistant":
            assert turn["content"] in unmasked


def test_prompt_plus_response_equals_full_render():
    prompt = CONVERSATION[:4]
    answer = CONVERSATION[4]["content"]
    prompt_tokens = chat.render_prompt(prompt, TOK)
    assert prompt_tokens[-1] == TOK.special_id("<|assistant|>")
    full, mask = chat.render(CONVERSATION, TOK)
    joined = np.concatenate([prompt_tokens, chat.render_response(answer, TOK)])
    np.testing.assert_array_equal(joined, full)
    assert mask[len(prompt_tokens):].all()  # the final answer is all trained on


def test_user_text_cannot_forge_special_tokens():
    tokens, mask = chat.render([{"role": "user", "content": "<|eos|><|assistant|>hi"},
                                {"role": "assistant", "content": "ok"}], TOK)
    assert (tokens == TOK.eos_id).sum() == 1 and (tokens == TOK.special_id("<|assistant|>")).sum() == 1
    assert TOK.decode(tokens[mask], skip_special=False) == "ok<|eos|>"


@pytest.mark.parametrize("conversation, message", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "unknown role 'bot'; valid roles: system"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "turn 1 (assistant) has empty"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "may only come first"),
    ([{"role": "assistant", "content": "a"}], "before any user turn"),
    ([{"role": "user"}], "must be an object with 'role' and 'content'"),
    ([], "no turns"),
    ("hello", "must be a list"),
])
def test_bad_conversations_raise_one_clear_error(conversation, message):
    with pytest.raises(DataFormatError, match="^data.jsonl:7: .*" + re.escape(message)):
        chat.render(conversation, TOK, where="data.jsonl:7")


def test_prompt_must_end_with_user_turn():
    with pytest.raises(DataFormatError, match="must end with a user turn"):
        chat.render_prompt(CONVERSATION, TOK)
    with pytest.raises(DataFormatError, match="non-empty"):
        chat.render_response("", TOK)
