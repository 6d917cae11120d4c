"""This machine in one dict (CPU model, cores, native bf16, torch and Python versions): what the docs
say a measurement was made on (docs_snapshot.py for the default run, sweep.py for a sweep's table)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    from lib.hardware import cpu_has_native_bf16
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
            "python": platform.python_version()}
