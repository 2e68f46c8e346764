"""The vocabulary of a pipeline schedule: an Action, and where each (rank, chunk) sits in the model.

A model cut into S = v p consecutive *stages* is placed on p ranks, v chunks each. Two placements exist here:

    looped (Megatron-LM's interleaving; v = 1 is plain GPipe/1F1B):  chunk c of rank r is stage c p + r
    V (ZB-V, DualPipeV: v = 2):   chunk 0 of rank r is stage r, chunk 1 is stage 2p - 1 - r

In the V a micro-batch goes down the ranks through chunk 0 (stages 0 .. p-1) and comes back up through chunk 1
(stages p .. 2p-1): the last rank passes its output to itself (stages p-1 and p), and rank 0 holds both the first
stage and the last one (the loss), so the backward starts where the forward began.
A schedule built for the V placement is a `VSchedule` (a list of action lists like any schedule, marked v_shape).
"""
from dataclasses import dataclass

KINDS = ("F", "B", "W")


@dataclass(frozen=True)
class Action:
    kind: str         # "F", "B" or "W"
    microbatch: int
    chunk: int = 0    # which of the rank's v model chunks (interleaving); 0 otherwise

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"an action's kind is one of {KINDS}, got {self.kind!r}")
        for name in ("microbatch", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"an action's {name} must be a non-negative integer, got {value!r}")

    def __str__(self):
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


class VSchedule(list):
    """A schedule (one list of Actions per rank) whose two chunks per rank sit in a V (see the module docstring).
    A slice or copy() stays a VSchedule; list(s) does not (PipelineRuntime then takes v_shape=True)."""
    v_shape = True

    def __getitem__(self, i):
        got = super().__getitem__(i)
        return VSchedule(got) if isinstance(i, slice) else got

    def copy(self):
        return VSchedule(self)


def is_v(schedule) -> bool:
    """True for a schedule on the V placement."""
    return getattr(schedule, "v_shape", False)


def check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def stage_of(rank: int, chunk: int, p: int, v_shape: bool = False) -> int:
    """The model stage that `chunk` of `rank` holds; a rank outside 0 .. p-1, or a chunk the placement lacks, is
    refused."""
    check_sizes(p=p)
    known = isinstance(chunk, int) and chunk >= 0 and (chunk < 2 or not v_shape)   # looped: any v
    if not (isinstance(rank, int) and 0 <= rank < p and known):
        raise ValueError(f"rank {rank!r}, chunk {chunk!r} is not a place of the {'V' if v_shape else 'looped'} "
                         f"placement on {p} ranks (ranks 0 .. {p - 1}, chunks {'0 and 1' if v_shape else '0, 1, ..'})")
    return (2 * p - 1 - rank if chunk else rank) if v_shape else chunk * p + rank


def place(stage: int, p: int, v_shape: bool = False) -> tuple[int, int]:
    """(rank, chunk) holding model stage `stage` of 0 .. v p - 1 on p ranks: the inverse of stage_of.

    Every message of a schedule goes from the rank holding stage s to the one holding s + 1 (activations) or s - 1
    (gradients), so this decides the whole message pattern. Graded: the exact pairs for every stage of p = 1 to 5, in
    the looped placement (any v) and in the V (v = 2); and the V's pattern that follows from them: the forward path
    visits ranks 0, 1, .., p - 1, p - 1, .., 1, 0, its one step inside a rank being the turn at the last rank.
    A stage outside 0 .. 2p-1 in the V (or negative) is refused before your part (given).
    """
    check_sizes(p=p)
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0 or (v_shape and stage >= 2 * p):
        raise ValueError(f"stage {stage!r} is not a stage of the {'V on' if v_shape else 'looped placement on'} {p} "
                         f"ranks (0 .. {f'{2 * p - 1}' if v_shape else 'v p - 1'})")
    # <exercise place points=2>
    # hint: invert stage_of case by case: which stages does chunk 0 cover, and in which order does chunk 1 take the
    #       rest? Check your answer by stage_of(*place(s, p, v_shape), p, v_shape) == s.
    if v_shape:
        return (stage, 0) if stage < p else (2 * p - 1 - stage, 1)
    return stage % p, stage // p
    # </exercise>
