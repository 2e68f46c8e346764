"""Plausible wrong answers to chapter 11's new exercise (column_rows): each must score below full marks."""


def column_rows__one_contiguous_block(out_features, local_out, chunks, rank, valid_out):
    """One contiguous block of global rows (chapter 04's common mistake, cutting q|k|v contiguously)."""
    return [(rank * local_out, 0, valid_out if chunks == 1 else local_out)]


def column_rows__saves_the_padding(out_features, local_out, chunks, rank, valid_out):
    """Every row of the shard saved, the vocabulary padding included: rows past the end of the global tensor."""
    per, block = local_out // chunks, out_features // chunks
    return [(c * block + rank * per, c * per, per) for c in range(chunks)]
