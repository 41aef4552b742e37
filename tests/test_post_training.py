"""Post-training data (gptjax/data/post_training.py), checked against independent references: packed SFT rows are
unpacked segment by segment and compared with chat.render of each conversation (every conversation exactly once,
positions restarting, targets = next input, weights = assistant mask); row placement equals a plain-Python
first-fit; ranking arrays equal render(prompt + response) per slot; bad JSONL raises an error naming FILE:LINE;
batch iteration is a pure function of (seed, epoch) and resumes exactly; the TFDS array_record dataset reads back
the same examples and keeps the original file:line for errors."""

import collections
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from gptjax.data import chat
from gptjax.data import post_training as pt
from gptjax.errors import DataFormatError
from gptjax.sampling import left_pad
from gptjax.tokenizers import make_tokenizer

TOK = make_tokenizer("bytes")


def _conv(i: int, turns: int = 1) -> list[dict]:
    conv = []
    for t in range(turns):
        conv += [{"role": "user", "content": f"Is {i * 10 + t} prime?"},
                 {"role": "assistant", "content": "No" + "!" * ((i * 7 + t) % 13)}]
    return conv


CONVS = [_conv(i, turns=1 + i % 3) for i in range(23)]


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def _unpack(batch: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rebuilds (tokens, mask) per packed segment and checks each segment's internal structure."""
    out = []
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        assert set(np.unique(seg[seg > 0])) == set(range(1, seg.max() + 1))  # ids 1..n, no gaps
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert np.all(np.diff(idx) == 1)  # contiguous
            np.testing.assert_array_equal(batch["positions"][row, idx], np.arange(len(idx)))
            inputs, targets = batch["inputs"][row, idx], batch["targets"][row, idx]
            np.testing.assert_array_equal(targets[:-1], inputs[1:])  # next token within the conversation only
            tokens = np.append(inputs, targets[-1])
            mask = np.append(False, batch["weights"][row, idx] > 0)
            out.append((tokens, mask))
        pad = seg == 0
        assert np.all(batch["weights"][row, pad] == 0) and np.all(batch["inputs"][row, pad] == TOK.pad_id)
    return out


def _key(tokens, mask):
    return (tuple(tokens.tolist()), tuple(mask.tolist()))


def test_sft_packing_reconstructs_every_conversation_once():
    seq_len = 128
    batch = pt.sft_examples([{"messages": c} for c in CONVS], TOK, seq_len)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((len(batch["inputs"]), seq_len), np.int32), "targets": ((len(batch["inputs"]), seq_len), np.int32),
        "positions": ((len(batch["inputs"]), seq_len), np.int32),
        "segment_ids": ((len(batch["inputs"]), seq_len), np.int32),
        "weights": ((len(batch["inputs"]), seq_len), np.float32)}
    got = collections.Counter(_key(t, m) for t, m in _unpack(batch))
    want = collections.Counter(_key(*chat.render(c, TOK)) for c in CONVS)
    assert got == want
    assert batch["segment_ids"].max() >= 2  # several conversations do share rows
    # the loss covers exactly the assistant answers and their EOS
    decoded = sorted(TOK.decode(t[m], skip_special=False) for t, m in _unpack(batch))
    assert decoded == sorted("".join(turn["content"] + "<|eos|>" for turn in c if turn["role"] == "assistant")
                             for c in CONVS)


def test_packing_is_first_fit():
    seq_len = 96
    rendered = [chat.render(c, TOK) for c in CONVS]
    # reference first-fit in plain Python
    free, rows = [], []
    for tokens, _ in rendered:
        need = len(tokens) - 1
        row = next((r for r, f in enumerate(free) if f >= need), None)
        if row is None:
            free.append(seq_len)
            row = len(free) - 1
        free[row] -= need
        rows.append(row)
    batch = pt.pack_conversations(rendered, seq_len, TOK.pad_id)
    assert len(batch["inputs"]) == len(free)
    np.testing.assert_array_equal((batch["segment_ids"] > 0).sum(1), seq_len - np.array(free))
    for r in range(len(free)):  # each row holds exactly the conversations first-fit put there, in order
        expect = [_key(*rendered[i]) for i in range(len(rendered)) if rows[i] == r]
        got = [_key(t, m) for t, m in _unpack({k: v[r:r + 1] for k, v in batch.items()})]
        assert got == expect


