"""`python -m tests.straggler ARGS`: the example script (minidist.examples.train) with rank 0 a straggler: at step
--fail-at-step it sleeps 3 s before going on. The last rank kills itself there; rank 0, busy, is not in a collective
to notice, so its torchrun agent restarts it because the other node started a new rendezvous round, not because it
failed: that agent does not count the restart (TORCHELASTIC_RESTART_COUNT stays 0 on it, 1 on the other), the case
that broke restarts on several nodes (tests/test_fault_tolerance.py)."""
import os
import sys
import time

import torch.distributed as dist

from minidist.examples import fault_tolerance as ft
from minidist.examples.train import main

inject = ft.inject


def straggling(args, step: int) -> None:
    if step == args.fail_at_step and dist.get_rank() == 0 and not os.path.exists(
            os.path.join(args.checkpoint_dir, f"failed-at-step-{step}")):
        time.sleep(3)
    inject(args, step)


if __name__ == "__main__":
    ft.inject = straggling  # train() calls ft.inject(args, step) at the start of every step
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as the example does under torchrun: no interpreter teardown, where gloo may abort
