"""3D and 4D parallelism: data, pipeline, context and tensor parallelism composed on one device mesh.

    mesh = Mesh.build(dp=2, pp=2, tp=2)                       # 8 ranks; tp fastest: its peers are neighbours
    run = ParallelRun(GPT(cfg), mesh, lr=1e-3, microbatches=2)
    for x, y in batches:                                      # the *global* batch, the same on every rank
        loss = run.step(x, y)                                 # forward, backward and optimizer step

Each axis is one earlier chapter, applied to the model from outside, in this order:
  1. cp (chapter 08, context_parallel.py): every attention becomes ring attention over the cp group; the rank reads
     its load-balanced positions of each sequence. First, because it replaces the attention modules, whose q|k|v and
     output projections the next step shards.
  2. tp (chapter 04, parallelize with GPT_PLAN): every weight matrix split over the tp group; the logits come out
     split by vocabulary and the loss is vocab_parallel_cross_entropy over tp.
  3. pp (chapter 07): the parallelized model cut into stages (rank_stages) run by PipelineRuntime over the pp group,
     the batch cut into micro-batches; the tied embedding's gradient is exchanged between the first and last stage.
  4. dp (chapter 05): ZeRO stage 1 over the data-parallel group: gradients reduce-scattered, each rank updates its
     1/N of the AdamW states, parameters all-gathered. With context parallelism the cp ranks hold the same weights
     and each computed gradients from its own tokens, exactly like data-parallel replicas: the gradients are averaged
     over the flattened dp x cp group (Megatron-LM does the same), built here collectively (`flattened_group`).

What a rank reads: its dp coordinate picks rows of the global batch, its cp coordinate positions; pp and tp ranks
read the same data as their peers. Where the bytes go in one step, S = b T h activation bytes per micro-batch:
  tp   per layer and micro-batch: 4 all-reduces of S / cp (2 forward, 2 backward: each cp rank has T / cp tokens)
  cp   per attention layer and micro-batch: (3 cp - 2) K/V blocks of 2 S / (cp tp) around the ring (tp: heads split)
  pp   per micro-batch: one activation and one gradient of S / cp across each stage boundary
  dp   once per step: reduce-scatter of the gradients + all-gather of the parameters, 2 (N-1)/N x Ψ_rank each
So tp, talking every layer, gets the fastest links (neighbouring ranks: one node); dp, once a step, the slowest.
"""
import torch
import torch.distributed as dist

from . import comm
from .comm.ledger import name_group
from .context_parallel import apply_context_parallel, shard_sequence
from .launch import device
from .mesh import AXES
from .models import lm_loss
from .pipeline.runtime import PipelineRuntime
from .pipeline.schedule import build
from .pipeline.schedule import shape as schedule_shape
from .pipeline.stages import parameter_names, rank_stages, split_gpt
from .tensor_parallel.plans import GPT_PLAN, full_parameters, local_shard, parallelize
from .tensor_parallel.vocab import vocab_parallel_cross_entropy
from .zero import ZeroOptimizer


