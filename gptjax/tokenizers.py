"""Tokenizers behind one interface: UTF-8 bytes, exact GPT-2 BPE (tiktoken, local file), SentencePiece.

Every tokenizer maps text to ids in [0, vocab_size) and back, with the same seven special tokens
(`SPECIAL_TOKENS`: PAD, BOS, EOS and the chat roles). Specials are reachable only through `special_id`: `encode`
treats text such as "<|user|>" as plain characters, so user text can never forge a role marker.

  bytes          ids 0..255 are UTF-8 bytes, the specials follow at 256..262 (vocab 263). Any language.
  gpt2           GPT-2's byte-level BPE, bit-exact ("Hello world" -> [15496, 995]), from a local `gpt2.tiktoken`
                 (`python -m gptjax.assets fetch gpt2_bpe`). EOS is GPT-2's own <|endoftext|> = 50256 so GPT-2
                 checkpoints keep working; the other specials are new ids 50257..50262 (vocab 50263).
  sentencepiece  a trained `.model` (see `train_sentencepiece`); the specials are appended after the
                 SentencePiece vocabulary (ids n..n+6 for an n-piece model), which works for any .model and keeps
                 SentencePiece's own <unk>/<s>/</s> out of the way.

Decoding turns ids into bytes and then UTF-8 text with errors="replace", so a sequence cut inside a multi-byte
character (a sampled prefix, a truncated rollout) decodes to U+FFFD instead of raising. `StreamDecoder` does the
same incrementally for streaming chat output.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from gptjax import assets

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>")
TOKENIZER_KINDS = ("bytes", "gpt2", "sentencepiece")

# GPT-2's pre-tokenisation regex as tiktoken writes it (r50k_pat_str): equivalent to the original release's
# r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", but with possessive quantifiers.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_NUM_RANKS = 50256  # mergeable BPE tokens; 50256 itself is <|endoftext|>
GPT2_ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
    """Base class: subclasses define `_token_bytes` (ids of non-special tokens -> bytes) and `encode`.

    Attributes:
      name: the tokenizer kind ("bytes", "gpt2", "sentencepiece").
      vocab_size: ids are in [0, vocab_size), specials included.
      pad_id, bos_id, eos_id: distinct special ids.
      special_ids: SPECIAL_TOKENS -> id (plus any aliases, e.g. GPT-2's "<|endoftext|>").
    """

    name: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    # Set when the underlying model prepends a space to the text (SentencePiece's add_dummy_prefix); decoding then
    # drops one space at the start of the text, as SentencePiece's own decoder does.
    _drops_leading_space: bool = False

    def _init_specials(self, special_ids: dict[str, int], display: dict[int, str] | None = None) -> None:
        missing = [t for t in SPECIAL_TOKENS if t not in special_ids]
        assert not missing, f"{type(self).__name__} lacks specials {missing}"
        self.special_ids = dict(special_ids)
        self.pad_id = special_ids["<|pad|>"]
        self.bos_id = special_ids["<|bos|>"]
        self.eos_id = special_ids["<|eos|>"]
        ids = [special_ids[t] for t in SPECIAL_TOKENS]
        assert len(set(ids)) == len(ids), f"special ids are not distinct: {ids}"
        # How decode(skip_special=False) renders each special id.
        self._special_text = {i: t for t, i in special_ids.items() if t in SPECIAL_TOKENS}
        self._special_text.update(display or {})

    def special_id(self, token: str) -> int:
        """The id of a special token, e.g. special_id("<|assistant|>")."""
        if token not in self.special_ids:
            raise ValueError(f"unknown special token {token!r}; valid: {', '.join(self.special_ids)}")
        return self.special_ids[token]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_text

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; never produces special ids."""
        raise NotImplementedError

    def _token_bytes(self, ids: list[int]) -> bytes:
        """Bytes of a run of non-special ids (already range-checked)."""
        raise NotImplementedError

    def _check_text(self, text) -> str:
        if not isinstance(text, str):
            raise TypeError(f"{self.name} tokenizer: encode expects str, got {type(text).__name__}")
        return text

    def _check_ids(self, ids) -> list[int]:
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"{self.name} tokenizer: decode expects a 1-D sequence of integer ids, got shape {arr.shape} "
                f"dtype {arr.dtype}; decode a batch row by row"
            )
        out = arr.astype(np.int64).tolist()
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.name} tokenizer: ids {bad[:5]} outside [0, {self.vocab_size})")
        return out

    def decode(self, ids, skip_special: bool = True) -> str:
        """Ids -> text. Specials are dropped (skip_special) or written as their names; broken UTF-8 -> U+FFFD."""
        stream = StreamDecoder(self, skip_special=skip_special)
        return stream.feed(ids) + stream.flush()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        path = getattr(self, "path", None)
        return f"{type(self).__name__}(vocab_size={self.vocab_size}" + (f", path={path!r})" if path else ")")


