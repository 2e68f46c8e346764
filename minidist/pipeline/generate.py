"""Pipeline-parallel generation: the model cut into stages (chapter 07's `rank_stages`), requests in micro-batches.

Each rank holds one stage and the KV cache of its own layers. A decoding step of one micro-batch flows through the
stages like a training forward: stage 0 embeds the tokens, every stage runs its blocks and sends its output (b, T, C)
to the next, and the last stage computes the logits, samples the next tokens and sends them (b token ids) back to
stage 0, which needs them for the next step. One micro-batch alone would leave p - 1 of the p stages idle at every
moment; with m >= p micro-batches in flight, stage 0 starts micro-batch j + 1 while the later stages work on j,
and the pipeline stays full across steps (each micro-batch has its own KV cache, so they are independent).

    rank 0:  [mb0 s0][mb1 s0][mb2 s0]  ...   [mb0 s1][mb1 s1] ...      (waits for mb0's token from the last stage)
    rank 1:          [mb0 s0][mb1 s0][mb2 s0]        [mb0 s1] ...

Bytes, summed over the p ranks, for B rows, a prompt of P tokens and n new tokens (fp32 activations of width C):

    (p - 1) * 4 * C * B * (P + n - 1)     activations across the p - 1 boundaries (the prompt, then 1 token per step)
    + 8 * B * (n - 1)                     sampled tokens (int64) from the last stage back to the first

Messages are posted with isend and only waited for at the end, so a rank only ever waits in a receive, for a
message an earlier step of its sender posts: no cycle, no deadlock (the argument of pipeline/runtime.py). At p = 2
the first and the last stage are one pair, and on NCCL one pair's operations run in the order posted, a send
completing only when its receive runs: stage 0 posts its m activations, then receives token 0; so stage 1 posts its
receives of a micro-batch's activations one step ahead (all m at step 0, then each right after the token it sends),
and the two ranks post their messages in the same order (MINIDIST_STRICT_P2P=1 checks it; the receive posted only
when needed deadlocked there).
"""
import torch
import torch.distributed as dist

from .. import comm
from ..serving.inference import KVCache, check_request, forward_cached, sample_next
from .stages import rank_stages


def pp_generate_bytes(p: int, hidden: int, batch: int, prompt: int, new: int) -> int:
    """The formula above: bytes all ranks together send in pipeline_generate."""
    if p == 1:
        return 0
    return (p - 1) * 4 * hidden * batch * (prompt + new - 1) + 8 * batch * (new - 1)


@torch.no_grad()
def pipeline_generate(model, input_ids: torch.Tensor, max_new_tokens: int, microbatches: int, group=None,
                      temperature: float = 0.0, seed: int = 0) -> torch.Tensor | None:
    """generate() with `model` (a minidist GPT, the same weights on every rank) cut into one stage per rank of
    `group`; the batch runs as `microbatches` micro-batches. Returns the (B, max_new_tokens) new tokens on the last
    stage's rank, None on the others. Row b samples with a generator seeded with seed + b, as generate() does."""
    p, rank = comm.group_size(group), dist.get_rank(group)
    B, P = input_ids.shape
    if not isinstance(microbatches, int) or microbatches < 1 or B % microbatches:
        raise ValueError(f"a batch of {B} rows cannot be cut into {microbatches} equal micro-batches")
    for row_seed in (seed, seed + B - 1):                    # row b samples with seed + b
        check_request(P, max_new_tokens, temperature, model.cfg.block_size, row_seed)
    model.eval()
    stage, b = rank_stages(model, p, rank)[0], B // microbatches
    device = next(stage.parameters()).device
    rows = input_ids.to(device).chunk(microbatches)
    caches = [KVCache(len(stage.blocks), b, P + max_new_tokens) for _ in range(microbatches)]
    generators = [torch.Generator().manual_seed(seed + r) for r in range(B)]
    slots = torch.arange(b)                                             # on the host (forward_cached)
    tokens, sends = [[] for _ in range(microbatches)], []
    width = model.cfg.n_embd
    inbox = [] if stage.first else [comm.irecv(torch.empty(b, P, width, device=device), rank - 1, group)
                                    for _ in range(microbatches)]   # step 0's activations, posted ahead
    for step in range(max_new_tokens):
        T = P if step == 0 else 1
        starts = torch.full((b,), 0 if step == 0 else P + step - 1, dtype=torch.long)
        for j in range(microbatches):
            ids, x = None, None
            if stage.first:
                ids = rows[j] if step == 0 else _token_for(j, tokens, p, group, b, device).view(b, 1)
            else:
                x = inbox[j].wait()                                                          # (b, T, C)
            out = forward_cached(stage, ids, caches[j], slots, starts, stage_input=x)
            if not stage.last:
                sends.append(comm.isend(out.contiguous(), rank + 1, group))
            else:
                token = sample_next(out, [temperature] * b, generators[j * b:(j + 1) * b])  # (b,)
                tokens[j].append(token)
                if p > 1 and step < max_new_tokens - 1:
                    sends.append(comm.isend(token.to(device), 0, group))
            if not stage.first and step < max_new_tokens - 1:   # the next step's activations (b, 1, C), posted ahead
                inbox[j] = comm.irecv(torch.empty(b, 1, width, device=device), rank - 1, group)
    for work in sends:
        work.wait()
    if not stage.last:
        return None
    return torch.cat([torch.stack(t, dim=1) for t in tokens]) if max_new_tokens else input_ids.new_zeros(B, 0)


def _token_for(j: int, tokens: list, p: int, group, b: int, device) -> torch.Tensor:
    """Micro-batch j's latest token on the first stage: its own when it is also the last, else received."""
    if p == 1:
        return tokens[j][-1].to(device)
    return comm.recv(torch.empty(b, dtype=torch.long, device=device), p - 1, group)