def group_ranks(rank: int, shape: dict, axes) -> list[int]:
    """The global ranks in `rank`'s group along `axes` of a mesh of `shape` ({axis: size}, slowest first, the last
    axis fastest), in group-rank order: the ranks that share every coordinate of `rank` except those of `axes`.

    One axis gives Mesh's group along it ("dp": the replicas of this rank's shard); several give the flattened group
    (("dp", "cp"): everything that averages gradients under context parallelism). An axis not in the shape and a
    rank outside 0 .. world-1 are refused before your part (given). Graded: equal to mesh.mesh_groups for every
    axis of several shapes (sizes 1 included), flattened groups over two and three axes, ascending order. Not
    graded: how you find them (the hints compute them by strides; filtering all the ranks passes too, in O(world)).
    """
    world = 1
    for size in shape.values():
        world *= size
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank {rank!r} is not in a mesh of {world} ranks ({shape})")
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if unknown := [a for a in axes if a not in shape]:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {tuple(shape)}")
    # <exercise group_ranks points=3>
    # hint: a rank's coordinate on an axis is (rank // stride) % size, where the stride of an axis is the product of
    #       the sizes of the axes after it (the faster ones).
    # hint: start from `rank` with its coordinates on `axes` set to 0, then add every combination of offsets
    #       coordinate x stride along those axes.
    strides, stride = {}, 1
    for name in reversed(list(shape)):
        strides[name], stride = stride, stride * shape[name]
    base = rank - sum((rank // strides[a]) % shape[a] * strides[a] for a in axes)
    ranks = [base]
    for a in axes:
        ranks = [r + k * strides[a] for r in ranks for k in range(shape[a])]
    return sorted(ranks)
    # </exercise>


def flattened_group(mesh, axes: tuple[str, ...]):
    """The process group of this rank over several mesh axes at once (collective: every rank creates every such
    group, in the same order). Named "_".join(axes) in the ledger. One axis: simply mesh.group(axis)."""
    if len(axes) == 1:
        return mesh.group(axes[0])
    rows = list(dict.fromkeys(tuple(group_ranks(r, mesh.shape, axes)) for r in range(dist.get_world_size())))
    mine = None
    for ranks in rows:
        group = dist.new_group(list(ranks))
        if dist.get_rank() in ranks:
            mine = group
            name_group(group, "_".join(axes))
    return mine


def grad_axes(mesh) -> tuple[str, ...]:
    """The axes whose ranks hold the same weights and average their gradients: dp, and cp when it is used."""
    return ("dp", "cp") if mesh.cp > 1 else ("dp",)


def make_optimizer(params, group, zero_stage: int, lr: float, **kwargs):
    """AdamW over `params`, its gradients averaged over `group`: ZeRO stage 1 (chapter 05), or stage 0 (every rank
    keeps full states, gradients all-reduced: chapter 02's data parallelism)."""
    if zero_stage == 1:
        return ZeroOptimizer(params, torch.optim.AdamW, stage=1, group=group, lr=lr, **kwargs)
    if zero_stage == 0:
        return AveragingOptimizer(params, group, lr=lr, **kwargs)
    raise ValueError(f"ParallelRun supports ZeRO stage 0 or 1 on the data-parallel axis, got {zero_stage!r}")


class AveragingOptimizer:
    """AdamW after averaging every gradient over `group` (one all-reduce per parameter): plain data parallelism."""

    def __init__(self, params, group, **kwargs):
        self.params, self.group = list(params), group
        self.inner = torch.optim.AdamW(self.params, **kwargs)

    def step(self):
        n = comm.group_size(self.group)
        for p in self.params:
            if p.grad is not None:
                p.grad.copy_(comm.all_reduce_sum(p.grad, self.group) / n)
        self.inner.step()

    def zero_grad(self):
        self.inner.zero_grad()


class ParallelRun:
    """A minidist GPT trained on `mesh` (dp x pp x cp x tp; see the module docstring). Every rank builds the same
    model (same seed) and passes it in; the run keeps this rank's part.

    mesh: from Mesh.build (the axes dp, pp, cp, tp); schedule/microbatches: the pipeline's (chapter 07), one stage
    per rank (not "interleaved", "zbv" or "dualpipev"); zero_stage: 1 (ZeRO-1 over dp, or dp x cp) or 0.
    """

    def __init__(self, model, mesh, *, lr: float = 1e-3, schedule: str = "1f1b", microbatches: int = 1,
                 zero_stage: int = 1, balanced: bool = True, **optimizer_kwargs):
        if tuple(mesh.shape) != AXES:
            raise ValueError(f"ParallelRun needs a mesh with the axes {AXES} (Mesh.build(dp=.., pp=.., cp=.., tp=..)), "
                             f"got {tuple(mesh.shape)}")
        plan = build(schedule, mesh.pp, microbatches)     # refused before the model is changed
        if (v := schedule_shape(plan)[2]) > 1:            # interleaved, and the V schedules (zbv, dualpipev)
            raise ValueError(f"ParallelRun runs one pipeline stage per rank: schedule {schedule!r} runs {v} chunks "
                             f"per rank, not supported; use 'gpipe', '1f1b' or 'zb'")
        self.mesh, self.cfg = mesh, model.cfg
        if mesh.cp > 1:
            apply_context_parallel(model, mesh.group("cp"), balanced)
        tp_group = mesh.group("tp") if mesh.tp > 1 else None
        if tp_group is not None:
            parallelize(model, tp_group, GPT_PLAN)
        self.model, self.tp_group = model, tp_group
        loss_fn = (lambda logits, y: vocab_parallel_cross_entropy(logits, y, tp_group)) if tp_group else lm_loss
        stages = rank_stages(model, mesh.pp, mesh.coords["pp"])
        self.pipe = PipelineRuntime(stages, plan, model.cfg.n_embd,
                                    group=mesh.group("pp"), loss_fn=loss_fn, track_memory=False)
        self.grad_group = flattened_group(mesh, grad_axes(mesh))
        self.optimizer = make_optimizer(self.pipe.parameters(), self.grad_group, zero_stage, lr, **optimizer_kwargs)
        self.names = parameter_names(model)

    def local_batch(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's part of the global batch: rows by its dp coordinate, positions by its cp coordinate."""
        dp, rank = self.mesh.dp, self.mesh.coords["dp"]
        if x.shape[0] % (dp * self.pipe.m):
            raise ValueError(f"a global batch of {x.shape[0]} sequences does not split into dp={dp} replicas x "
                             f"{self.pipe.m} micro-batches")
        x, y = x.chunk(dp)[rank], y.chunk(dp)[rank]
        if self.mesh.cp > 1:
            x, y = shard_sequence(x, self.model), shard_sequence(y, self.model)
        return x, y

    def step(self, x: torch.Tensor, y: torch.Tensor):
        """One training step on the global batch (x, y): (B, T) each. Returns this rank's loss (the mean over its
        tokens) on the last pipeline stage, None elsewhere."""
        loss = self.pipe.step(*self.local_batch(x, y))
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def parameters(self) -> dict:
        """Name -> this rank's trained tensor (a tensor-parallel shard, or the whole parameter), for its stages."""
        return {self.names[id(p)]: p for p in self.pipe.parameters()}

    def diff_from(self, dense) -> float:
        """Largest difference between this rank's parameters and the same part of a dense model's."""
        return max((p.detach() - local_shard(self.model, name, dense.get_parameter(name).detach(), self.tp_group))
                   .abs().max().item() for name, p in self.parameters().items())

    def dense_parameters(self) -> dict:
        """Name -> the whole trained tensor, on every rank (collective): tensor-parallel shards gathered over tp,
        each pipeline stage's weights broadcast from the rank that trained them. Load them into a dense GPT."""
        full = full_parameters(self.model, self.tp_group) if self.tp_group else \
            {n: p.detach().clone() for n, p in self.model.named_parameters()}
        pp_group, owner = self.mesh.group("pp"), {}
        for s, stage in enumerate(split_gpt(self.model, self.mesh.pp)):
            for p in stage.parameters():
                owner.setdefault(self.names[id(p)], s)            # a tied weight: from the first stage holding it
        for name, s in owner.items():
            dist.broadcast(full[name], src=dist.get_global_rank(pp_group, s), group=pp_group)
        return full

    def replica_divergence(self) -> float:
        """Largest difference between this rank's parameters and those of rank 0 of its gradient group (the ranks
        holding the same shards): 0 when replicas stay bitwise in sync (collective over that group)."""
        worst = torch.zeros((), device=device())
        for p in self.parameters().values():
            first = p.detach().clone()
            dist.broadcast(first, src=dist.get_global_rank(self.grad_group, 0), group=self.grad_group)
            worst = torch.maximum(worst, (p.detach() - first).abs().max())
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return worst.item()


def mean_loss(loss, mesh) -> float:
    """The global batch's mean loss on every rank, from each last-stage rank's local loss (for logs; uses
    torch.distributed directly so that ledgers measuring the step do not see it)."""
    t = torch.zeros((), device=device()) if loss is None else loss.detach().clone()
    dist.all_reduce(t)  # every rank adds its loss (zero off the last stage); each tp peer holds the same loss
    return t.item() / (mesh.dp * mesh.cp * mesh.tp)

