"""What a benchmark ran on, written beside its figures."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess


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
