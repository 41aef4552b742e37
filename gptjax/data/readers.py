"""Streaming readers of local corpus files: documents as ``(id, text)``, never a whole file in memory.

Formats, by file name: ``.txt``, ``.jsonl``, either one compressed as ``.gz`` (gzip) or ``.zst`` (Zstandard, the
``zstandard`` package), and ``.parquet`` (the ``pyarrow`` package, optional). Files are read in 1 MiB chunks and
cut into lines; a ``.jsonl`` line (or a parquet row) is one document, a ``.txt`` file is one document or, with
paragraphs, one per blank-line separated paragraph. Document ids are the path relative to the corpus root plus
``:<line>`` (jsonl, 1-based; parquet: ``:<row>``, 1-based) or ``#<paragraph>`` (0-based): the split by id hash in
``gptjax/data/builders.py`` rests on them, so they do not depend on how many processes read the corpus.

Only the standard library (plus zstandard/pyarrow when such files are read) is imported here: the parallel
shard writers (``gptjax/data/shards.py``) run this code in light worker processes.
"""

from __future__ import annotations

import importlib
import json
import re
import zlib
from pathlib import Path
from typing import Iterator

from gptjax.errors import DataError

try:  # ISA-L's inflate: the same output as zlib's, ~2.5x faster (the largest cost of reading .gz files)
    from isal import isal_zlib as _inflate
except ImportError:
    _inflate = zlib

CHUNK_BYTES = 1 << 20
_MAX_INFLATE = 8 * CHUNK_BYTES  # decompressed bytes per step: a highly compressible file cannot flood memory
COMPRESSIONS = (".gz", ".zst")
BASE_SUFFIXES = (".txt", ".jsonl")
SUFFIXES = BASE_SUFFIXES + tuple(b + c for b in BASE_SUFFIXES for c in COMPRESSIONS) + (".parquet",)
_BLANK = re.compile(rb"[ \t]*\r?")




def kind_of(path: Path | str) -> str | None:
    """'txt', 'jsonl' or 'parquet' for a supported file name (compression suffixes allowed), else None."""
    name = str(path).lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix.split(".")[1]
    return None


def _optional_module(name: str, path: Path, extra: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f"{path}: reading this file needs the {name} package: pip install {name} "
                        f"(or gptjax[{extra}]), or exclude the file from data.paths") from None


# ----------------------------------------------------------------------------------------------- bytes

def _gzip_chunks(path: Path, f) -> Iterator[bytes]:
    inflater = _inflate.decompressobj(wbits=47)  # 32 + 15: a gzip (or zlib) header, any window size
    member_started = False  # the current member got input: at the end of the file it must be complete
    try:
        while data := f.read(CHUNK_BYTES):
            while data:
                member_started = True
                out = inflater.decompress(data, _MAX_INFLATE)
                if out:
                    yield out
                if not inflater.eof:
                    data = inflater.unconsumed_tail
                    continue
                # A concatenated (multi-member) gzip file goes on with the next member; zero padding ends it.
                data, inflater, member_started = inflater.unused_data, _inflate.decompressobj(wbits=47), False
                if not data.strip(b"\0"):
                    data = b""
        if member_started and not inflater.eof:
            raise DataError(f"{path}: the gzip stream is truncated (an interrupted download or copy?); "
                            f"fetch it again or exclude it from data.paths")
    except (zlib.error, _inflate.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); re-compress it or exclude it from data.paths") from None