def test_sft_conversation_longer_than_context_names_file_line(tmp_path):
    path = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": _conv(1)}, "", {"messages": _conv(2, turns=3)}])
    length = len(chat.render(_conv(2, turns=3), TOK)[0])
    with pytest.raises(DataFormatError, match=f"sft.jsonl:3: conversation is {length} tokens.*seq_len 40"):
        pt.sft_examples(path, TOK, 40)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"msgs": []}', "missing field 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}', "empty content"),
])
def test_sft_errors_name_file_and_line(tmp_path, bad_line, message):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"messages": _conv(1)}, "", {"messages": _conv(2)}, bad_line])
    with pytest.raises(DataFormatError, match=rf"data\.jsonl:4: .*{message}"):
        pt.sft_examples(path, TOK, 128)


def test_ranking_examples_layout():
    records = [{"prompt": "Is 27 prime?", "responses": ["No, 3 divides it.", "No.", "Yes."]},
               {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is 13 prime?"}],
                "responses": ["Yes.", "No."]}]
    seq_len = 128
    ex = pt.ranking_examples(records, TOK, seq_len)
    assert ex["tokens"].shape == (2, 3, seq_len) and ex["valid"].shape == (2, 3, seq_len)
    assert ex["tokens"].dtype == np.int32 and ex["valid"].dtype == bool
    np.testing.assert_array_equal(ex["num_ranked"], [3, 2])
    for i, record in enumerate(records):
        prompt = chat.user_turn(record["prompt"]) if isinstance(record["prompt"], str) else record["prompt"]
        for k, response in enumerate(record["responses"]):
            want, _ = chat.render(prompt + [{"role": "assistant", "content": response}], TOK)
            n = ex["valid"][i, k].sum()
            np.testing.assert_array_equal(ex["tokens"][i, k, :n], want)
            assert ex["valid"][i, k, :n].all() and ex["tokens"][i, k, n - 1] == TOK.eos_id
            assert (ex["tokens"][i, k, n:] == TOK.pad_id).all()
    assert not ex["valid"][1, 2].any() and (ex["tokens"][1, 2] == TOK.pad_id).all()  # unused slot


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "responses": ["only one"]}, "has 1 responses; a ranking needs 2..9"),
    ({"prompt": "q", "responses": [str(i) for i in range(10)]}, "has 10 responses; a ranking needs 2..9"),
    ({"prompt": "q", "responses": ["a", "b", "a"]}, "responses 0 and 2 are identical"),
    ({"prompt": "q", "responses": ["a", " "]}, "response 1 is empty"),
    ({"prompt": "q", "responses": "ab"}, "must be a list of strings"),
    ({"responses": ["a", "b"]}, "missing field 'prompt'"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "responses": ["a", "b"]},
     "must end with a user turn"),
    # <|bos|><|user|> + 40 + <|end_of_turn|><|assistant|> + 30 + <|eos|> = 75 tokens
    ({"prompt": "q" * 40, "responses": ["a", "b" * 30]}, "prompt \\+ response 1 is 75 tokens > seq_len 64"),
])
def test_ranking_errors_name_file_and_line(tmp_path, record, message):
    path = _write_jsonl(tmp_path / "rank.jsonl", [{"prompt": "ok", "responses": ["a", "b"]}, record])
    with pytest.raises(DataFormatError, match=rf"rank\.jsonl:2: .*{message}"):
        pt.ranking_examples(path, TOK, 64)


