"""Test-only: let accelerate run DeepSpeed on several CPU ranks.

accelerate picks no backend on a machine without an accelerator unless told
``cpu=True``, and ``cpu=True`` turns DeepSpeed off; with several ranks it then
counts one process (no data sharding, a wrong batch size for DeepSpeed). On
such a machine this makes it choose gloo, as DeepSpeed itself does on CPU.
GPU machines never reach the patched branch.
"""
import os

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend


def _gloo_when_nothing_else(self, cpu=False, sagemaker_dp=False, backend=None):
    chosen, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if chosen is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "gloo", DistributedType.MULTI_CPU
    return chosen, kind


PartialState._prepare_backend = _gloo_when_nothing_else
