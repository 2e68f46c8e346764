"""What the example scripts print while they train: a progress bar on rank 0 and the loss every few steps (train.py
and parallel3d.py share it)."""
import sys

import torch.distributed as dist


def progress_bar(args, description: str, start: int = 0):
    """A progress bar on rank 0 when stderr is a terminal (None elsewhere, in a log file, or with --quiet): its
    carriage returns would fill a redirected log."""
    if dist.get_rank() != 0 or args.quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=args.steps, initial=start, desc=description, file=sys.stderr)


def log_step(progress, args, step: int, loss: float) -> None:  # rank 0, every --log-every steps and the last
    if dist.get_rank() != 0 or args.quiet:
        return
    if step % args.log_every == 0 or step == args.steps - 1:
        (progress.write if progress else print)(f"step {step:5d}  loss {loss:.4f}")
    if progress:
        progress.update()
        if step == args.steps - 1:
            progress.close()
