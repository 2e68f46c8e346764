"""Which samples each rank reads: distributed samplers.

Data parallelism needs every rank to read a *different* slice of the data each step, every sample to be read once
per epoch, and every rank to run the *same number* of steps: a rank with one batch fewer skips the last all-reduce
and its peers wait for it until the process-group timeout. Three samplers, each an iterable a DataLoader accepts:

  DistributedSampler       a seeded permutation (reshuffled by set_epoch), padded by repeating its head (or cut,
                           drop_last) to a multiple of N, then dealt out: rank r takes positions r, r+N, r+2N, ...
  LengthGroupedSampler     for variable-length samples: batches of similar lengths waste less padding. Samples are
                           sorted by length inside shuffled "mega-batches"; each *global* batch (N x batch_size
                           consecutive samples, so similar lengths) is then cut into one batch per rank, rotating
                           which rank takes the longest slice. Sorting and slicing the whole dataset per rank
                           instead would give rank 0 all the shortest samples.
  TokenBudgetBatchSampler  batches sized by tokens, not samples: each padded batch (size x longest) stays within
                           max_tokens; a sample longer than the budget rides alone; batches are padded with repeats
                           to a multiple of N so every rank gets the same count.

Padding waste = 1 - real tokens / (batch size x longest sample), summed over batches.
"""
import math

import torch


def distributed_indices(n: int, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                        drop_last: bool = False) -> list[int]:
    """The dataset positions rank `rank` reads in epoch `epoch` (see DistributedSampler).

    Graded: index for index the positions torch.utils.data.DistributedSampler yields with the same arguments, for
    sizes that N divides and does not, n < N (padding repeats the order more than once), n = 0, shuffle on and off,
    drop_last on and off, several epochs.
    """
    _check_rank(num_replicas, rank)
    # <exercise distributed_indices points=2>
    # hint: torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) is the shuffled order.
    # hint: without drop_last, pad by repeating the order from its start (more than once if n < num_replicas).
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist() if shuffle \
        else list(range(n))
    if drop_last:
        order = order[:n - n % num_replicas]
    elif order:
        total = math.ceil(n / num_replicas) * num_replicas
        order = (order * math.ceil(total / n))[:total]
    return order[rank::num_replicas]
    # </exercise>


def _check_rank(num_replicas: int, rank: int) -> None:
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
    if not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank!r} is not in [0, {num_replicas})")


def _world(num_replicas, rank):
    """Default to the process group's world size and rank, like torch's DistributedSampler."""
    if num_replicas is None or rank is None:
        import torch.distributed as dist
        num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        rank = dist.get_rank() if rank is None else rank
    _check_rank(num_replicas, rank)
    return num_replicas, rank


class DistributedSampler:
    """Each rank's share of a dataset, the same length on every rank; call set_epoch(e) to reshuffle."""

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        self.n = len(dataset)
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(distributed_indices(self.n, self.num_replicas, self.rank, self.shuffle, self.seed, self.epoch,
                                        self.drop_last))

    def __len__(self) -> int:
        return self.n // self.num_replicas if self.drop_last else math.ceil(self.n / self.num_replicas)


