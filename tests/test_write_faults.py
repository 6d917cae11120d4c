"""Real full disks (a small tmpfs, filled) and read-only folders (a read-only bind mount) on the paths that
write outside atomic_path's own writes: numpy's token files, SentencePiece's model, the parameter files
make has each stage write. Each one is a single message naming the fault, the file and a fix, exit 1,
and the previous version of every file left as it was."""

from __future__ import annotations

import re
import subprocess

from conftest import TINY_TOKENIZER, Workspace, assert_clean_failure
from faults_helpers import fill, read_only, small_disk


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes (a leftover temp file shows up as a new name)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_while_numpy_writes_the_token_files_is_named(encoded):
    encoded_dir = encoded.data / "encoded"
    with small_disk(encoded_dir, "1m"):
        encoded.run("encode.py")
        before = snapshot(encoded_dir)
        filler = fill(encoded_dir, leave_bytes=16_000)  # less than train.npy's 60 KB: numpy's write comes up short
        result = encoded.run("encode.py", check=False)
        filler.unlink()
        after = snapshot(encoded_dir)
    # numpy reports a short write without errno ("61696 requested and 12288 written"): still a full disk
    assert_clean_failure(result, "disk full while writing", "train.npy", "free in", "df -h", "#disk-full")
    assert after == before, "the token files of the last run are untouched, and no temp file is left"


def test_a_full_disk_while_sentencepiece_writes_its_model_is_named(encoded):
    tokenizer_dir = encoded.artifacts / "tokenizer"
    with small_disk(tokenizer_dir, "1m"):
        encoded.run("train_tokenizer.py", *TINY_TOKENIZER)
        before = snapshot(tokenizer_dir)
        filler = fill(tokenizer_dir, leave_bytes=0)
        result = encoded.run("train_tokenizer.py", "--vocab-size", "330", check=False)
        filler.unlink()
        after = snapshot(tokenizer_dir)
    assert_clean_failure(result, "disk full while writing", "spm.model", "#disk-full")
    assert "tokenizer-failures" not in result.stderr and "SentencePiece" not in result.stderr
    assert after == before, "the previous tokenizer is untouched, and no temp file or folder is left"


def test_a_parameter_file_in_a_read_only_artifacts_folder_is_one_message_with_a_fix_that_works(tmp_path):
    """What `make evaluate CHECKPOINT=final_model.pt` and `make train EPOCHS=7` run first: the parameter file."""
    ws = Workspace(tmp_path)
    for script, changed in (("evaluate.py", ("--checkpoint", "final_model.pt")), ("train.py", ("--epochs", "7"))):
        params = ws.artifacts / "params" / f"{script.removesuffix('.py')}.json"
        ws.run(script, "--write-params", params)
        before, files = params.read_bytes(), snapshot(params.parent)
        with read_only(ws.artifacts):
            result = ws.run(script, *changed, "--write-params", params, check=False)
        assert_clean_failure(result, f"cannot write {params}: the file system is read-only",
                             "#read-only-folder-or-permission-denied")
        assert result.stderr.count("error:") == 1 and "During handling" not in result.stderr, result.stderr
        assert snapshot(params.parent) == files, "the parameter file is untouched, and no temp file is left"

        command = re.search(r"`(cp -a \S+ (\S+) && make (\w+) ARTIFACTS_DIR=(\S+))`", result.stderr)
        assert command and command[2] == command[4], result.stderr
        assert command[3] == script.removesuffix(".py")
        copy = tmp_path / f"copy-{command[3]}"  # where the command says /tmp/artifacts, on a shared machine
        subprocess.run(["bash", "-c", command[1].split(" && ")[0].replace(command[2], str(copy))], check=True)
        copied = copy / "params" / params.name
        Workspace(tmp_path).run(script, "--artifacts-dir", copy, *changed, "--write-params", copied)
        assert copied.read_bytes() != before
