"""Data stages on tiny corpora: download (local file and folder), prepare, tokenizer, encode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from conftest import TINY_VOCAB, make_corpus_text


def test_local_corpus_file_is_copied_with_sidecar(workspace, corpus_file):
    out = workspace.run("download.py", "--corpus-path", corpus_file)
    corpus = workspace.data / "raw" / "corpus.txt"
    assert corpus.read_bytes() == corpus_file.read_bytes()
    meta = json.loads((workspace.data / "raw" / "corpus.json").read_text())
    assert meta["source"]["kind"] == "path"
    assert meta["bytes"] == corpus_file.stat().st_size
    assert meta["documents"] == 40
    assert "40 documents" in out.stdout


def test_local_corpus_folder_keeps_files_apart(workspace, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("first file line one\nline two\n", encoding="utf-8")
    (folder / "b.txt").write_text("second file\n", encoding="utf-8")
    (folder / "ignored.md").write_text("not a txt file\n", encoding="utf-8")
    workspace.run("download.py", "--corpus-path", folder)
    text = (workspace.data / "raw" / "corpus.txt").read_text(encoding="utf-8")
    assert text == "first file line one\nline two\n\nsecond file\n"


def test_local_corpus_folder_of_html_becomes_text_one_document_per_section(workspace, tmp_path):
    folder = tmp_path / "manual"
    folder.mkdir()
    (folder / "ch01.en.html").write_text(
        "<html><head><title>Manual</title><style>p {color: red}</style><script>var x = 1;</script></head>"
        "<body><div class=\"navheader\"><a href=\"ch00.html\">Prev</a> <a href=\"ch02.html\">Next</a></div>"
        "<h1>Tutorials</h1><div class=\"toc\"><p><b>Table of Contents</b></p><dl><dt>1.1. Shell</dt>"
        "<dd><div class=\"toc\">nested 1.1.1.</div></dd></dl></div>"
        "<p>Read the <b>fine</b>\n manual &amp; enjoy.</p><ul><li>one</li><li>two</li></ul>"
        "<nav><ul><li>Home</li></ul></nav><div class=\"list-of-tables\">Table 1.1. List of tools</div>"
        "<h2>Shell</h2><pre>$ ls -l\n$ cd /tmp</pre><p>Done.</p><div id=\"sidebar\">ads</div>"
        "<p class=\"guimenu tip\">Menus stay.</p></body></html>", encoding="utf-8")
    (folder / "ch02.txt").write_text("plain text file\n", encoding="utf-8")
    workspace.run("download.py", "--corpus-path", folder)
    text = (workspace.data / "raw" / "corpus.txt").read_text(encoding="utf-8")
    # The <head>, navigation and tables of contents are dropped: only the pages' prose is left.
    assert text == ("Tutorials\nRead the fine manual & enjoy.\none\ntwo\n\n"
                    "Shell\n$ ls -l\n$ cd /tmp\nDone.\nMenus stay.\n\nplain text file\n")
    assert json.loads((workspace.data / "raw" / "corpus.json").read_text())["documents"] == 3

    (folder / "ch03.html").write_bytes("<p>Página en latin1</p>".encode("latin-1"))
    result = workspace.run("download.py", "--corpus-path", folder, check=False)
    assert result.returncode != 0 and "ch03.html is not valid UTF-8" in result.stderr and "iconv" in result.stderr
    assert (workspace.data / "raw" / "corpus.txt").read_text(encoding="utf-8") == text  # the old corpus is untouched


def test_prepare_splits_by_document_90_10(workspace, corpus_file):
    workspace.run("download.py", "--corpus-path", corpus_file)
    out = workspace.run("prepare.py")
    prepared = workspace.data / "prepared"
    train_docs = (prepared / "train.txt").read_text(encoding="utf-8").strip().split("\n\n")
    val_docs = (prepared / "val.txt").read_text(encoding="utf-8").strip().split("\n\n")
    assert (len(train_docs), len(val_docs)) == (36, 4)
    assert not set(train_docs) & set(val_docs), "a document is in both splits"
    source_docs = corpus_file.read_text(encoding="utf-8").strip().split("\n\n")
    assert sorted(train_docs + val_docs) == sorted(source_docs), "text was lost or changed"
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["train_documents"] == 36 and stats["val_documents"] == 4
    assert "36" in out.stdout and "val 4" in out.stdout


def test_prepare_split_follows_ratio_and_seed(workspace, corpus_file):
    workspace.run("download.py", "--corpus-path", corpus_file)
    workspace.run("prepare.py", "--val-fraction", "0.25", "--split-seed", "1")
    first = (workspace.data / "prepared" / "val.txt").read_text()
    assert first.count("\n\n") + 1 == 10
    workspace.run("prepare.py", "--val-fraction", "0.25", "--split-seed", "2")
    assert (workspace.data / "prepared" / "val.txt").read_text() != first


def test_prepare_splits_long_lines_without_dropping_text(workspace, tmp_path):
    long_line = " ".join(f"palabra{i}" for i in range(3000))  # about 30 KB on one line
    no_spaces = "ñ" * 5000  # 10,000 bytes, no whitespace at all
    corpus = tmp_path / "long.txt"
    corpus.write_text(make_corpus_text(documents=4) + "\n" + long_line + "\n" + no_spaces + "\n", encoding="utf-8")
    workspace.run("download.py", "--corpus-path", corpus)
    out = workspace.run("prepare.py", "--max-line-bytes", "1000")
    prepared = workspace.data / "prepared"
    text = (prepared / "train.txt").read_text(encoding="utf-8") + (prepared / "val.txt").read_text(encoding="utf-8")
    lines = text.split("\n")
    assert max(len(line.encode("utf-8")) for line in lines) <= 1000
    assert text.split().count("palabra2999") == 1 and " ".join(text.split()).count("palabra1500 palabra1501") == 1
    assert "".join(line for line in lines if set(line) == {"ñ"}) == no_spaces
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["lines_split"] == 2
    assert "2 lines longer than 1000 bytes split" in out.stdout


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"   \n\n  \n", "is empty"),
    (b"some text\x00more text\n\nother doc\n", "NUL byte at byte offset 9"),
    ("caf\u00e9 ok\n\n".encode() + b"bad \xff byte\n", "byte 0xff at byte offset 14 (line 3)"),
    (b"only one document without blank lines\nsecond line\n", "needs at least 2"),
])
def test_prepare_refuses_bad_corpus(workspace, tmp_path, content, expected):
    raw = workspace.data / "raw"
    raw.mkdir(parents=True)
    (raw / "corpus.txt").write_bytes(content)
    result = workspace.run("prepare.py", check=False)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "fix:" in result.stderr and "Traceback" not in result.stderr
    assert not (workspace.data / "prepared" / "train.txt").exists()
    assert not (workspace.data / "prepared" / "stats.json").exists()


def test_prepare_missing_corpus_says_what_to_run(workspace):
    result = workspace.run("prepare.py", check=False)
    assert result.returncode == 1 and "make download" in result.stderr


def test_tokenizer_is_unigram_with_special_ids_and_round_trips(workspace, corpus_file):
    workspace.run("download.py", "--corpus-path", corpus_file)
    workspace.run("prepare.py")
    out = workspace.run("train_tokenizer.py", "--vocab-size", str(TINY_VOCAB))
    tok = workspace.artifacts / "tokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(tok / "spm.model"))
    assert sp.get_piece_size() == TINY_VOCAB
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    for line in ["Y el rey habló á la ciudad; ¿quién oyó? ¡Sí!", "Ünïcödé the corpus never had: 東京 €"]:
        assert sp.decode(sp.encode(line)) == line
        assert sp.unk_id() not in sp.encode(line)
    # A unigram model scores pieces by log-probability; BPE scores are merge ranks (whole numbers).
    scores = [sp.get_score(i) for i in range(sp.get_piece_size()) if sp.is_control(i) is False and not sp.is_byte(i)
              and not sp.is_unknown(i)]
    assert sum(score != int(score) for score in scores) > len(scores) * 0.9
    meta = json.loads((tok / "tokenizer.json").read_text())
    assert meta["vocab_size"] == TINY_VOCAB and len(meta["model_sha256"]) == 64
    assert "round-trip ok" in out.stdout and f"vocab {TINY_VOCAB} pieces" in out.stdout


def test_tokenizer_vocab_too_large_reports_maximum_and_leaves_nothing(workspace, corpus_file):
    workspace.run("download.py", "--corpus-path", corpus_file)
    workspace.run("prepare.py")
    result = workspace.run("train_tokenizer.py", "--vocab-size", "20000", check=False)
    assert result.returncode == 1
    assert "SentencePiece reports a maximum of" in result.stderr and "VOCAB_SIZE=" in result.stderr
    tok = workspace.artifacts / "tokenizer"
    assert not tok.exists() or sorted(p.name for p in tok.iterdir()) == []


def test_encode_writes_uint16_tokens_with_sidecar(encoded):
    enc = encoded.data / "encoded"
    for split in ("train", "val"):
        tokens = np.load(enc / f"{split}.npy", mmap_mode="r")
        meta = json.loads((enc / f"{split}.json").read_text())
        assert tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
        assert tokens.size == meta["tokens"] > 0
        assert meta["vocab_size"] == TINY_VOCAB and tokens.max() < TINY_VOCAB
        assert meta["source_bytes"] == len((encoded.data / "prepared" / f"{split}.txt").read_bytes())
        tok_meta = json.loads((encoded.artifacts / "tokenizer" / "tokenizer.json").read_text())
        assert meta["tokenizer_sha256"] == tok_meta["model_sha256"]
        assert tokens[0] == 2 and tokens[-1] == 3  # <s> ... </s>


def test_bad_parameters_are_all_reported_before_work(workspace, corpus_file):
    result = workspace.run("prepare.py", "--val-fraction", "1.5", "--max-line-bytes", "5", check=False)
    assert result.returncode == 2
    assert "val_fraction" in result.stderr and "max_line_bytes" in result.stderr


def test_unknown_yaml_key_is_refused(workspace, tmp_path):
    from conftest import REPO
    config = tmp_path / "config.yaml"
    config.write_text((REPO / "config" / "defaults.yaml").read_text().replace("val_fraction: 0.1", "val_fracton: 0.1"))
    result = workspace.run("prepare.py", "--config", config, check=False)
    assert result.returncode == 2 and "unknown key 'prepare.val_fracton'" in result.stderr