class StreamDecoder:
    """Incremental decode for streaming output: feed ids as they are sampled, get the newly completed text.

    Bytes of a character split across tokens are held back until the character is complete, so concatenating
    every `feed` result and the final `flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def feed(self, ids) -> str:
        """Consumes one id or a sequence of ids; returns the text they complete (possibly "")."""
        tok = self.tokenizer
        out, run = [], []
        for i in tok._check_ids(ids):
            if tok.is_special(i):
                out.append(self._text(tok._token_bytes(run), final=True))
                run = []
                if not self.skip_special:
                    out.append(tok._special_text[i])
            else:
                run.append(i)
        out.append(self._text(tok._token_bytes(run), final=False))
        return "".join(out)

    def flush(self) -> str:
        """Ends the stream: returns any held-back partial character as U+FFFD."""
        return self._text(b"", final=True)

    def _text(self, data: bytes, final: bool) -> str:
        if data and self._at_start:
            self._at_start = False
            if self.tokenizer._drops_leading_space and data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data, final=final)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then SPECIAL_TOKENS at 256..262."""

    name = "bytes"
    path = None

    def __init__(self):
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self._init_specials({t: 256 + k for k, t in enumerate(SPECIAL_TOKENS)})

    def encode(self, text: str) -> list[int]:
        return list(self._check_text(text).encode("utf-8"))

    def _token_bytes(self, ids: list[int]) -> bytes:
        return bytes(ids)


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parses a `.tiktoken` file ("base64(token) rank" per line).

    tiktoken.load.load_tiktoken_bpe would do this too, but it first copies even a local file into a temp cache
    keyed by the path string and later serves that copy without checking it, so a replaced file could be ignored.
    """
    import base64

    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except Exception as e:
                raise ValueError(f"{path}:{lineno}: not a tiktoken BPE line ('base64 rank'): {line[:60]!r}") from e
    return ranks


class TiktokenBPE(Tokenizer):
    """GPT-2's byte-level BPE via tiktoken, from a local gpt2.tiktoken file (no network, ever).

    Ids: 0..50255 BPE tokens, 50256 <|endoftext|> (= EOS, as in GPT-2), then <|pad|>, <|bos|>, <|system|>,
    <|user|>, <|assistant|>, <|end_of_turn|> at 50257..50262.
    """

    name = "gpt2"

    def __init__(self, path: str):
        import tiktoken

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise assets.AssetMissingError(
                f"GPT-2 BPE file {self.path} not found. Fetch it once (needs network access to PyPI):\n"
                f"    {assets.FETCH_COMMAND} gpt2_bpe\n"
                f"and pass path=None to use the cached copy, or point path at another copy of gpt2.tiktoken"
            )
        ranks = _read_tiktoken_ranks(self.path)
        if sorted(ranks.values()) != list(range(GPT2_NUM_RANKS)) or any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError(
                f"{self.path} is not GPT-2's BPE: expected ranks 0..{GPT2_NUM_RANKS - 1} covering all 256 bytes, "
                f"got {len(ranks)} ranks. Use the file from `{assets.FETCH_COMMAND} gpt2_bpe`"
            )
        new = [t for t in SPECIAL_TOKENS if t != "<|eos|>"]
        special_ids = {"<|eos|>": GPT2_NUM_RANKS, **{t: GPT2_NUM_RANKS + 1 + k for k, t in enumerate(new)}}
        self.vocab_size = GPT2_NUM_RANKS + len(SPECIAL_TOKENS)
        # Built directly from the ranks (not tiktoken.get_encoding) so tiktoken never reaches for the network.
        self._enc = tiktoken.Encoding(
            name="gpt2_gptjax",
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={GPT2_ENDOFTEXT: GPT2_NUM_RANKS, **{t: special_ids[t] for t in new}},
        )
        self._init_specials({**special_ids, GPT2_ENDOFTEXT: GPT2_NUM_RANKS}, display={GPT2_NUM_RANKS: GPT2_ENDOFTEXT})

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(self._check_text(text))

    def _token_bytes(self, ids: list[int]) -> bytes:
        return self._enc.decode_bytes(ids)

    # tiktoken's Encoding holds a Rust object: pickle (e.g. for grain worker processes) by path instead.
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model; SPECIAL_TOKENS take ids n..n+6 after its n pieces.

    Models from `train_sentencepiece` round-trip any text exactly (identity normalisation, no dummy prefix, byte
    fallback). Other .model files load too; their normalisation (e.g. NFKC) may change text on the way in.
    """

    name = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"SentencePiece model {self.path} not found; train one on local text with "
                f"gptjax.tokenizers.train_sentencepiece(files, vocab_size, model_prefix) (writes <model_prefix>.model)"
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except Exception as e:
            raise ValueError(f"{self.path} is not a SentencePiece model: {e}") from e
        self.long_numbers = _read_number_options(self.path)
        n = self._sp.get_piece_size()
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self._init_specials({t: n + k for k, t in enumerate(SPECIAL_TOKENS)})
        # Bytes per piece, so decoding (and streaming) can work byte-wise like the other tokenizers.
        self._piece_bytes = [self._bytes_of_piece(i) for i in range(n)]
        probe = self._sp.encode("a", out_type=str)
        self._drops_leading_space = bool(probe) and probe[0].startswith("\u2581")
        # Pieces that are a run of digits (the whole-number symbols), and the id of each single digit.
        digit_runs = {i: b for i, b in enumerate(self._piece_bytes) if b.isdigit() and not self._sp.is_byte(i)}
        self._digit_run_ids = frozenset(digit_runs)
        self._digit_id = {b.decode(): i for i, b in digit_runs.items() if len(b) == 1}
        if self.long_numbers == "digits" and len(self._digit_id) < 10:
            raise ValueError(f"{self.path}: long_numbers='digits' needs a piece for each digit 0-9; this model has "
                             f"{sorted(self._digit_id)}")

    def _bytes_of_piece(self, i: int) -> bytes:
        sp = self._sp
        if sp.is_control(i):  # <s>, </s>, <pad> of SentencePiece's own: no surface text
            return b""
        if sp.is_unknown(i):
            return "\ufffd".encode()
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            return bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(self._check_text(text))
        return self._spell_long_numbers(ids) if self.long_numbers == "digits" else ids

    def _spell_long_numbers(self, ids: list[int]) -> list[int]:
        """A number SentencePiece wrote as several whole-number pieces ("4738" -> "47" "38"), digit by digit."""
        out, run = [], []
        for i in ids + [-1]:
            if i in self._digit_run_ids:
                run.append(i)
                continue
            if len(run) > 1:
                out += [self._digit_id[ch] for ch in self._token_bytes(run).decode("ascii")]
            else:
                out += run
            run = []
            if i >= 0:
                out.append(i)
        return out

    def _token_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self._piece_bytes[i] for i in ids)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


