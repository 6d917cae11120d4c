"""The code's layout keeps its promises: one script per make target, shared code in modules, the
docs name functions that exist (in the pytest process; the Makefile's code lists: tests/test_layout.py).

A stage script is a file in stages/ with an `if __name__ == "__main__":` block; the shared
modules in stages/lib/ and model/ have none.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from unit.conftest import REPO
from lib.runtime.code_files import code_files, local_imports

SCRIPTS = sorted((REPO / "stages").glob("*.py"))
MODULES = sorted((REPO / "stages" / "lib").rglob("*.py")) + sorted((REPO / "model").glob("*.py"))
# The stages whose outputs are files make tracks (the others always run).
FILE_STAGES = {"download.py", "prepare.py", "train_tokenizer.py", "encode.py", "train.py", "evaluate.py", "export.py"}


def has_main_block(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
               for node in tree.body)


def relative(paths) -> set[str]:
    return {str(Path(p).relative_to(REPO)) for p in paths}


def test_stages_holds_scripts_and_lib_holds_modules():
    assert {p.name for p in SCRIPTS} >= FILE_STAGES | {"check.py", "generate.py", "list_runs.py", "bench.py", "sweep.py"}
    for script in SCRIPTS:
        assert has_main_block(script), f"{script.name} in stages/ is not a script (no __main__ block)"
    for module in MODULES:
        assert not has_main_block(module), f"{module.relative_to(REPO)} is a shared module and must not be a script"


def test_no_stage_script_imports_another():
    for script in SCRIPTS:
        imported_scripts = [p for p in local_imports(script) if p.parent == REPO / "stages"]
        assert not imported_scripts, f"{script.name} imports the stage script(s) {relative(imported_scripts)}"


def test_local_imports_are_found_through_other_modules():
    train = relative(code_files(REPO / "stages" / "train.py"))
    # train.py imports lib.training.runs, which imports lib.training.checkpoints, which imports model lazily
    assert {"stages/lib/training/runs.py", "stages/lib/training/checkpoints.py", "model/tiny_transformer.py", "stages/lib/__init__.py"} <= train
    prepare = relative(code_files(REPO / "stages" / "prepare.py"))
    assert not any(p.startswith("model/") for p in prepare), "prepare.py does not use the model"
    assert "stages/generate.py" in relative(code_files(REPO / "stages" / "evaluate.py")), "evaluate.py runs generate.py"


# `name` in `path.py`, `name` of `path.py`, `name()` in `path.py`, `Class.method` in `path.py`
NAMED_IN_FILE = re.compile(r"`(?P<name>[A-Za-z_][\w.]*)(?:\(\))?`\s+(?:in|of|from)\s+`(?P<file>[\w/.-]+\.py)`")


def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes, their methods (Class.method) and module-level constants."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(f"{node.name}.{item.name}" for item in node.body
                             if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_functions_named_in_the_docs_exist_in_the_file_named():
    references = 0
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for match in NAMED_IN_FILE.finditer(text):
            path = REPO / match["file"]
            assert path.is_file(), f"{doc.name} names {match['file']}, which does not exist"
            assert match["name"] in defined_names(path), f"{doc.name} says `{match['name']}` is in {match['file']}; it is not"
            references += 1
    assert references >= 5, "the docs name functions with their files; the pattern found too few"
