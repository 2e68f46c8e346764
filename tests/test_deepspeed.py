"""DeepSpeed ZeRO stages 1, 2 and 3 as references, in one launch (DeepSpeed's start-up is the slow part)."""
from minidist.tour.zero import ADAM_TOL5, side_by_side_with_deepspeed


def test_each_stage_equals_deepspeed_zero():
    for diffs in side_by_side_with_deepspeed(2):
        assert set(diffs) == {1, 2, 3}
        assert all(d < ADAM_TOL5 for d in diffs.values()), diffs
