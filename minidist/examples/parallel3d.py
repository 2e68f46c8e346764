"""--strategy 3d: the tiny GPT on a dp x pp x cp x tp device mesh (chapter 08, minidist.parallel3d.ParallelRun).

    torchrun --nproc_per_node=8 -m minidist.examples.train --strategy 3d --dp 2 --pp 2 --tp 2
    python -m minidist.examples.train --strategy 3d --dp 2 --cp 2 --tp 2 --world-size 8

Context parallelism, tensor parallelism, the pipeline (--schedule, --microbatches) and ZeRO on the data-parallel axis
(--zero-stage 1; 0: plain all-reduce) are applied by ParallelRun from the mesh: nothing is wired by hand here. At the
end every rank gathers the trained weights into one dense model (shards over tp, stages over pp) and evaluates it.
"""
import sys

import torch
import torch.distributed as dist

from minidist.args import nonnegative_int, positive_int
from minidist.data import random_batches, token_ids, train_val_split
from minidist.launch import device
from minidist.mesh import Mesh
from minidist.models import GPT, GPTConfig, lm_loss


def add_arguments(p) -> None:
    for axis, what in (("dp", "data-parallel replicas"), ("pp", "pipeline stages"),
                       ("cp", "context-parallel ranks (ring attention)"), ("tp", "tensor-parallel ranks")):
        p.add_argument(f"--{axis}", type=positive_int, default=1, help=f"3d: {what}")
    p.add_argument("--zero-stage", type=nonnegative_int, choices=[0, 1], default=1,
                   help="3d: 1 = ZeRO-1 on the data-parallel axis, 0 = all-reduce")


def problems(args, world: int) -> list[str]:
    """Why this mesh cannot run on `world` ranks (examples/preflight.py says it before any rank starts)."""
    size = args.dp * args.pp * args.cp * args.tp
    found = []
    if size != world:
        found.append(f"dp x pp x cp x tp = {args.dp}x{args.pp}x{args.cp}x{args.tp} = {size} ranks, but the world "
                        f"has {world} (pass --world-size {size}, or torchrun --nproc_per_node={size})")
    if args.batch_size % (args.dp * args.microbatches):
        found.append(f"--batch-size {args.batch_size} does not split into dp={args.dp} x "
                        f"{args.microbatches} micro-batches")
    if args.block_size % (2 * args.cp):
        found.append(f"--block-size {args.block_size} does not cut into 2 x cp = {2 * args.cp} chunks")
    if args.schedule == "interleaved":
        found.append("--schedule interleaved is not supported by --strategy 3d (one pipeline stage per rank)")
    if 4 % args.tp:
        found.append(f"the tiny GPT's 4 heads do not split over tp={args.tp}")
    if args.n_layer is not None and args.n_layer < args.pp:
        found.append(f"--n-layer {args.n_layer} blocks cannot fill pp={args.pp} pipeline stages")
    return found


def train_3d(args) -> dict:
    from minidist.examples.progress import log_step, progress_bar
    from minidist.parallel3d import ParallelRun, mean_loss
    mesh, dev = Mesh.build(dp=args.dp, pp=args.pp, cp=args.cp, tp=args.tp), device()
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.n_layer or max(2, args.pp))
    torch.manual_seed(args.seed)
    run = ParallelRun(GPT(cfg).to(dev), mesh, lr=args.lr, schedule=args.schedule, microbatches=args.microbatches,
                      zero_stage=args.zero_stage)
    train_ids, val_ids = train_val_split(token_ids())
    shape = "x".join(f"{a}{s}" for a, s in mesh.shape.items() if s > 1) or "1 rank"
    progress, losses = progress_bar(args, f"3d {shape}"), []
    for step, (x, y) in enumerate(random_batches(train_ids, args.batch_size, args.block_size, args.steps,
                                                 seed=args.seed, vocab_size=cfg.vocab_size)):
        losses.append(mean_loss(run.step(x.to(dev), y.to(dev)), mesh))
        log_step(progress, args, step, losses[-1])
    divergence = run.replica_divergence()
    dense = GPT(cfg).to(dev)
    with torch.no_grad():
        for name, tensor in run.dense_parameters().items():
            dense.get_parameter(name).copy_(tensor)
        x, y = random_batches(val_ids, 32, args.block_size, 1, seed=1234)[0]
        val = lm_loss(dense(x.to(dev)), y.to(dev)).item()
    dist.barrier()
    return {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": val, "replica_divergence": divergence}


if __name__ == "__main__":
    from minidist.examples.train import main
    sys.exit(main(["--strategy", "3d", *sys.argv[1:]]))
