"""The docs cite code that exists: every file, function, class or key a page names in backticks is there.

A restructure that moves or renames code fails here, naming the page and the citation, instead of
leaving a page that points at nothing. (`name` in `file.py` pairs are checked more strictly, the name
inside that very file, in test_layout.py.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE = sorted([*(REPO / "stages").rglob("*.py"), *(REPO / "model").rglob("*.py"), REPO / "docs" / "cog_figures.py"])
# Names of other projects the pages cite on purpose (PyTorch, Hugging Face): not ours to define.
EXTERNAL = {"GPT2LMHeadModel", "GPTNeoXForCausalLM", "DistributedDataParallel", "clip_grad_norm_", "bernoulli_",
            "scaled_dot_product_attention", "cross_entropy", "AdamW", "eval", "train", "backward", "step", "zero_grad",
            "AddmmBackward0"}
EXTERNAL_PREFIXES = ("torch.", "F.", "nn.", "np.", "model.", "optimizer.")
PATH = re.compile(r"((?:stages|model|tests|docs|config|\.ci|lib)/[\w./-]*|[\w-]+\.(?:py|yaml))(?:[:#].*)?")
CALL = re.compile(r"(?:[\w.]+\.)?([A-Za-z_]\w*)\(\)")
# An identifier a reader would search the code for: snake_case with an underscore, or CamelCase.
IDENTIFIER = re.compile(r"[A-Za-z_][\w.]*")


def code_names() -> set[str]:
    """Functions, classes, methods, and the string keys the code writes (history.json's, a checkpoint's)."""
    names = set()
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and IDENTIFIER.fullmatch(node.value):
                names.add(node.value)
    config = yaml.safe_load((REPO / "config" / "defaults.yaml").read_text(encoding="utf-8"))
    return names | set(config) | {key for section in config.values() if isinstance(section, dict) for key in section}


def citations(page: Path):
    text = re.sub(r"<!--.*?-->", "", page.read_text(encoding="utf-8"), flags=re.S)  # cog's code, not prose
    for match in re.finditer(r"`([^`\n]+)`", text):
        yield match.group(1).strip()


def path_exists(path: str) -> bool:
    return any(p.exists() for p in (REPO / path, REPO / "stages" / path)) or any(REPO.glob(f"**/{path}"))


def stale_citations(pages=PAGES) -> list[str]:
    names, stale = code_names(), []
    for page in pages:
        for cited in citations(page):
            if path := PATH.fullmatch(cited):
                if not path_exists(path.group(1)):
                    stale.append(f"{page.name}: `{cited}` (no such file)")
                continue
            call = CALL.fullmatch(cited)
            name = call.group(1) if call else cited
            looks_like_code = call or (IDENTIFIER.fullmatch(cited) and ("_" in cited or re.search(r"[a-z][A-Z]", cited))
                                       and not cited.isupper())
            if not looks_like_code or cited.startswith(EXTERNAL_PREFIXES) or re.search(r"\.(pt|json|md|png)$", cited):
                continue
            if name.split(".")[-1] not in names | EXTERNAL:
                stale.append(f"{page.name}: `{cited}` (defined nowhere in stages/, model/ or the config)")
    return stale


def test_every_cited_file_function_and_class_exists():
    assert stale_citations() == []


def test_a_renamed_function_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("The step is `train_epoch()` in `stages/train.py`; attention is `_CausalAttention` and the\n"
                    "optimiser lives in `lib/optim.py`; `torch.compile` and `best_model.pt` are not ours to check.\n")
    assert stale_citations([page]) == ["page.md: `_CausalAttention` (defined nowhere in stages/, model/ or the config)",
                                       "page.md: `lib/optim.py` (no such file)"]
