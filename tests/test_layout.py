"""The Makefile lists exactly the code each stage runs (it asks make for its rules: a subprocess, so this
is the integration tier; the rest of the layout's promises are checked in tests/unit/test_layout.py)."""

from __future__ import annotations

import os
import re
import subprocess

from conftest import REPO
from unit.test_layout import FILE_STAGES, code_files, relative


def make_database() -> dict[str, list[str]]:
    """Every explicit rule of the Makefile as `make train` sees it: target -> prerequisites (order-only left out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    out = subprocess.run(["make", "-pn", "train"], cwd=REPO, capture_output=True, text=True, env=env, check=True).stdout
    rules = {}
    for line in out.splitlines():
        match = re.match(r"^((?:data|artifacts)/[^\s:%]+):(?!=)(.*)$", line)
        if match:
            rules[match[1]] = match[2].split("|")[0].split()
    return rules


def test_makefile_lists_exactly_the_code_each_stage_runs():
    rules = make_database()
    checked = set()
    for target, prerequisites in rules.items():
        code = [p for p in prerequisites if p.endswith(".py")]
        if not code:
            continue
        script = REPO / code[0]  # each stage's code list starts with its script
        expected = relative(code_files(script))
        listed = set(code)
        assert listed == expected, (f"{target}: the Makefile lists {sorted(listed)}, the code of {script.name} is "
                                    f"missing {sorted(expected - listed)}, extra {sorted(listed - expected)}")
        checked.add(script.name)
    assert checked == FILE_STAGES, f"no rule found for {FILE_STAGES - checked}"
