"""Every shell command and Python block in docs/ runs, in reading order, in a scratch copy of the project.

Tiny settings come from a small defaults file (PIPELINE_CONFIG for the scripts, CONFIG
for make) and a fixture corpus, so nothing is downloaded and the real venv, data and
artifacts are never touched. A block preceded by `<!-- illustrative -->` is not run
(at most a tenth of the blocks may be); `<!-- expect-failure -->` means the block must
exit non-zero (it demonstrates an error).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


from conftest import REPO, copy_project, make_corpus_text

DOCS = ["walkthrough.md", "training.md", "export.md", "runs.md", "configuration.md", "speed.md", "troubleshooting.md", "experiments.md"]
BLOCK = re.compile(r"(<!--\s*(?P<mark>[a-z-]+)\s*-->\s*\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)

TINY_OVERRIDES = {
    "vocab_size: 8000": "vocab_size: 320",
    "d_model: 128": "d_model: 32",
    "n_heads: 4": "n_heads: 2",
    "n_layers: 2": "n_layers: 1",
    "max_seq_length: 256": "max_seq_length: 32",
    "batch_size: 32 ": "batch_size: 16 ",
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
    readme = readme[readme.index("## Documentation, in reading order"):]
    positions = [readme.find(f"docs/{name}") for name in DOCS]
    assert all(p >= 0 for p in positions), "README must link every doc"
    assert positions == sorted(positions), "README links the docs in reading order"


COG = [sys.executable, "-m", "cogapp", "-P", "-I", "docs", "-p", "from cog_figures import *"]


def test_every_figure_is_the_snapshots():
    """cog --check: every generated figure in docs/*.md and README.md is what docs/data/ gives today."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")) + ["README.md"]
    result = subprocess.run([*COG, "--check", "--diff", *files], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"stale figures: run `make docs`\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    blocks_per_file = {f: (REPO / f).read_text(encoding="utf-8").count("[[[cog") for f in files}
    assert all(n > 0 for n in blocks_per_file.values()), f"every page's figures come from the snapshot: {blocks_per_file}"
    assert sum(blocks_per_file.values()) >= 60


def test_the_snapshot_is_the_default_configurations():
    """docs/data/ was made from today's defaults: a change of defaults without `make docs` fails here."""
    result = subprocess.run([sys.executable, "stages/docs_snapshot.py", "--fingerprint"], cwd=REPO,
                            capture_output=True, text=True, check=True,
                            env={k: v for k, v in os.environ.items() if k != "PIPELINE_CONFIG"})
    now = json.loads(result.stdout)
    snapshot = json.loads((REPO / "docs" / "data" / "snapshot.json").read_text())
    changed = {f"{stage}.{key}": (snapshot["params"].get(stage, {}).get(key), value)
               for stage, values in now["params"].items() for key, value in values.items()
               if snapshot["params"].get(stage, {}).get(key) != value}
    assert snapshot["fingerprint"] == now["fingerprint"], (
        f"the defaults changed since docs/data/ was made (snapshot, now): {changed}; run "
        "`make all && make export && make docs`")


def test_the_snapshot_refuses_a_run_of_other_settings(trained, tmp_path):
    """Only the default run's figures may reach the docs: a tiny run is refused, nothing is written."""
    result = subprocess.run([sys.executable, "stages/docs_snapshot.py", "--data-dir", str(trained.data),
                             "--artifacts-dir", str(trained.artifacts), "--out", str(tmp_path / "snapshot")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not the default configuration's" in result.stderr and "train.d_model: 32 (default 128)" in result.stderr
    assert "make docs" in result.stderr and not (tmp_path / "snapshot").exists()


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to dashes)."""
    return {re.sub(r"[^a-z0-9 _-]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_every_link_between_pages_lands():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"<!--.*?-->", "", page.read_text(encoding="utf-8"), flags=re.S)  # cog's code is not shown
        for target, anchor in re.findall(r"\]\(([^)#\s]*\.md|)(?:#([^)\s]+))?\)", text):
            file = (page.parent / target) if target else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {target}#{anchor}")
    assert not broken, broken


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
