"""Modules shared by the stage scripts in stages/.

A stage script has an `if __name__ == "__main__":` block and is run by a make target;
these modules have none and are only imported. README.md's Layout section lists them,
one line each.
"""

import sys
from pathlib import Path

# `model/` lives beside `stages/`: make it importable however a script is started.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
