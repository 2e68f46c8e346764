"""Train the tiny GPT on the shipped corpus with a data-parallel strategy.

    torchrun --nproc_per_node=4 -m minidist.examples.train --strategy ddp          # one node, 4 ranks
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
             -m minidist.examples.train --strategy ddp                              # two nodes
    python -m minidist.examples.train --strategy ddp --world-size 2                 # no torchrun: minidist.launch

gloo on CPUs, NCCL when every rank has a GPU. Rank 0 shows a progress bar and logs the loss averaged over ranks.
Strategies: ddp (minidist.DataParallel), torch-ddp (PyTorch's DistributedDataParallel), none (each rank alone: what
goes wrong without gradient averaging), zero1 / zero2 (minidist.zero.ZeroOptimizer, stage 1 or 2), zero3 (minidist's
fully_shard on the whole model), fsdp (minidist's fully_shard on each block, then the root), torch-fsdp (PyTorch's
FSDP2 fully_shard, per block). Later chapters add theirs to STRATEGIES.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from minidist import launch, run_under_torchrun
from minidist.data import random_batches, token_ids, train_val_split
from minidist.data_parallel import DataParallel
from minidist.fsdp import fully_shard
from minidist.launch import device
from minidist.models import GPT, GPTConfig, lm_loss
from minidist.testing import replica_divergence
from minidist.zero import ZeroOptimizer


def _torch_ddp(model, args):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, bucket_cap_mb=args.bucket_cap_mb)


def _per_block(shard):
    def wrap(model, args):
        for block in model.blocks:
            shard(block)
        return shard(model)
    return wrap


def _torch_fully_shard(module):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    return fully_shard(module, mesh=init_device_mesh(device().type, (dist.get_world_size(),)))


STRATEGIES = {
    "ddp": lambda model, args: DataParallel(model, bucket_cap_mb=args.bucket_cap_mb),
    "torch-ddp": _torch_ddp,
    "none": lambda model, args: model,
    "zero1": lambda model, args: model,  # ZeroOptimizer (OPTIMIZERS) owns the gradient reduction
    "zero2": lambda model, args: model,
    "zero3": lambda model, args: fully_shard(model),
    "fsdp": _per_block(fully_shard),
    "torch-fsdp": _per_block(_torch_fully_shard),
}
OPTIMIZERS = {  # the optimizer each strategy trains with (default: AdamW on the module's parameters)
    "zero1": lambda model, args: ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=1, lr=args.lr,
                                               bucket_cap_mb=args.bucket_cap_mb),
    "zero2": lambda model, args: ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=args.lr,
                                               bucket_cap_mb=args.bucket_cap_mb),
}
SHARDED = ("zero3", "fsdp", "torch-fsdp")  # each rank holds a shard of the weights: no replicas to compare


def train(args) -> dict:
    rank, n, dev = dist.get_rank(), dist.get_world_size(), device()
    if args.batch_size % n:
        raise ValueError(f"global batch size {args.batch_size} is not divisible by the world size {n}")
    torch.manual_seed(args.seed)
    model = STRATEGIES[args.strategy](GPT(GPTConfig(block_size=args.block_size)).to(dev), args)
    opt = OPTIMIZERS.get(args.strategy, lambda m, a: torch.optim.AdamW(m.parameters(), lr=a.lr))(model, args)
    train_ids, val_ids = train_val_split(token_ids())
    batches = random_batches(train_ids, args.batch_size, args.block_size, args.steps, seed=args.seed)
    progress = None
    if rank == 0 and not args.quiet:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, desc=f"{args.strategy} on {n} ranks", file=sys.stderr)
    losses = []
    for step, (x, y) in enumerate(batches):
        x, y = x.chunk(n)[rank].to(dev), y.chunk(n)[rank].to(dev)   # this rank's slice of the global batch
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # for the log only: the loss averaged over ranks
        losses.append(mean.item() / n)
        if progress:
            progress.update()
            if step % args.log_every == 0 or step == args.steps - 1:
                progress.write(f"step {step:5d}  loss {losses[-1]:.4f}")
    if progress:
        progress.close()
    x, y = random_batches(val_ids, 32, args.block_size, 1, seed=1234)[0]
    with torch.no_grad():
        val = lm_loss(model(x.to(dev)), y.to(dev)).item()
    return {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": val,
            "replica_divergence": None if args.strategy in SHARDED else replica_divergence(model)}


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m minidist.examples.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="ddp")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split across ranks")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-size", type=int, default=2, help="ranks to start when not under torchrun")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        result = run_under_torchrun(train, args)
        rank = int(os.environ["RANK"])
    else:
        result, rank = launch(train, args.world_size, args)[0], 0
    if rank == 0:
        replicas = ("weights sharded over the ranks" if result["replica_divergence"] is None
                    else f"replicas differ by {result['replica_divergence']:.3g}")
        print(f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, validation {result['val_loss']:.3f}, "
              f"{replicas}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
