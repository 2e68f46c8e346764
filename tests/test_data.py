"""The shipped corpus, the local tokenizer, batches, and a loss that visibly falls."""
import math

import pytest
import torch

from minidist.data import corpus_files, load_texts, random_batches, token_ids, tokenizer, train_val_split
from minidist.models import GPT, lm_loss


def test_corpus_is_shipped_and_loads_through_datasets():
    assert len(corpus_files()) == 8
    texts = load_texts()
    assert len(texts) == 8 and sum(map(len, texts)) > 1_000_000
    assert any("To be, or not to be" in t for t in texts)


def test_tokenizer_is_local_deterministic_and_round_trips():
    tok = tokenizer()
    assert tok.get_vocab_size() == 512
    text = "Now is the winter of our discontent, ü€ 42"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: anything encodes
    ids = token_ids()
    assert ids.dtype == torch.long and int(ids.max()) < 512 and len(ids) > 400_000


def test_batches_are_deterministic_windows_with_shifted_targets():
    ids = torch.arange(1000)
    a, b = random_batches(ids, 4, 16, steps=3, seed=1), random_batches(ids, 4, 16, steps=3, seed=1)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    x, y = a[0]
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)  # the next token (ids are 0..999 in order)


def test_too_short_a_stream_is_a_clear_error():
    with pytest.raises(ValueError, match="shorter than one window"):
        random_batches(torch.arange(10), 2, 16, steps=1)


def test_the_tiny_gpt_learns_the_corpus():
    torch.manual_seed(0)
    train, val = train_val_split(token_ids())
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for x, y in random_batches(train, 16, 64, steps=150):
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    x, y = random_batches(val, 32, 64, steps=1, seed=99)[0]
    with torch.no_grad():
        val_loss = lm_loss(model(x), y).item()
    assert losses[0] == pytest.approx(math.log(512), abs=0.3)
    assert sum(losses[-10:]) / 10 < 4.6 and val_loss < 4.8  # from 6.2: visibly learning


def test_ids_outside_the_models_vocabulary_are_refused_on_the_host():
    # On a GPU such an id would end the run in a device-side assert naming nothing; here it is named before any step.
    from minidist.data import vocab_size_of
    from minidist.models import GPTConfig
    model = GPT(GPTConfig(vocab_size=300))
    assert vocab_size_of(torch.nn.Sequential(model)) == 300  # through a wrapper
    ids = torch.arange(400)
    with pytest.raises(ValueError, match=r"token id .*vocabulary of 300.* 300 is outside the vocabulary \[0, 300\)"):
        random_batches(ids, 2, 8, 1, vocab_size=vocab_size_of(model))
    assert len(random_batches(ids % 300, 2, 8, 1, vocab_size=300)) == 1
    with pytest.raises(ValueError, match="Linear has no embedding"):
        vocab_size_of(torch.nn.Linear(2, 2))
