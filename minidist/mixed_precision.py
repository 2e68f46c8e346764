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
import torch


def update_scale(scale: float, good_steps: int, found_inf: bool, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> tuple[float, int]:
    """One update of the dynamic loss scale: returns (new scale, new count of good steps in a row)."""
    # <exercise loss_scale_update points=1>
    # hint: an overflow resets the count of good steps; reaching growth_interval good steps also resets it.
    if found_inf:
        return scale * backoff_factor, 0
    good_steps += 1
    if good_steps == growth_interval:
        return scale * growth_factor, 0
    return scale, good_steps
    # </exercise>


class LossScaler:
    """Dynamic loss scaling: scale(loss) before backward; unscale_(grads) -> found_inf; update(found_inf)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1")
        self.scale, self.good_steps = float(init_scale), 0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, grads: list[torch.Tensor]) -> bool:
        """Divide the gradients by the scale in place; True if any of them holds an inf or nan."""
        found_inf = False
        for g in grads:
            g.mul_(1.0 / self.scale)
            found_inf |= not bool(torch.isfinite(g).all())
        return found_inf

    def update(self, found_inf: bool) -> None:
        self.scale, self.good_steps = update_scale(self.scale, self.good_steps, found_inf, self.growth_factor,
                                                   self.backoff_factor, self.growth_interval)


class MixedPrecisionOptimizer:
    """Run `optimizer_class` on fp32 master copies of an fp16 (or bf16) model's trainable parameters.

        opt = MixedPrecisionOptimizer(model_fp16, torch.optim.Adam, lr=1e-3)
        opt.scaler.scale_loss(loss).backward(); stepped = opt.step(); opt.zero_grad()
    """

    def __init__(self, model: torch.nn.Module, optimizer_class, scaler: LossScaler | None = None, **kwargs):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.optimizer = optimizer_class(self.master, **kwargs)
        self.scaler = scaler or LossScaler()
        self.skipped = 0

    def step(self) -> bool:
        """Unscale the gradients in fp32; skip the step on inf/nan; else update the masters and copy them back.

        The model's gradients are read, not kept: call zero_grad() before the next backward.
        """
        grads = [None if p.grad is None else p.grad.float() for p in self.params]
        found_inf = self.scaler.unscale_([g for g in grads if g is not None])
        self.scaler.update(found_inf)
        if found_inf:
            self.skipped += 1
            return False
        for master, g in zip(self.master, grads):
            master.grad = g
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
