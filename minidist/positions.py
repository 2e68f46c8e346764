"""The check of a context-parallel layout: which sequence positions each of n ranks holds, as ring attention
(context_parallel.py) and Ulysses attention (ulysses.py) both take it, e.g. context_parallel.layout's load-balanced
default. Its own module so that both can use it and context_parallel can name ulysses_attention beside ring attention.
"""
import torch


def check_positions(positions, n: int, local_len: int) -> torch.Tensor:
    """`positions` on the CPU after checking it: an integer (n, pieces, chunk) tensor holding every position
    0 .. n * local_len - 1 exactly once (any permutation is exact; contiguous pieces let whole pairs be skipped)."""
    if not torch.is_tensor(positions) or positions.dim() != 3 or positions.is_floating_point() \
            or positions.shape[0] != n or positions[0].numel() != local_len:
        shape = tuple(positions.shape) if torch.is_tensor(positions) else type(positions).__name__
        raise ValueError(f"positions of shape {shape} do not describe {n} ranks holding {local_len} positions "
                         f"each (an integer tensor of shape ({n}, pieces, chunk))")
    cpu, total = positions.detach().cpu().long(), n * local_len
    if not torch.equal(cpu.flatten().sort().values, torch.arange(total)):
        inside = cpu[(cpu >= 0) & (cpu < total)].unique().numel()
        raise ValueError(f"positions must hold each of 0 .. {total - 1} exactly once: {total - inside} of them are "
                         f"missing (repeated or out of range instead)")
    return cpu