def test_ranking_batches_fixed_shapes_and_padding():
    records = [{"prompt": f"q{i}", "responses": [f"r{j}" for j in range(2 + i % 4)]} for i in range(7)]
    batches = list(pt.ranking_batches(records, TOK, 32, 3, num_epochs=1, drop_remainder=False))
    assert [b["tokens"].shape for b in batches] == [(3, 5, 32)] * 3
    assert [b["num_ranked"].shape for b in batches] == [(3,)] * 3
    num_ranked = np.concatenate([b["num_ranked"] for b in batches])
    assert sorted(num_ranked[num_ranked > 0]) == sorted(2 + i % 4 for i in range(7))
    assert (num_ranked == 0).sum() == 2  # the two fill elements carry nothing
    assert len(list(pt.ranking_batches(records, TOK, 32, 3, num_epochs=1))) == 2  # drop_remainder


def test_packed_rankings_keep_every_ranking_whole_and_in_order():
    sizes = [2, 6, 3, 2, 5, 4, 2, 3, 2, 2]
    records = [{"prompt": f"q{i}", "responses": [f"answer {i}.{j}" for j in range(n)]} for i, n in enumerate(sizes)]
    plain = pt.ranking_examples(records, TOK, 32)
    packed = pt.pack_rankings(plain, TOK.pad_id)
    # best-fit decreasing into 6 slots: 6 | 5 | 4+2 | 3+3 | 2+2+2 | 2 (the last pair finds no room)
    assert sorted(sorted(np.bincount(g[g >= 0]).tolist()) for g in packed["group"]) == sorted(
        [[6], [5], [2, 4], [3, 3], [2, 2, 2], [2]])
    assert packed["tokens"].shape == (6, 6, 32) and packed["num_ranked"].tolist() == [
        int((g >= 0).sum()) for g in packed["group"]]
    texts = collections.Counter()
    for e in range(len(packed["group"])):
        for g in set(packed["group"][e][packed["group"][e] >= 0].tolist()):
            slots = np.flatnonzero(packed["group"][e] == g)
            assert np.all(np.diff(slots) == 1)  # a ranking's answers are adjacent, best first
            texts[tuple(TOK.decode(packed["tokens"][e, k][packed["valid"][e, k]].tolist()) for k in slots)] += 1
        unused = packed["group"][e] < 0
        assert not packed["valid"][e][unused].any() and np.all(packed["tokens"][e][unused] == TOK.pad_id)
    want = collections.Counter(tuple(TOK.decode(plain["tokens"][i, k][plain["valid"][i, k]].tolist())
                                     for k in range(n)) for i, n in enumerate(sizes))
    assert texts == want
    batches = list(pt.ranking_batches(records, TOK, 32, 4, num_epochs=1, drop_remainder=False, pack=True))
    assert [b["group"].shape for b in batches] == [(4, 6)] * 2
    assert np.all(batches[-1]["group"][2:] == -1) and np.all(batches[-1]["num_ranked"][2:] == 0)


def test_batch_iterator_is_seeded_covers_epochs_and_resumes():
    records = [{"messages": c} for c in CONVS]

    def take(it, n):
        return [next(it) for _ in range(n)]

    a = take(pt.sft_batches(records, TOK, 128, 2, seed=3), 12)
    b = take(pt.sft_batches(records, TOK, 128, 2, seed=3), 12)
    c = take(pt.sft_batches(records, TOK, 128, 2, seed=4), 12)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))
    # one epoch without dropping covers every conversation exactly once
    epoch = list(pt.sft_batches(records, TOK, 128, 2, seed=3, num_epochs=1, drop_remainder=False))
    merged = {k: np.concatenate([e[k] for e in epoch]) for k in epoch[0]}
    assert collections.Counter(_key(t, m) for t, m in _unpack(merged)) == collections.Counter(
        _key(*chat.render(c, TOK)) for c in CONVS)
    # exact resume from a saved state, across an epoch boundary
    it = pt.sft_batches(records, TOK, 128, 2, seed=3)
    take(it, 5)
    state = it.get_state()
    rest = take(it, 7)
    resumed = pt.sft_batches(records, TOK, 128, 2, seed=3)
    resumed.set_state(state)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(rest, take(resumed, 7)))
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a[5:], rest))


