"""What only a GPU shows (issue 22), run by scripts/gpu_check.sh over NCCL, one rank per GPU:

  ring    the ring all-reduce (and comm.ring_backend's all-reduce) of 64 MiB at 2 ranks: each step's send and
          receive are posted as one batch; posted apart, both ranks' sends would wait for receives queued behind
          them (NCCL runs one pair's operations in order and a large send completes only when its receive runs);
  done    an asynchronous all-reduce's completion time comes from the device (an event recorded after it), not from
          NCCL's future, which completes at enqueue: the flight entry stays open until the device has run it;
  offload ZeRO-2 with its masters and AdamW moments offloaded to the host: a step runs (gradients moved to the
          masters' device, updated shards back to the GPU before the all-gather), the masters stay on the host,
          the model on its GPU, and every rank holds the same updated weights; with a loss scaler and clipping, whose
          host scalars (the inf count, the squared norm) are summed through the GPU, NCCL taking no host tensors.

    python scripts/gpu_checks.py RANKS    # RANKS GPUs; ring needs 2 (it is skipped at 1)
"""
import math
import sys
import time

import torch
import torch.distributed as dist

from minidist import comm, launch
from minidist.comm import flight, ring
from minidist.launch import device, synchronize

MIB64 = 64 * 2 ** 20 // 4   # float32 elements in 64 MiB


def ring_64mib() -> float:
    x = torch.full((MIB64,), float(dist.get_rank() + 1), device=device())
    out = ring.ring_all_reduce(x)
    with comm.ring_backend():
        backend_out = comm.all_reduce_sum(x.clone())
    synchronize()
    expected = dist.get_world_size() * (dist.get_world_size() + 1) / 2
    return max((out - expected).abs().max().item(), (backend_out - expected).abs().max().item())


def completion_time() -> dict:
    x = torch.ones(MIB64, device=device())
    comm.all_reduce_(x.clone())                                      # warm-up (NCCL's communicator)
    synchronize()
    start = time.perf_counter()
    comm.all_reduce_(x)
    synchronize()
    blocking = time.perf_counter() - start
    issued = time.perf_counter()
    work = comm.all_reduce_(x, async_op=True)
    entry_open = not flight.flight_recorder()[-1]["completed"]
    synchronize()
    deadline = time.monotonic() + 10
    while work.completed_at is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    return {"blocking_s": blocking, "async_s": None if work.completed_at is None else work.completed_at - issued,
            "entry_open_after_issue": entry_open, "entry_completed": flight.flight_recorder()[-1]["completed"]}


def offload_step() -> dict:
    from minidist.memory.offload import offload_optimizer
    from minidist.mixed_precision import LossScaler
    from minidist.zero import ZeroOptimizer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8)).to(device())
    before = [p.detach().clone() for p in model.parameters()]
    scaler = LossScaler(init_scale=2.0 ** 10)
    opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=1e-2, scaler=scaler)
    offload_optimizer(opt, "cpu")
    loss = model(torch.randn(4, 256, device=device()) * (dist.get_rank() + 1)).square().mean()
    scaler.scale_loss(loss).backward()
    norm = opt.clip_grad_norm_(1.0)  # host scalars summed over NCCL: through the GPU and back (comm.all_reduce_sum)
    opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = comm.all_gather_cat(flat.unsqueeze(0), None)
    return {"master": opt.master.device.type, "params": {p.device.type for p in model.parameters()},
            "moved": all(not torch.equal(a, p) for a, p in zip(before, model.parameters())),
            "ranks_agree": bool((gathered == gathered[0]).all()), "norm_finite": math.isfinite(norm),
            "skipped": opt.skipped}


def main(ranks: int) -> None:
    failures = []
    if ranks >= 2:
        for r, err in enumerate(launch(ring_64mib, 2, backend="nccl", timeout=120)):
            print(f"ring 64 MiB, rank {r}: max error {err}")
            failures += [f"ring rank {r}"] if err != 0 else []
    else:
        print("ring 64 MiB: needs 2 GPUs, skipped")
    for r, out in enumerate(launch(completion_time, ranks, backend="nccl", timeout=120)):
        print(f"completion, rank {r}: {out}")
        if not (out["entry_open_after_issue"] and out["entry_completed"] and out["async_s"] is not None
                and out["async_s"] >= 0.5 * out["blocking_s"]):
            failures.append(f"completion rank {r}")
    for r, out in enumerate(launch(offload_step, ranks, backend="nccl", timeout=120)):
        print(f"ZeRO-Offload, rank {r}: {out}")
        if not (out["master"] == "cpu" and out["params"] == {"cuda"} and out["moved"] and out["ranks_agree"]
                and out["norm_finite"] and out["skipped"] == 0):
            failures.append(f"offload rank {r}")
    if failures:
        sys.exit(f"gpu checks failed: {', '.join(failures)}")
    print("gpu checks passed")


if __name__ == "__main__":
    main(int(sys.argv[1]))
