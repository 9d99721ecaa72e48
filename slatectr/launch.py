"""`ctr train --nproc N`: the same command in N processes on this machine, under torchrun.

The launch is `torchrun --standalone --nproc-per-node N -m slatectr <the command without
--nproc>`, run in this process through `torch.distributed.run` (torchrun's own entry point),
so the workers are ordinary torchrun workers: each finds RANK, WORLD_SIZE and LOCAL_RANK in its
environment and joins the process group (`models.training.distributed.ranks`). torchrun gives
each worker one intra-op thread unless OMP_NUM_THREADS says otherwise, and when one worker
fails it stops the others; a SIGTERM to this process is passed on to every worker, which
writes a checkpoint before it exits (`models.training.distributed.signals`).

Several machines: run torchrun yourself on each, e.g.
`torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d
--rdzv-endpoint HOST:29400 -m slatectr train ...`, with the run directory on storage every
machine sees.
"""

from __future__ import annotations

import os

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def launch(nproc: int, command: list[str]) -> int:
    """Runs `ctr <command>` in `nproc` workers; -> 0, or the exit code of the first worker
    that failed (128 + signal number when this launcher was signalled)."""
    arguments = ["--standalone", f"--nproc-per-node={nproc}", "--module", "slatectr", *command]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    try:
        run(parse_args(arguments))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0
