"""Mixed-precision training with fp16: a dynamic loss scaler and fp32 master weights (Micikevicius et al. 2018).

fp16 has 10 mantissa bits and a smallest normal number of 6e-5: small gradients underflow to zero. So the loss is
multiplied by a large *scale* S before backward (every gradient is scaled by S too, lifting it out of the underflow
zone) and the gradients are divided by S again, in fp32, before the update. S is chosen dynamically:
    an inf or nan in any gradient: the step is skipped and S is multiplied by backoff_factor (0.5);
    growth_interval (2000) good steps in a row: S is multiplied by growth_factor (2).
This is the policy of torch.amp.GradScaler, which the tests compare against step for step.

The update itself happens on an fp32 *master copy* of the weights: an fp16 weight of magnitude 1 cannot change by
less than 1e-3, so small updates would be lost. The model runs in fp16; after each step the master weights are
copied (rounded) back into it. Memory: 2 + 2 bytes per parameter in fp16 plus 4 + 8 in fp32 (master + Adam); the
fp32 copy of the gradients (4 more) exists only inside step().
With data parallelism, gradients are all-reduced in fp16 (divided by N first, so the sum cannot overflow where the
mean would not); every rank then sees the same inf/nan and skips the same steps.
bf16 has fp32's exponent range, so it needs no loss scaling: torch.autocast("cpu", dtype=torch.bfloat16) suffices.
"""
import math

import torch

from . import comm


def update_scale(scale: float, good_steps: int, found_inf: bool, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> tuple[float, int]:
    """One update of the dynamic loss scale: returns (new scale, new count of good steps in a row).

    The policy of torch.amp.GradScaler: on an overflow, multiply the scale by backoff_factor and start counting good
    steps again; after growth_interval good steps in a row, multiply it by growth_factor and start counting again.
    Graded: by hand, and step for step against GradScaler driven through overflows, with bit-identical weights.
    """
    # <exercise loss_scale_update points=1>
    # hint: an overflow resets the count of good steps; reaching growth_interval good steps also resets it.
    if found_inf:
        return scale * backoff_factor, 0
    good_steps += 1
    if good_steps == growth_interval:
        return scale * growth_factor, 0
    return scale, good_steps
    # </exercise>


def unscale_and_check_(grads: list[torch.Tensor], scale: float, agree: bool = False, group=None) -> bool:
    """Divide the fp32 gradients by `scale` in place; True if they hold an inf or nan.

    One host synchronization for all the tensors (not one per tensor). With `agree`, the answer is agreed by every
    rank of `group` (one small all-reduce): ranks that hold different shards of the gradients (ZeRO) must still skip
    the same steps, or their weights drift apart. Graded: the divided values, a Python bool (checked with `is`) for
    inf, -inf, nan and finite gradients, and on 3 ranks where only one holds an inf: False/True without/with agree.
    """
    # <exercise unscale_and_check points=2>
    # hint: keep the check on the device: one 0-dim tensor that counts the non-finite gradients, read with .item()
    #       once at the end.
    # hint: with `agree`, sum that count over the group with comm.all_reduce_sum (from minidist import comm)
    #       before reading it.
    bad = torch.zeros((), device=grads[0].device if grads else None)
    for g in grads:
        g.mul_(1.0 / scale)
        bad += (~torch.isfinite(g)).any()
    if agree:
        bad = comm.all_reduce_sum(bad, group)
    return bool(bad.item() > 0)
    # </exercise>


def clip_grad_norm_(grads: list[torch.Tensor], max_norm: float, sharded: bool = False, group=None) -> float:
    """Scale the gradients in place so their global L2 norm is at most `max_norm`; returns the norm before clipping.

    As torch.nn.utils.clip_grad_norm_: factor min(1, max_norm / (norm + 1e-6)). With `sharded`, each rank of `group`
    holds a *shard* of one gradient (ZeRO): the squared norms are summed over the ranks first, so every rank clips by
    the same factor. Clip *after* unscaling: the scaled gradients' norm is S times too large. Graded: the returned
    norm (a float) and the clipped values against torch.nn.utils.clip_grad_norm_ at three bounds, gradients within
    the bound left bit for bit untouched, and on 3 ranks holding shards, the global norm and the common factor.
    """
    # <exercise clip_grad_norm points=2>
    # hint: the global norm is the square root of the sum of every tensor's squared norm (in fp32).
    # hint: leave the gradients untouched when the norm is already within max_norm (the factor is capped at 1).
    device = grads[0].device if grads else None
    squares = sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros((), device=device))
    if sharded:
        squares = comm.all_reduce_sum(squares, group)
    norm = squares.sqrt()
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(factor.to(g.dtype))
    return norm.item()
    # </exercise>