def test_prompts_and_left_pad(tmp_path):
    path = _write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Is 27 prime?", "meta": {"number": 27}},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "Is 2 prime?"}]}])
    prompts = pt.prompt_examples(path, TOK, 64)
    np.testing.assert_array_equal(prompts[0], chat.render_prompt(chat.user_turn("Is 27 prime?"), TOK))
    assert all(p[-1] == TOK.special_id("<|assistant|>") for p in prompts)
    tokens_BT, valid_BT = left_pad(prompts, TOK.pad_id)
    assert tokens_BT.shape == (2, max(map(len, prompts)))
    for b, p in enumerate(prompts):
        np.testing.assert_array_equal(tokens_BT[b, valid_BT[b]], p)
        assert valid_BT[b, -1] and valid_BT[b].sum() == len(p)
    # <|bos|><|user|> "Is 27 prime?" <|end_of_turn|><|assistant|>: 2 + 12 + 2 tokens
    with pytest.raises(DataFormatError, match=r"prompts\.jsonl:1: prompt is 16 tokens > max_prompt_len 10"):
        pt.prompt_examples(path, TOK, 10)


def test_tfds_array_record_round_trip_keeps_file_lines(tmp_path):
    train = _write_jsonl(tmp_path / "sft_train.jsonl", [{"messages": c} for c in CONVS])
    evals = _write_jsonl(tmp_path / "sft_eval.jsonl", [{"messages": c} for c in CONVS[:5]])
    splits = pt.build_tfds("sft", {"train": train, "eval": evals}, tmp_path / "tfds")
    assert len(splits["train"]) == len(CONVS) and len(splits["eval"]) == 5
    from_tfds = pt.sft_examples(splits["train"], TOK, 128)
    from_file = pt.sft_examples(train, TOK, 128)
    assert all(np.array_equal(from_tfds[k], from_file[k]) for k in from_file)
    # a length error found only at read time still names the original file and line
    with pytest.raises(DataFormatError, match=r"sft_train\.jsonl:3: conversation is"):
        pt.sft_examples(splits["train"], TOK, len(chat.render(CONVS[2], TOK)[0]) - 2)
    # schema errors fail the build, naming the line
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "responses": ["a", "b"]},
                                                 {"prompt": "q", "responses": ["a", "a"]}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: responses 0 and 1 are identical"):
        pt.build_tfds("rankings", {"train": bad}, tmp_path / "tfds")


@pytest.mark.parametrize("process_count", [2, 4])
def test_sft_and_ranking_batches_split_the_global_batch_across_processes(process_count):
    """Each process yields its own rows of the same global batch; together they are the one-process batch."""
    convs = [{"messages": c} for c in CONVS]
    rankings = [{"prompt": f"q{i}", "responses": [f"r{j}" for j in range(2 + i % 4)]} for i in range(13)]
    for make, source, kwargs in ((pt.sft_batches, convs, {"seed": 3}),
                                 (pt.ranking_batches, rankings, {"seed": 1, "num_epochs": 1,
                                                                 "drop_remainder": False})):
        whole = list(itertools.islice(make(source, TOK, 128, 4, process_index=0, process_count=1, **kwargs), 6))
        parts = [list(itertools.islice(make(source, TOK, 128, 4, process_index=p, process_count=process_count,
                                            **kwargs), 6)) for p in range(process_count)]
        assert all(len(x) == len(whole) for x in parts)
        for i, batch in enumerate(whole):
            for key, value in batch.items():
                local = [part[i][key] for part in parts]
                assert all(len(v) == 4 // process_count for v in local)
                np.testing.assert_array_equal(np.concatenate(local), value)
    with pytest.raises(ValueError, match="not divisible by the number of processes \\(3\\)"):
        pt.sft_batches(convs, TOK, 128, 4, process_index=0, process_count=3)
