"""Continuous batching: requests join the running batch at the next decoding step, and leave it when they are done.

Static batching waits for a batch of requests, runs it until its *longest* request is finished, and only then takes
new ones: a 4-token answer batched with a 200-token one holds its slot (and its caller) for 200 steps, and requests
arriving meanwhile wait for the whole batch. Continuous (iteration-level) batching (Yu et al. 2022, "Orca")
schedules every decoding step anew:

    each step:  1. admit   waiting requests take free KV-cache slots; each is prefilled (its prompt in one pass,
                           which also gives its first token)
                2. decode  one token for every other running request, all of them in one batched forward
                3. retire  requests that have all their tokens leave; their slots are free at the next step

The batch size changes every step, and a short request leaves as soon as it is done. Decoding is memory-bound
(inference.py), so a step with 8 rows costs little more than one with 1: that is where the throughput comes from.
The KV cache is a fixed pool of `slots` sequences of the model's context length; each running request owns one slot
(paged attention, Kwon et al. 2023, "vLLM", instead cuts the cache into small blocks so that a request holds only
as many as its length needs).

An Engine runs on every rank of a tensor-parallel replica in lockstep: the ranks add the same requests in the same
order (cluster.py broadcasts them), so they take the same slots and sample the same tokens. On one rank (lockstep
False), a request whose prefill fails, or a decoding step that fails, does not stop the engine: the requests
concerned leave with `error` set and their slots are freed. In lockstep (tensor-parallel) the same error ends the
engine: a rank that raised mid-forward has left its peers inside a collective it will never join, and a rank whose
state differs from its peers' cannot serve with them; the replica fails as a whole (cluster.py: 503, and the server
exits for its supervisor to restart it) rather than answer garbage or hang.

cancel(rid) takes a request out (its caller gave up: the HTTP request timed out): it leaves at the next step with
error CANCELLED and the tokens it had, its slot free for the others.
"""
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .inference import KVCache, check_request, context_length, forward_cached, n_layers, sample_next

CANCELLED = "cancelled: its caller stopped waiting"


@dataclass
class Request:
    """One generation request, and what the engine did with it."""
    rid: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    length: int = 0                       # tokens of this request in its KV-cache slot
    generator: torch.Generator | None = field(default=None, repr=False)
    admitted_at: float | None = None      # time.time() of the prefill
    first_token_at: float | None = None
    finished_at: float | None = None
    admitted_step: int | None = None      # the engine's step counter at its prefill, and when it left
    finished_step: int | None = None
    error: str | None = None              # why it failed, if it did (it leaves with the tokens it had)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens or self.error is not None


class Engine:
    """Continuous batching over `slots` KV-cache slots of `model` (a GPT or a Hugging Face Llama, parallelized or
    not). add() queues a request; step() runs one scheduling step and returns the requests it finished."""

    def __init__(self, model, slots: int = 8, vocab_size: int | None = None, lockstep: bool = False):
        self.model, self.context = model.eval(), context_length(model)
        self.vocab_size, self.lockstep, self.cancelled = vocab_size, lockstep, []
        self.cache = KVCache(n_layers(model), slots, self.context)
        self.device = next(model.parameters()).device
        self.free, self.waiting, self.running = list(range(slots)), deque(), {}
        self.steps, self.batch_sizes, self.tokens_last_step = 0, [], 0

    def add(self, request: Request) -> None:
        check_request(len(request.prompt), request.max_new_tokens, request.temperature, self.context, request.seed)
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in request.prompt):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        request.generator = torch.Generator().manual_seed(request.seed)
        self.waiting.append(request)

    def idle(self) -> bool:
        return not self.waiting and not self.running and not self.cancelled

    def cancel(self, rid: int) -> bool:
        """Take request `rid` out, waiting or running (its slot is freed now); it leaves at the next step with error
        CANCELLED. False if the engine does not hold it (finished already)."""
        for r in list(self.waiting):
            if r.rid == rid:
                self.waiting.remove(r)
                break
        else:
            r = next((r for r in self.running.values() if r.rid == rid), None)
            if r is None:
                return False
            del self.running[r.slot]
            self.free.append(r.slot)
        r.error = CANCELLED
        self.cancelled.append(r)
        return True

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit, decode, retire (module docstring); returns the requests finished in this step."""
        finished, self.cancelled = self.cancelled, []                  # cancelled since the last step
        finished += [r for r in self.waiting if r.max_new_tokens == 0]  # nothing to generate: done at once
        self.waiting = deque(r for r in self.waiting if r.max_new_tokens > 0)
        decoding = list(self.running.values())                      # admitted before this step
        before = sum(len(r.output) for r in decoding)
        admitted = 0
        while self.waiting and self.free:
            r = self.waiting.popleft()
            _guarded(self._prefill, r, [r], self.lockstep)
            admitted += r.error is None
        if decoding:
            _guarded(self._decode, decoding, decoding, self.lockstep)
        self.batch_sizes.append(len(decoding))
        self.tokens_last_step = admitted + sum(len(r.output) for r in decoding) - before  # the tokens made this step
        self.steps += 1
        now = time.time()
        for r in [r for r in self.running.values() if r.done]:
            r.finished_at = now
            del self.running[r.slot]
            self.free.append(r.slot)
            finished.append(r)
        for r in finished:
            r.finished_at, r.finished_step = r.finished_at or now, self.steps - 1
        return finished

    def _prefill(self, r: Request) -> None:
        r.slot, r.admitted_at, r.admitted_step = self.free.pop(0), time.time(), self.steps
        self.running[r.slot] = r                                          # even if it fails: retired like the rest
        ids = torch.tensor([r.prompt], device=self.device)                # (1, P)
        logits = forward_cached(self.model, ids, self.cache, torch.tensor([r.slot]),   # slots, starts on the host
                                torch.zeros(1, dtype=torch.long))
        r.length = len(r.prompt)
        r.output.append(int(sample_next(logits, [r.temperature], [r.generator])[0]))
        r.first_token_at = time.time()

    def _decode(self, rows: list[Request]) -> None:
        ids = torch.tensor([[r.output[-1]] for r in rows], device=self.device)  # (R, 1): each row's last token
        slots = torch.tensor([r.slot for r in rows])                            # on the host (forward_cached)
        starts = torch.tensor([r.length for r in rows])                         # where that token goes
        logits = forward_cached(self.model, ids, self.cache, slots, starts)     # (R, V)
        tokens = sample_next(logits, [r.temperature for r in rows], [r.generator for r in rows])
        for r, t in zip(rows, tokens.tolist()):
            r.output.append(t)
            r.length += 1


def _guarded(work, arg, requests: list[Request], lockstep: bool = False) -> None:
    """work(arg); if it raises, the requests it was for fail with its message (the engine goes on), unless the
    engine runs in lockstep with peers (module docstring): then the error ends it."""
    try:
        work(arg)
    except torch.distributed.DistError:  # the ranks cannot talk any more: that ends the replica, not a request
        raise
    except Exception as e:  # noqa: BLE001  (on one rank a request must never stop the engine: its caller is told)
        if lockstep:  # peers may wait in a collective this rank left: the replica fails, not the request
            raise
        for r in requests:
            r.error = f"{type(e).__name__}: {e}"
