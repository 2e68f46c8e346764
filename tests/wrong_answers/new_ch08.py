"""Plausible wrong answers to chapter 08's new exercise (causal_pairs): each must score below full marks."""


def causal_pairs__by_piece_number(q_pos, k_pos):
    """Skips by piece index (j <= i), as if pieces were in sequence order: wrong for the load-balanced layout."""
    return [[j for j in range(len(k_pos)) if j <= i] for i in range(len(q_pos))]


def causal_pairs__no_skipping(q_pos, k_pos):
    """Every pair computed and left to the mask: exact results, but the causal work is not saved."""
    return [list(range(len(k_pos))) for _ in range(len(q_pos))]


def causal_pairs__first_query_only(q_pos, k_pos):
    """Compares with the piece's first query instead of its last: drops pairs that later queries need."""
    q_first, k_first = q_pos.amin(1).tolist(), k_pos.amin(1).tolist()
    return [[j for j, first in enumerate(k_first) if first <= q] for q in q_first]
