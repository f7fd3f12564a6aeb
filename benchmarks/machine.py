"""What a benchmark ran on, written beside its figures."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

ALGORITHM = Path(__file__).resolve().parents[1] / "leap_ds" / "algorithm"


@functools.cache   # the source does not change within a run; every piece key asks
def algorithm_version() -> str:
    """A hash of the pruning algorithm's source: part of a cached LEAP run's key, so that a change
    to the algorithm reruns it (the baselines do not depend on it)."""
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(ALGORITHM.glob("*.py")))).hexdigest()


def machine_info() -> dict:
    import torch
    cpu = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": md.version("deepspeed"), "transformers": md.version("transformers"),
            "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
