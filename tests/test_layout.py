"""The layout's rules, measured on the source with ``ast``: sizes, and which part of the package may import which.

Sizes: no Python file over 600 lines, no function over 80 (counted from its ``def`` line to its last line,
decorators excluded), no absl ``main`` in experiments/ over 60; over gptjax/, experiments/, configs/, tests/ and
scripts/. Imports (every import statement, function-level ones included): the library's layers point one way,
experiments -> tools | seed_world -> stages -> train -> core (the top-level modules and gptjax/data); the shared
training code imports no stage; gptjax/data imports neither the model, the trainer nor the stages; nothing in
gptjax/ imports experiments/ or configs/.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("gptjax", "experiments", "configs", "tests", "scripts")
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_MAIN_LINES = 600, 80, 60

# What each part of the package may not import (module-name prefixes).
FORBIDDEN = {
    "gptjax/data/": ("gptjax.model", "gptjax.train", "gptjax.stages", "gptjax.tools", "gptjax.seed_world",
                     "gptjax.sampling"),
    "gptjax/train/": ("gptjax.stages", "gptjax.tools", "gptjax.seed_world"),
    "gptjax/stages/": ("gptjax.tools", "gptjax.seed_world"),
    "gptjax/tools/": ("gptjax.seed_world",),
    "gptjax/seed_world/": ("gptjax.tools",),
    "gptjax/": ("experiments", "configs"),
}
CORE = ("gptjax.train", "gptjax.stages", "gptjax.tools", "gptjax.seed_world")  # what a top-level module may not import


def python_files():
    for root in ROOTS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, root)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, REPO), path


def parsed():
    for rel, path in python_files():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        yield rel, source, ast.parse(source, filename=rel)


def imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Every module an import statement of ``tree`` names (relative imports resolved against ``package``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_file_and_function_sizes():
    offenders = []
    for rel, source, tree in parsed():
        lines = len(source.splitlines())
        if lines > MAX_FILE_LINES:
            offenders.append(f"{rel}: {lines} lines (file limit {MAX_FILE_LINES})")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                limit = MAX_MAIN_LINES if rel.startswith("experiments/") and node.name == "main" else MAX_FUNCTION_LINES
                if size > limit:
                    offenders.append(f"{rel}:{node.lineno}: {node.name} is {size} lines (limit {limit})")
    assert not offenders, "too big:\n" + "\n".join(offenders)


def _forbidden_imports(rel: str, tree: ast.AST) -> list[str]:
    module = rel[:-3].replace("/", ".").removesuffix(".__init__")
    package = module if rel.endswith("__init__.py") else module.rsplit(".", 1)[0]
    names = imported_modules(tree, package)
    rules = [bad for prefix, bad in FORBIDDEN.items() if rel.startswith(prefix)]
    if rel.startswith("gptjax/") and rel.count("/") == 1:  # a top-level (core) module
        rules.append(CORE)
    return sorted(f"{rel} imports {n}" for n in names for bad in rules for b in bad
                  if n == b or n.startswith(b + "."))


def test_import_directions():
    offenders = [line for rel, _, tree in parsed() if rel.startswith("gptjax/")
                 for line in _forbidden_imports(rel, tree)]
    assert not offenders, "imports against the layering:\n" + "\n".join(offenders)


def test_the_training_loop_imports_no_stage():
    offenders = []
    for rel, _, tree in parsed():
        if rel in ("gptjax/train/loop.py", "gptjax/train/run.py"):
            offenders += [n for n in imported_modules(tree, "gptjax.train") if n.startswith("gptjax.stages")]
    assert not offenders


@pytest.mark.parametrize("rel, source, expected", [
    ("gptjax/train/x.py", "from gptjax.stages import pretrain\n",
     ["gptjax/train/x.py imports gptjax.stages", "gptjax/train/x.py imports gptjax.stages.pretrain"]),
    ("gptjax/train/x.py", "def f():\n    from gptjax import model\n", []),
    ("gptjax/data/x.py", "def f():\n    import gptjax.train.loop\n", ["gptjax/data/x.py imports gptjax.train.loop"]),
    ("gptjax/data/x.py", "from .. import model\n", ["gptjax/data/x.py imports gptjax.model"]),
])
def test_the_import_scan_sees_nested_relative_and_from_imports(rel, source, expected):
    """The scan itself: from-imports name their module and its members; function-level and relative imports count."""
    assert _forbidden_imports(rel, ast.parse(source)) == expected