LONG_NUMBERS = ("pieces", "digits")


def number_options_path(model_path: str) -> str:
    """The file beside a SentencePiece model that says how it spells long numbers (`train_sentencepiece`)."""
    return model_path + ".json"


def _read_number_options(model_path: str) -> str:
    """How numbers longer than a whole-number piece are spelled, from the JSON file beside the model (written by
    `train_sentencepiece`; no file: "pieces", SentencePiece's own greedy segmentation)."""
    options_path = number_options_path(model_path)
    if not os.path.isfile(options_path):
        return "pieces"
    try:
        with open(options_path, encoding="utf-8") as f:
            options = json.load(f)
    except ValueError as e:
        raise ValueError(f"{options_path}: not JSON ({e}); rewrite it as {{\"long_numbers\": \"digits\"}} or delete "
                         "it (the model then spells numbers as SentencePiece segments them)") from None
    long_numbers = options.get("long_numbers") if isinstance(options, dict) else None
    if long_numbers not in LONG_NUMBERS or set(options) != {"long_numbers"}:
        raise ValueError(f"{options_path}: expected {{\"long_numbers\": one of {LONG_NUMBERS}}}, got {options!r}; "
                         "rewrite it or delete it (the model then spells numbers as SentencePiece segments them)")
    return long_numbers


