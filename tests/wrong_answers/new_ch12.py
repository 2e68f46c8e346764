"""Plausible wrong answers to chapter 12's new exercise (busy_seconds): each must score below full marks."""


def busy_seconds__sum_of_durations(intervals):
    """Adds every interval's length: two collectives in flight at once count twice."""
    return sum(end - start for start, end in intervals)


def busy_seconds__first_start_to_last_end(intervals):
    """The span from the first start to the last end: the gaps between collectives count as communication."""
    return max(e for _, e in intervals) - min(s for s, _ in intervals) if intervals else 0.0


def busy_seconds__reach_moves_back(intervals):
    """Merges in order of start but lets an interval nested in the previous one pull the reach back."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reach))
        reach = end
    return total