class LengthGroupedSampler:
    """Indices for batches of similar lengths, the same step's batches similar across ranks (use with batch_size)."""

    def __init__(self, lengths: list[int], batch_size: int, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, mega_batch_mult: int = 50):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size and mega_batch_mult must be positive, got {batch_size} and {mega_batch_mult}")
        self.lengths, self.batch_size, self.mega = list(lengths), batch_size, mega_batch_mult
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """Every step's global batch (N x batch_size indices of similar length), in the order they are read."""
        n, g = len(self.lengths), torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        step = self.batch_size * self.num_replicas
        total = math.ceil(n / step) * step
        order = (order * math.ceil(total / n))[:total] if n else []  # pad with repeats: equal steps on every rank
        mega = step * self.mega
        chunks = [sorted(order[i:i + mega], key=lambda k: -self.lengths[k]) for i in range(0, total, mega)]
        batches = [c[i:i + step] for c in chunks for i in range(0, len(c), step)]
        if self.shuffle:  # shuffle the order of the global batches, not their contents
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self):
        # Global batch k is sorted, so its N slices go from longest to shortest: rank r takes slice (r + k) mod N,
        # and over the steps every rank takes every position equally often.
        b, n = self.batch_size, self.num_replicas
        return iter([i for k, batch in enumerate(self.global_batches())
                     for i in batch[(self.rank + k) % n * b:((self.rank + k) % n + 1) * b]])

    def __len__(self) -> int:
        step = self.batch_size * self.num_replicas
        return math.ceil(len(self.lengths) / step) * self.batch_size


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy batches over `lengths` taken in the given order: each batch's size x longest stays <= max_tokens.

    Returns lists of positions into `lengths`, in order; a batch is closed as soon as the next sample would push it
    over the budget. A sample longer than max_tokens is a batch of its own. (Sort by length first to waste little
    padding.) Graded: exact batches on hand-made inputs, and on random ones: every position once, in order, within
    the budget, and no two neighbouring batches that would fit together.
    """
    # <exercise token_budget_batches points=2>
    # hint: adding a sample of length L to a batch of k samples whose longest is M costs (k + 1) * max(M, L).
    batches, current, longest = [], [], 0
    for i, length in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches
    # </exercise>


class TokenBudgetBatchSampler:
    """Lists of indices whose padded size stays within max_tokens; the same number of batches on every rank."""

    def __init__(self, lengths: list[int], max_tokens: int, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.lengths, self.max_tokens = list(lengths), max_tokens
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_batches(self) -> list[list[int]]:
        """Every batch of the epoch, padded to a multiple of N; rank r reads batches r, r+N, ..."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.lengths)
        ties = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        by_length = sorted(ties, key=lambda i: self.lengths[i])  # stable: equal lengths keep the shuffled order
        batches = [[by_length[k] for k in b] for b in
                   token_budget_batches([self.lengths[i] for i in by_length], self.max_tokens)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if batches and len(batches) % self.num_replicas:
            short = self.num_replicas - len(batches) % self.num_replicas
            batches += (batches * math.ceil(short / len(batches)))[:short]  # repeats, like DistributedSampler
        return batches

    def __iter__(self):
        return iter(self.all_batches()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return len(self.all_batches()) // self.num_replicas


def padding_waste(batches: list[list[int]], lengths: list[int]) -> float:
    """Fraction of the padded tokens (batch size x longest, summed) that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / padded if padded else 0.0


def straggler_idle(work: list[list[float]]) -> float:
    """Share of the ranks' time spent waiting for the slowest rank, over all steps.

    work[s][r] is how long rank r computes in step s (seconds, or a proxy: padded tokens). A synchronous step ends
    when the slowest rank is done (the all-reduce waits for it), so rank r idles max_s - work[s][r]. Returned:
    sum over steps and ranks of the idle time / sum over steps of N x max_s (0: perfectly balanced; 0.5: half the
    machine waits). Graded: by hand on small tables, including equal work (0) and a single rank (0).
    """
    # <exercise straggler_idle points=1>
    # hint: per step, the slowest rank sets the step's length; every other rank idles for the difference.
    idle = sum(max(step) * len(step) - sum(step) for step in work if step)
    total = sum(max(step) * len(step) for step in work if step)
    return idle / total if total else 0.0
    # </exercise>


def padded_tokens_per_step(per_rank_batches: list[list[list[int]]], lengths: list[int]) -> list[list[int]]:
    """work[s][r] = the padded tokens (batch size x longest sample) rank r processes in step s: compute's proxy."""
    steps = min(len(batches) for batches in per_rank_batches)
    return [[len(b[s]) * max((lengths[i] for i in b[s]), default=0) for b in per_rank_batches] for s in range(steps)]