def _text_lines(source) -> Iterator[str]:
    """Lines of training text from a path, a list of paths, or an iterator of strings (see train_sentencepiece)."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if isinstance(source, Sequence):
        for path in source:
            if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
                raise FileNotFoundError(
                    f"train_sentencepiece: training file {path!r} not found (a list/tuple names files; to train on "
                    f"in-memory text pass an iterator of strings, e.g. iter(texts))"
                )
        for path in source:
            with open(path, "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = data[: e.start].count(b"\n") + 1
                raise ValueError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
            yield from text.splitlines()
    else:
        for k, text in enumerate(source):
            if not isinstance(text, str):
                raise TypeError(f"train_sentencepiece: item {k} of the text iterator is {type(text).__name__}, not str")
            yield from text.splitlines()


def train_sentencepiece(
    text_files_or_iterator: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    vocab_size: int,
    model_prefix: str | os.PathLike,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    split_digits: bool = True,
    whole_numbers: int = 0,
    long_numbers: str = "pieces",
    max_sentence_length: int = 16384,
    seed: int = 0,
    dummy_prefix: bool = False,
) -> str:
    """Trains a SentencePiece model on local text and returns the path of `<model_prefix>.model`.

    Args:
      text_files_or_iterator: a UTF-8 file, a list/tuple of files, or any other iterable of strings; each line is
        one training sentence.
      vocab_size: SentencePiece pieces, including its 256 byte pieces and <unk>; the tokenizer then has
        vocab_size + len(SPECIAL_TOKENS) ids. A soft limit: a small corpus may yield fewer pieces.
      model_type: "unigram" or "bpe".
      character_coverage: fraction of characters that get their own piece; the rest fall back to bytes.
      split_digits: one piece per digit, so numbers never seen in training still tokenise like seen ones.
      whole_numbers: if > 0, every integer 0..whole_numbers-1 (no leading zeros) is one piece of its own, matched
        greedily from the left, so a larger number reads as several such pieces ("4738" -> "47", "38" with 200),
        as GPT-4's tokenizer reads numbers in 1-3 digit chunks; overrides split_digits. For a corpus about a known
        range of numbers (the seed world): each number's facts attach to one symbol the model can copy whole.
      long_numbers: with whole_numbers, how a number of several such pieces is spelled: "pieces" (as above) or
        "digits" ("4738" -> "4" "7" "3" "8": its last digit is a token of its own, and none of its pieces reads as
        a number in range). Recorded in `<model>.json` beside the model, which SentencePieceTokenizer reads.
      max_sentence_length: longer lines (in bytes) are skipped by the trainer.
      seed: SentencePiece's random seed. Training is single-threaded and deterministic: the same text and
        arguments give a byte-identical model.
      dummy_prefix: every text (each training line, each encoded string) is read with one space before it, as
        Llama's tokenizer reads it, so a word opening a text is the same piece as inside one ("Sorry, …" ->
        " Sorry", not "S" + "orry"); decoding drops that space again. For text encoded piecewise, such as each chat
        turn on its own, whose words the corpus only holds after a space.

    The model round-trips any text exactly: identity normalisation (no NFKC: "？" stays full-width), no whitespace
    collapsing, no dummy prefix unless asked, byte fallback for characters outside the vocabulary. SentencePiece's own
    <s>/</s>/<pad> are disabled; gptjax's specials are appended after the pieces by SentencePieceTokenizer.
    """
    import sentencepiece as spm

    _check_training_args(model_type, vocab_size, whole_numbers, long_numbers)
    lines = [line for line in _text_lines(text_files_or_iterator) if line.strip()]
    if not lines:
        raise ValueError("train_sentencepiece: the training text is empty")
    prefix = os.fspath(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=prefix,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=split_digits and not whole_numbers,
        user_defined_symbols=[str(i) for i in range(whole_numbers)],
        max_sentence_length=max_sentence_length,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    if long_numbers != "pieces":
        with open(number_options_path(prefix + ".model"), "w", encoding="utf-8") as f:
            json.dump({"long_numbers": long_numbers}, f)
    return prefix + ".model"


def _check_training_args(model_type: str, vocab_size: int, whole_numbers: int, long_numbers: str) -> None:
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"train_sentencepiece: model_type {model_type!r} not in ('unigram', 'bpe')")
    if vocab_size <= 257 + whole_numbers:
        raise ValueError(f"train_sentencepiece: vocab_size {vocab_size} must exceed the 256 byte pieces + <unk>"
                         + (f" + {whole_numbers} whole numbers" if whole_numbers else ""))
    if whole_numbers < 0:
        raise ValueError(f"train_sentencepiece: whole_numbers must be >= 0, got {whole_numbers}")
    if long_numbers not in LONG_NUMBERS or (long_numbers == "digits" and whole_numbers < 10):
        raise ValueError(f"train_sentencepiece: long_numbers {long_numbers!r} must be one of {LONG_NUMBERS}, "
                         "and 'digits' needs whole_numbers >= 10")


def make_tokenizer(kind: str, path: str | os.PathLike | None = None) -> Tokenizer:
    """kind: "bytes" (no file), "gpt2" (path defaults to the fetched asset), "sentencepiece" (path required)."""
    if kind == "bytes":
        if path is not None:
            raise ValueError(f"the bytes tokenizer takes no file, got path={path!r}")
        return ByteTokenizer()
    if kind == "gpt2":
        return TiktokenBPE(assets.gpt2_bpe_path() if path is None else os.fspath(path))
    if kind == "sentencepiece":
        if path is None:
            raise ValueError("the sentencepiece tokenizer needs path=<file.model> (see train_sentencepiece)")
        return SentencePieceTokenizer(os.fspath(path))
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(TOKENIZER_KINDS)}")


def padded_vocab_size(tokenizer_or_int: Tokenizer | int, multiple: int = 128) -> int:
    """The model's vocabulary: the tokenizer's size rounded up to `multiple` (GPT-2: 50263 -> 50304)."""
    size = tokenizer_or_int.vocab_size if isinstance(tokenizer_or_int, Tokenizer) else tokenizer_or_int
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"padded_vocab_size: vocab size must be a positive int, got {size!r}")
    if not isinstance(multiple, (int, np.integer)) or multiple <= 0:
        raise ValueError(f"padded_vocab_size: multiple must be a positive int, got {multiple!r}")
    return -(-int(size) // multiple) * multiple
