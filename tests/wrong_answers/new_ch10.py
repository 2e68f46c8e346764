"""Plausible wrong answers to chapter 10's new exercise (initial_qs): each must score below full marks."""
import torch

from minidist.compression.powersgd import orthogonalize_


def initial_qs__global_random_stream(ms, state):
    """Draws from the global stream (common mistakes: a different random Q on every rank)."""
    return [orthogonalize_(torch.randn(m.shape[1], min(*m.shape, state.matrix_approximation_rank), dtype=m.dtype),
                           state.orthogonalization_epsilon) for m in ms]


def initial_qs__reseeds_the_global_generator(ms, state):
    """Reseeds the global generator (torch's Q's, but every later draw of training restarts from it)."""
    torch.manual_seed(int(state.rng.randint(1_000_000_000)))
    return [orthogonalize_(torch.randn(m.shape[1], min(*m.shape, state.matrix_approximation_rank), dtype=m.dtype),
                           state.orthogonalization_epsilon) for m in ms]


def initial_qs__a_seed_per_matrix(ms, state):
    """Draws a new shared seed for every matrix: the same on every rank, but not the Q's torch's hook uses."""
    qs = []
    for m in ms:
        g = torch.Generator().manual_seed(int(state.rng.randint(1_000_000_000)))
        q = torch.randn(m.shape[1], min(*m.shape, state.matrix_approximation_rank), generator=g, dtype=m.dtype)
        qs.append(orthogonalize_(q, state.orthogonalization_epsilon))
    return qs


def initial_qs__not_orthogonalized(ms, state):
    """Skips the orthogonalization: the first power-iteration step starts from a skewed basis."""
    g = torch.Generator().manual_seed(int(state.rng.randint(1_000_000_000)))
    return [torch.randn(m.shape[1], min(*m.shape, state.matrix_approximation_rank), generator=g, dtype=m.dtype)
            for m in ms]