def iter_bytes(path: Path) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks of about 1 MiB."""
    name = str(path).lower()
    with open(path, "rb") as f:
        if name.endswith(".gz"):
            yield from _gzip_chunks(path, f)
        elif name.endswith(".zst"):
            zstandard = _optional_module("zstandard", path, "zstd")
            try:
                reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
                while chunk := reader.read(CHUNK_BYTES):
                    yield chunk
            except zstandard.ZstdError as e:
                raise DataError(f"{path}: not a valid Zstandard file ({e}); re-compress it or exclude it") from None
        else:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk


def iter_lines(path: Path) -> Iterator[bytes]:
    """Lines (without the ``\\n``) of the decompressed file; a final line needs no newline."""
    pending: list[bytes] = []
    for chunk in iter_bytes(path):
        newline = chunk.find(b"\n")
        if newline < 0:
            pending.append(chunk)
            continue
        pending.append(chunk[:newline])
        yield b"".join(pending)
        lines = chunk[newline + 1:].split(b"\n")
        last = lines.pop()
        yield from lines
        pending = [last] if last else []
    if pending:
        yield b"".join(pending)


def _utf8(path: Path, data: bytes, lineno: int | None = None) -> str:
    try:
        return data.decode("utf-8-sig" if lineno in (None, 1) else "utf-8")
    except UnicodeDecodeError as e:
        where = f"line {lineno}, " if lineno is not None else ""
        raise DataError(f"{path}: not valid UTF-8 ({where}byte {e.start}: {data[e.start:e.start + 1]!r}); convert "
                        f"it, e.g. `iconv -f latin1 -t utf-8`, or exclude it from data.paths") from None


def _empty(path: Path, what: str = "no text") -> DataError:
    return DataError(f"{path}: empty file ({what}); remove it or exclude it from data.paths")


# ----------------------------------------------------------------------------------------------- documents

def whole_file(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    """The file as one document (its text as it is)."""
    text = _utf8(path, b"".join(iter_bytes(path)))
    if not text.strip():
        raise _empty(path)
    yield rel, text


def paragraphs(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    """One document per blank-line separated paragraph (stripped; ``\\r\\n`` read as ``\\n``)."""
    lines: list[str] = []
    count = 0
    for lineno, raw in enumerate(iter_lines(path), start=1):
        if _BLANK.fullmatch(raw):
            text = "\n".join(lines).strip()
            if text:
                yield f"{rel}#{count}", text
                count += 1
            lines = []
            continue
        lines.append(_utf8(path, raw[:-1] if raw.endswith(b"\r") else raw, lineno))
    text = "\n".join(lines).strip()
    if text:
        yield f"{rel}#{count}", text
        count += 1
    if count == 0:
        raise _empty(path)


def _check_record(path: Path, lineno: int, record, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}:{lineno}: no field {text_field!r} (found {keys}); "
                        f"set data.text_field to the field holding the text")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text


def jsonl(path: Path, rel: str, text_field: str) -> Iterator[tuple[str, str]]:
    """One document per non-blank line of a JSON-lines file; errors name file:line."""
    count = 0
    for lineno, raw in enumerate(iter_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            _utf8(path, raw, lineno)
            raise
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        count += 1
        yield f"{rel}:{lineno}", _check_record(path, lineno, record, text_field)
    if count == 0:
        raise _empty(path, "no JSON records")


def parquet(path: Path, rel: str, text_field: str) -> Iterator[tuple[str, str]]:
    """One document per row of a parquet file's ``text_field`` column, read in record batches."""
    pq = _optional_module("pyarrow.parquet", path, "parquet")
    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid etc.
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = reader.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (found {names}); set data.text_field")
    row = 0
    for batch in reader.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row}: column {text_field!r} is {type(text).__name__}, "
                                f"expected a string")
            yield f"{rel}:{row}", text
    if row == 0:
        raise _empty(path, "no rows")


def file_documents(path: Path, rel: str, *, text_field: str = "text",
                   split_paragraphs: bool = False) -> Iterator[tuple[str, str]]:
    """(id, text) of every document of one corpus file, by its kind."""
    kind = kind_of(path)
    if kind == "jsonl":
        return jsonl(path, rel, text_field)
    if kind == "parquet":
        return parquet(path, rel, text_field)
    if kind == "txt":
        return paragraphs(path, rel) if split_paragraphs else whole_file(path, rel)
    raise DataError(f"{path}: unsupported file type; use one of {SUFFIXES}")
