"""--strategy ep: a tiny Mixtral-style model trained with expert parallelism (chapter 13, minidist.moe).

    torchrun --nproc_per_node=2 -m minidist.examples.train --strategy ep
    python -m minidist.examples.train --strategy ep --ep 2 --world-size 4      # dp 2 x ep 2

The model is Hugging Face's MixtralForCausalLM built from models.TINY_MIXTRAL (4 experts, top-2, random weights)
with minidist's MoE in its blocks. The experts are sharded over --ep ranks (default: all of them) and replicated over
the world / ep groups of ranks that hold the same block; everything else is replicated on every rank. Each rank
trains on its slice of the global batch (cross-entropy + 0.02 x the load-balancing losses); after backward,
reduce_gradients all-reduces the replicated parameters over every rank and the experts over their replicas only.
"""
import sys

import torch
import torch.distributed as dist

from minidist import comm
from minidist.args import positive_int
from minidist.data import random_batches, token_ids, train_val_split, vocab_size_of
from minidist.launch import device
from minidist.mesh import Mesh


def add_arguments(p) -> None:
    p.add_argument("--ep", type=positive_int, default=None, help="ep: expert-parallel ranks (default: all)")


def problems(args, world: int) -> list[str]:
    """Why expert parallelism cannot run on `world` ranks (examples/preflight.py says it before any rank starts)."""
    from minidist.models import TINY_MIXTRAL
    ep, experts, found = args.ep or world, TINY_MIXTRAL["num_local_experts"], []
    if world % ep:
        found.append(f"--ep {ep} does not divide the world of {world} ranks")
    if experts % ep:
        found.append(f"the tiny Mixtral's {experts} experts are not divisible by the expert-parallel size {ep}")
    if args.batch_size % world:
        found.append(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    if args.block_size > TINY_MIXTRAL["max_position_embeddings"]:
        found.append(f"--block-size {args.block_size} is longer than the tiny Mixtral's "
                     f"{TINY_MIXTRAL['max_position_embeddings']} positions")
    return found


def train_ep(args) -> dict:
    from minidist.examples.progress import log_step, progress_bar
    from minidist.moe import expert_parallel, reduce_gradients
    from minidist.tour.moe_train import lm_step, mixtral
    world, rank, dev = dist.get_world_size(), dist.get_rank(), device()
    ep = args.ep or world
    mesh = Mesh.from_axes([("replicate", world // ep), ("ep", ep)])
    replicate = mesh.group("replicate") if world > ep else None
    model, layers = mixtral(args.seed)
    model.to(dev)
    for layer in layers:
        expert_parallel(layer, mesh.group("ep"), replicate)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    train_ids, val_ids = train_val_split(token_ids())
    progress, losses = progress_bar(args, f"ep {ep} x replicas {world // ep}"), []
    for step, (x, y) in enumerate(random_batches(train_ids, args.batch_size, args.block_size, args.steps,
                                                 seed=args.seed, vocab_size=vocab_size_of(model))):
        x, y = x.chunk(world)[rank].to(dev), y.chunk(world)[rank].to(dev)   # this rank's slice
        loss = lm_step(model, layers, x, y)
        loss.backward()
        reduce_gradients(model, None, replicate)
        opt.step()
        opt.zero_grad()
        losses.append(comm.all_reduce_sum(loss.detach()).item() / world)
        log_step(progress, args, step, losses[-1])
    x, y = random_batches(val_ids, 32, args.block_size, 1, seed=1234)[0]
    with torch.no_grad():   # every rank the same batch: the forward is collective (the experts live apart)
        logits = model(x.to(dev)).logits
        val = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(dev).flatten()).item()
    return {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": val, "losses": losses,
            "replica_divergence": None, "dropped": sum(m.dropped for m in layers)}


if __name__ == "__main__":
    from minidist.examples.train import main
    sys.exit(main(["--strategy", "ep", *sys.argv[1:]]))
