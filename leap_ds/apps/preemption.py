"""Checkpoint and stop when asked (Slurm time limit, preemption, a launcher's SIGTERM).

Protocol, shared by ``leap_ds.train`` and tests/launch_helpers/resumable_tiny.py:

1. ``with StopOnSignal() as stop:`` around the training loop: SIGUSR1 and SIGTERM only
   record the request (a signal handler must not run collectives or save files).
2. Once per optimizer step every rank calls ``stop.requested(device)``: a MAX all-reduce of
   the local flag. All ranks get the same answer at the same step, also when the signal
   reached only some of them, or reached them between two steps.
3. When it is True every rank saves a checkpoint at this step (a DeepSpeed save_checkpoint
   is a collective: all ranks save the same step), then calls ``stop.exit(...)``: a barrier,
   then exit with EXIT_STATUS. ``--resume auto`` continues from exactly that step.

Outside the ``with`` block the signals keep their previous effect; a signal that arrives
after the last check of the block is raised again when the block ends normally.
launch/slurm/leap.sbatch sends SIGUSR1 to the ranks before the time limit and on
preemption, waits for them to exit, and only then requeues the job.

``python leap_ds/apps/preemption.py --exit-status`` prints EXIT_STATUS (for the shell scripts).
"""
from __future__ import annotations

import os
import signal
import sys

# sysexits.h EX_TEMPFAIL: "temporary failure, try again" -- the run is not finished.
EXIT_STATUS = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopOnSignal:
    """Records SIGUSR1/SIGTERM inside a ``with`` block; see the module docstring."""

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.received = None  # the first signal that arrived (signal.Signals), or None
        self._previous = {}
        self._leaving = False

    def _record(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, SystemExit) and exc.code == EXIT_STATUS and self._leaving:
            return False  # keep ignoring the stop signals until the process is gone (see exit)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if exc_type is None and self.received is not None:
            # Asked to stop after the last check: do what the signal would have done.
            os.kill(os.getpid(), self.received)
        return False

    def requested(self, device=None) -> bool:
        """Collective (call it on every rank at the same point): did any rank get a signal?

        device: where the flag tensor lives; it must suit the process group's backend
        (the engine's device: cuda:LOCAL_RANK under NCCL, cpu under gloo).
        """
        local = self.received is not None
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        import torch
        flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit(self, where: str, checkpoint_saved: bool, log=print):
        """After the caller saved (or had nothing to save): wait for every rank, exit EXIT_STATUS."""
        why = self.received.name if self.received is not None else "another rank's signal"
        what = "checkpoint saved" if checkpoint_saved else "no checkpoint for this phase (it starts again)"
        log(f"stop requested ({why}) at {where}: {what}; exiting with status {EXIT_STATUS}")
        # A launcher that sees the first rank leave with a non-zero status sends the others
        # SIGTERM (srun --kill-on-bad-exit, the deepspeed launcher): once the checkpoint is
        # saved that must not turn a clean stop into a kill. SIGKILL still ends a stuck rank.
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        self._leaving = True
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank leaves while another still writes
        sys.stdout.flush()
        sys.exit(EXIT_STATUS)

if __name__ == "__main__":
    if sys.argv[1:] == ["--exit-status"]:
        print(EXIT_STATUS)
    else:
        sys.exit(f"usage: {sys.argv[0]} --exit-status")
