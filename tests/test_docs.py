"""Every shell command and Python block in docs/ runs, in reading order, in a scratch copy of the project.

Tiny settings come from a small defaults file (PIPELINE_CONFIG for the scripts, CONFIG
for make) and a fixture corpus, so nothing is downloaded and the real venv, data and
artifacts are never touched. A block preceded by `<!-- illustrative -->` is not run
(at most a tenth of the blocks may be); `<!-- expect-failure -->` means the block must
exit non-zero (it demonstrates an error).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


from conftest import REPO, copy_project, make_corpus_text

DOCS = ["walkthrough.md", "training.md", "configuration.md", "speed.md", "troubleshooting.md"]
BLOCK = re.compile(r"(<!--\s*(?P<mark>[a-z-]+)\s*-->\s*\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)

TINY_OVERRIDES = {
    "vocab_size: 8000": "vocab_size: 320",
    "d_model: 128": "d_model: 32",
    "n_heads: 4": "n_heads: 2",
    "n_layers: 2": "n_layers: 1",
    "max_seq_length: 128": "max_seq_length: 32",
    "batch_size: 64 ": "batch_size: 16 ",
    "epochs: 20": "epochs: 1",
    "min_free_gb: 2.0": "min_free_gb: 0.01",
    "dtype: auto": "dtype: float32",
    "latency_steps: 240": "latency_steps: 200",
}


def blocks(doc: Path):
    for match in BLOCK.finditer(doc.read_text(encoding="utf-8")):
        yield match["mark"], match["lang"], match["code"]


def test_docs_exist_and_readme_links_them_in_order():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    positions = [readme.find(f"docs/{name}") for name in DOCS]
    assert all(p >= 0 for p in positions), "README must link every doc"
    assert positions == sorted(positions), "README links the docs in reading order"


def test_few_blocks_are_illustrative():
    marks = [mark for name in DOCS for mark, _, _ in blocks(REPO / "docs" / name)]
    assert len(marks) >= 15
    assert sum(m == "illustrative" for m in marks) <= len(marks) / 10


SECTIONS = ["out-of-memory", "disk-full", "diverging-or-nan-loss", "interrupted-runs-and-resume",
            "empty-or-corrupted-corpus", "corpus-download-fails", "tokenizer-failures", "checkpoint-and-tokenizer-mismatch",
            "scaling-out", "read-only-folder-or-permission-denied", "export-damaged-or-out-of-date"]


def test_errors_point_to_existing_troubleshooting_sections():
    text = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-") for title in re.findall(r"^## (.+)$", text, re.M)}
    code = " ".join(p.read_text() for p in (REPO / "stages").rglob("*.py"))
    for section in SECTIONS:
        assert section in anchors, f"docs/troubleshooting.md lacks the section #{section}"
        assert f'"{section}"' in code or f"#{section}" in code, f"no error message points to #{section}"


def test_every_doc_block_runs(tmp_path):
    proj = copy_project(tmp_path / "proj")
    (proj / ".venv").symlink_to(Path(sys.prefix))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus_text(documents=60), encoding="utf-8")
    config = (proj / "config" / "defaults.yaml").read_text()
    for old, new in TINY_OVERRIDES.items():
        assert old in config, old
        config = config.replace(old, new)
    config = config.replace('corpus_path: ""', f'corpus_path: "{corpus}"')
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env.update(PIPELINE_CONFIG=str(tiny), CONFIG=str(tiny), PATH=f"{Path(sys.prefix) / 'bin'}:{env['PATH']}")

    ran = 0
    for name in DOCS:
        for index, (mark, lang, code) in enumerate(blocks(proj / "docs" / name)):
            if mark == "illustrative":
                continue
            cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            result = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=600)
            where = f"{name} block {index + 1} ({lang}):\n{code}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-3000:]}"
            if mark == "expect-failure":
                assert result.returncode != 0, "expected a failure: " + where
            else:
                assert result.returncode == 0, "failed: " + where
            ran += 1
    assert ran >= 15