class LossScaler:
    """Dynamic loss scaling: scale_loss(loss) before backward; unscale_(grads) -> found_inf; update(found_inf)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1")
        self.scale, self.good_steps = float(init_scale), 0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, grads: list[torch.Tensor], agree: bool = False, group=None) -> bool:
        """Divide the gradients by the scale in place; True if any of them (on any rank, with `agree`) is inf/nan."""
        return unscale_and_check_(list(grads), self.scale, agree, group)

    def update(self, found_inf: bool) -> None:
        scale, self.good_steps = update_scale(self.scale, self.good_steps, found_inf, self.growth_factor,
                                              self.backoff_factor, self.growth_interval)
        self.scale = scale if math.isfinite(scale) else self.scale  # never grow into inf (GradScaler does the same)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


class MixedPrecisionOptimizer:
    """Run `optimizer_class` on fp32 master copies of an fp16 (or bf16) model's trainable parameters.

        opt = MixedPrecisionOptimizer(model_fp16, torch.optim.Adam, lr=1e-3)
        opt.scaler.scale_loss(loss).backward()
        opt.unscale_()                 # optional: fp32 master gradients, unscaled, checked for inf/nan
        opt.clip_grad_norm_(1.0)       # optional: clip the *unscaled* gradients
        stepped = opt.step()           # unscales first if you did not; skips the step on inf/nan
        opt.zero_grad()

    `agree=True` agrees on inf/nan across `group` (needed when ranks hold different gradients: sharded ones, or
    before a data-parallel average). The model's gradients are copied, never unscaled in place: an fp32 model's
    `.grad` (a view into DataParallel's buckets, say) is left as it was.
    """

    def __init__(self, model: torch.nn.Module, optimizer_class, scaler: LossScaler | None = None,
                 agree: bool = False, group=None, **kwargs):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.optimizer = optimizer_class(self.master, **kwargs)
        self.scaler = scaler or LossScaler()
        self.agree, self.group = agree, group
        self.skipped, self._found_inf = 0, None  # _found_inf: None until unscale_() in this step

    def unscale_(self) -> bool:
        """Copy the model's gradients into fp32 master gradients and unscale them; True on inf/nan."""
        if self._found_inf is None:
            for master, p in zip(self.master, self.params):
                master.grad = None if p.grad is None else p.grad.to(master.device, torch.float32, copy=True)
            grads = [m.grad for m in self.master if m.grad is not None]
            self._found_inf = self.scaler.unscale_(grads, self.agree, self.group)
        return self._found_inf

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the unscaled master gradients to a global norm of `max_norm`; returns the norm before clipping."""
        self.unscale_()
        return clip_grad_norm_([m.grad for m in self.master if m.grad is not None], max_norm)

    def step(self) -> bool:
        """Unscale (if not done yet); on inf/nan skip the step; else update the masters and copy them back."""
        found_inf = self.unscale_()
        self.scaler.update(found_inf)
        self._found_inf = None
        if found_inf:
            self.skipped += 1
            for m in self.master:
                m.grad = None
            return False
        self.optimizer.step()
        with torch.no_grad():
            for p, master in zip(self.params, self.master):
                p.copy_(master)  # round the fp32 master to the model's precision
                master.grad = None  # the fp32 gradients are not kept between steps
        return True

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.optimizer.zero_grad()

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """For memory.measure_state_bytes: the fp32 master weights (and their gradients inside a step) and the
        wrapped optimizer's per-element states, held beyond the model."""
        states = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        return {"grads": [m.grad for m in self.master if m.grad is not None], "optimizer": [*self.master, *states]}
