"""Gradient buckets: how the flattened gradients are cut into buckets, and in which order buckets may start.

Backward produces gradients from the last layer to the first, so buckets are filled walking the parameters in
*reverse* order: the first bucket completes early in backward and its all-reduce can start while backward computes the
rest (reducer.py). Every bucket but the last holds exactly `cap` elements, so a parameter may straddle two buckets (a
communication hook gets whole parameters instead: assign_whole_buckets); each dtype gets its own flat buffer and
buckets. Buckets start strictly in index order on every rank, so all ranks issue the same collectives in the same
order.
"""
import torch

MiB = 1 << 20


def assign_buckets(numels: list[int], cap: int | None) -> list[list[tuple[int, int, int]]]:
    """Cut the flattened gradients into buckets of `cap` elements, walking the parameters in *reverse* order.

    Returns, for each bucket, its pieces (parameter index, start, stop) within that flattened parameter. A parameter
    may be split across two buckets, so every bucket but the last holds exactly `cap` elements and there are
    ceil(total / cap) buckets. `cap=None` gives one bucket per parameter (the naive algorithm). Empty parameters
    get no piece. Inside a bucket the pieces are listed in the order they were added (so a parameter's pieces are in
    increasing start order, and the last parameter comes first). A cap that is not a positive integer raises
    ValueError (checked before the exercise region). Graded: exact buckets by hand, and on random sizes: ceil(total /
    cap) buckets, full buckets but the last, each parameter's pieces tiling [0, numel) in order.
    """
    if cap is not None and (not isinstance(cap, int) or cap <= 0):
        raise ValueError(f"bucket capacity must be a positive number of elements (or None), got {cap!r}")
    # <exercise assign_buckets points=2>
    # hint: keep the current bucket and how much room it has left; a parameter can fill the current bucket and
    #       continue in the next one, possibly several times.
    if cap is None:
        return [[(i, 0, numels[i])] for i in reversed(range(len(numels))) if numels[i]]
    buckets, current, room = [], [], cap
    for i in reversed(range(len(numels))):
        start = 0
        while start < numels[i]:
            take = min(room, numels[i] - start)
            current.append((i, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                buckets.append(current)
                current, room = [], cap
    if current:
        buckets.append(current)
    return buckets
    # </exercise>


def assign_whole_buckets(numels: list[int], cap: int | None) -> list[list[tuple[int, int, int]]]:
    """As assign_buckets, but a parameter is never split: a bucket takes whole parameters (in reverse order) until it
    holds at least `cap` elements, so a bucket may exceed the cap by up to one parameter. This is DDP's layout, and
    the one a communication hook needs: a hook that reshapes each gradient to a matrix (PowerSGD) must see every
    gradient whole, inside one bucket."""
    cap = cap or 1  # None: one bucket per parameter
    buckets, current, size = [], [], 0
    for i in reversed(range(len(numels))):
        if numels[i]:
            current.append((i, 0, numels[i]))
            size += numels[i]
        if size >= cap:
            buckets.append(current)
            current, size = [], 0
    return buckets + ([current] if current else [])


def launch_ready_buckets(pending: list[int], next_bucket: int, launch) -> int:
    """Launch, in bucket order, every bucket from `next_bucket` on whose gradients have all arrived; return the index
    of the first bucket not launched.

    pending[b] is how many gradient arrivals bucket b still awaits (0: complete). launch(b) starts bucket b's
    collective. Buckets must start in index order on every rank, even when a later bucket completes first: if rank 0
    launched bucket 3 before bucket 2 while rank 1 launched 2 first, their all-reduces would pair bucket 3 on one rank
    with bucket 2 on the other (wrong sums, or a hang when the sizes differ). So a complete bucket waits for every
    bucket before it. Graded: which buckets are launched, in which order, and the index returned.
    """
    # <exercise launch_ready_buckets points=2>
    # hint: walk forward from next_bucket; stop at the first bucket that is still waiting for a gradient.
    while next_bucket < len(pending) and pending[next_bucket] == 0:
        launch(next_bucket)
        next_bucket += 1
    return next_bucket
    # </exercise>


class Bucket:
    """One bucket: a slice [start, stop) of the flat buffer of its dtype, and the parameters it holds."""

    def __init__(self, index: int, dtype: torch.dtype, start: int, stop: int, params: list[int]):
        self.index, self.dtype, self.start, self.stop, self.params = index, dtype, start, stop, params
        self.pending = 0  # hook firings still awaited in this backward

    def __repr__(self):
        return f"Bucket({self.index}, {self.dtype}, [{self.start}, {self.stop}), params {self.params})"


def layout(params: list[torch.Tensor], cap_bytes: int | None, whole_parameters: bool = False):
    """Buckets over one flat buffer per dtype: (buckets in launch order, {param index: (dtype, offset)}).
    whole_parameters: never split a parameter across buckets (assign_whole_buckets)."""
    assign = assign_whole_buckets if whole_parameters else assign_buckets
    buckets, offsets = [], {}
    for dtype in dict.fromkeys(p.dtype for p in params):
        members = [i for i, p in enumerate(params) if p.dtype == dtype]
        cap = None if cap_bytes is None else max(1, cap_bytes // params[members[0]].element_size())
        position = 0
        for pieces in assign([params[i].numel() for i in members], cap):
            start = position
            for k, begin, stop in pieces:  # a parameter's pieces are consecutive: it is one slice of the buffer
                if begin == 0:
                    offsets[members[k]] = (dtype, position)
                position += stop - begin
            buckets.append(Bucket(0, dtype, start, position, list(dict.fromkeys(members[k] for k, _, _ in pieces))))
    # Launch order: as backward produces them, i.e. by the latest parameter each bucket holds.
    buckets.sort(key=lambda b: (-max(b.params), b.start))
    for k, b in enumerate(buckets):
        b.index = k
    return buckets, offsets
