"""What the example scripts print while they train: a progress bar on rank 0 and the loss every few steps (train.py
and parallel3d.py share it)."""
import sys

import torch.distributed as dist


def progress_bar(args, description: str, start: int = 0):
    """A progress bar on rank 0 (None elsewhere, or with --quiet)."""
    if dist.get_rank() != 0 or args.quiet:
        return None
    from tqdm import tqdm
    return tqdm(total=args.steps, initial=start, desc=description, file=sys.stderr)


def log_step(progress, args, step: int, loss: float) -> None:
    if progress:
        progress.update()
        if step % args.log_every == 0 or step == args.steps - 1:
            progress.write(f"step {step:5d}  loss {loss:.4f}")
        if step == args.steps - 1:
            progress.close()
