"""Which of the repository's own files a stage script runs: its local imports, found with `ast`.

The Makefile lists, per stage, the script and every module it imports from stages/lib/
or model/ (directly or through another module), and a test compares that list with
`code_files()`. The training run's identity hashes the same files, so an edit to any
of them is both a rebuild for make and a new run for train.py, never only one of them.
A script that another one starts as a process (evaluate.py times generate.py) counts
as code of the starting stage too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
STAGES_DIR = REPO_ROOT / "stages"
# Where `import x` finds local code: the script's folder (python puts it first on sys.path)
# and the repository root (lib/__init__.py adds it, for `model`).
SEARCH_ROOTS = (STAGES_DIR, REPO_ROOT)


def _module_file(dotted: str) -> Path | None:
    parts = dotted.split(".")
    for root in SEARCH_ROOTS:
        base = root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _imported_modules(tree: ast.AST, path: Path) -> set[str]:
    """Dotted names of everything the file imports, including `from package import submodule`."""
    package = ".".join(path.relative_to(STAGES_DIR if STAGES_DIR in path.parents else REPO_ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _with_parent_packages(dotted: str) -> list[str]:
    """Importing lib.runtime.config also runs lib/__init__.py."""
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def scripts_started_by(script: Path) -> list[Path]:
    """Other stage scripts this one runs as a process: a string literal that is exactly 'NAME.py'."""
    tree = ast.parse(Path(script).read_text(encoding="utf-8"))
    found = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return sorted(STAGES_DIR / name for name in found
                  if name.endswith(".py") and "/" not in name and (STAGES_DIR / name).is_file()
                  and STAGES_DIR / name != Path(script).resolve())


def local_imports(script: Path) -> list[Path]:
    """Every local module the file imports, directly or through another local module."""
    script = Path(script).resolve()
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for dotted in _imported_modules(tree, path):
            for name in _with_parent_packages(dotted):
                found = _module_file(name)
                if found is not None and found not in seen and found != script:
                    seen.add(found)
                    todo.append(found)
    return sorted(seen)


def code_files(script: Path) -> list[Path]:
    """The script, its local imports, and the same for every stage script it starts."""
    files = {Path(script).resolve(), *local_imports(script)}
    for other in scripts_started_by(script):
        files.update([other, *local_imports(other)])
    return sorted(files)
