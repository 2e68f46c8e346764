"""The planner for mixture-of-experts models (`python -m minidist plan --experts E --top-k K`): an ep axis inside dp.

The dense planner (minidist/planner.py) lays out dp x pp x tp x cp; here the mesh is dp x pp x tp with the experts
sharded over an ep group *inside* dp (ep divides dp and the experts; each block of experts replicated dp / ep times),
micro-batches m and activation checkpointing; ZeRO stage 0 or 1 on dp (the experts' optimizer states over their
dp / ep replicas). Interleaving and context parallelism are left out. Per GPU, on the fullest pipeline stage:

    model states   zero_state_bytes(dense / (pp tp), dp, z) + zero_state_bytes(experts / (pp tp ep), dp / ep, z)
    activations    per layer and micro-batch in flight (min(pp, m), 1F1B): attention and norms 11 s b h (Korthikanti
                   et al.'s non-MLP terms, FlashAttention: no scores) + k routed copies of a SwiGLU expert's
                   2 (h + 3F) per token, all / tp; with checkpointing, each layer's input 2 s b h / tp and one layer
    compute        (6 active + 6 L s h) FLOPs per token on the stage's layers (8 active with recomputation)
    tp             as the dense planner: 4 all-reduces of a micro-batch's activations per layer (6 with recompute)
    ep             4 all-to-alls per layer and micro-batch (dispatch, combine, forward and backward) of its s b k h
                   16-bit rows, (ep-1)/ep of them to other ranks (chapter 13), on the critical path: not overlapped
    pp             one activation and one gradient per micro-batch and boundary; (m + pp - 1) micro-batch times
    dp             the dense gradients all-reduced (or reduce-scattered + all-gathered, ZeRO-1) over dp and the
                   experts' over dp / ep, behind the last backward
An all-to-all is charged as an all-gather of the same bytes (N - 1 messages, (N - 1)/N of the tensor sent).
"""
import itertools
import math
from dataclasses import dataclass, replace

from ..memory import GB, zero_state_bytes
from ..planner import Cluster


@dataclass(frozen=True)
class MoEShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    expert_ffn: int
    experts: int
    top_k: int
    vocab: int
    seq: int
    shared: int = 0        # shared experts every token visits (DeepSeek)

    def dense_params(self) -> float:
        kv = self.hidden * self.kv_heads // self.heads
        return (self.layers * (2 * self.hidden ** 2 + 2 * self.hidden * kv + self.hidden * self.experts)
                + 2 * self.vocab * self.hidden + self.layers * self.shared * 3 * self.hidden * self.expert_ffn)

    def expert_params(self) -> float:
        return self.layers * self.experts * 3 * self.hidden * self.expert_ffn

    def params(self) -> float:
        return self.dense_params() + self.expert_params()

    def active_params(self) -> float:
        return self.dense_params() + self.expert_params() * self.top_k / self.experts


MOE_SHAPES = {  # Mixtral 8x7B's released config; DeepSeek-V3's with standard attention in place of MLA (see below)
    "mixtral-8x7b": MoEShape(32, 4096, 32, 8, 14336, 8, 2, 32000, 4096),
    "deepseek-v3": MoEShape(61, 7168, 128, 128, 2048, 256, 8, 129280, 4096, shared=1),
}
# DeepSeek-V3 Technical Report (DeepSeek-AI, Dec. 2024), section 3.2: 2048 H800 GPUs, 16-way pipeline parallelism,
# 64-way expert parallelism spanning 8 nodes, ZeRO-1 data parallelism, no tensor parallelism; batches grown to 15,360
# sequences of 4K tokens. Its attention (MLA) and its three dense first layers differ from MOE_SHAPES'
# approximation: 705 B parameters, 38.7 B active here against its 671 B and 37 B.
PUBLISHED = [("deepseek-v3", 2048, 15360, dict(dp=128, pp=16, tp=1, ep=64, zero_stage=1),
              "DeepSeek-V3 Technical Report (2024), section 3.2: PP 16, EP 64 over 8 nodes, ZeRO-1 DP, H800")]


@dataclass(frozen=True)
class MoEPlan:
    dp: int
    pp: int
    tp: int
    ep: int
    zero_stage: int
    microbatches: int
    checkpointing: bool
    micro_batch_size: int
    memory_per_gpu_gb: float = 0.0
    step_seconds: float = 0.0
    comm_share: float = 0.0
    bubble_share: float = 0.0


def memory_per_gpu(plan: MoEPlan, shape: MoEShape, cluster: Cluster) -> float:
    stage = lambda p: p * math.ceil(shape.layers / plan.pp) / shape.layers   # noqa: E731  (the fullest stage)
    states = (zero_state_bytes(stage(shape.dense_params()) / plan.tp, plan.dp, plan.zero_stage).total
              + zero_state_bytes(stage(shape.expert_params()) / (plan.tp * plan.ep), plan.dp // plan.ep,
                                 plan.zero_stage).total)
    s, b, h = shape.seq, plan.micro_batch_size, shape.hidden
    layer = (11 * s * b * h + shape.top_k * 2 * (h + 3 * shape.expert_ffn) * s * b) / plan.tp
    layers, held = math.ceil(shape.layers / plan.pp), min(plan.pp, plan.microbatches)
    acts = layers * held * (2 * s * b * h / plan.tp) + layer if plan.checkpointing else layers * held * layer
    logits = b * s * shape.vocab / plan.tp * (2 + 4)
    return states + acts + logits + cluster.reserve_gb * GB


def step_time(plan: MoEPlan, shape: MoEShape, cluster: Cluster) -> tuple[float, float, float]:
    """(seconds per step, share in exposed communication, share in the pipeline bubble)."""
    s, b, h, L = shape.seq, plan.micro_batch_size, shape.hidden, math.ceil(shape.layers / plan.pp)
    inside = lambda *sizes: min(cluster.gpus, cluster.gpus_per_node) % math.prod(sizes) == 0   # noqa: E731
    passes, tokens = (4 if plan.checkpointing else 3), b * s
    flops = 2 * (shape.active_params() * L / shape.layers) * tokens / plan.tp + 2 * L * tokens * s * h / plan.tp
    compute = passes * flops / (cluster.tflops * 1e12 * cluster.mfu)
    act = 2 * tokens * h
    tp = L * (6 if plan.checkpointing else 4) * cluster.link(True).predict("all_reduce", act, plan.tp)
    rows = 2 * tokens * shape.top_k * h / plan.tp          # one all-to-all's 16-bit rows (tp ranks split the tokens)
    ep = L * 4 * cluster.link(inside(plan.tp, plan.ep)).predict("all_gather", rows, plan.ep)
    pp = 2 * cluster.link(inside(plan.tp, plan.dp, plan.pp)).predict("send", act, 2) if plan.pp > 1 else 0.0
    per_micro = compute + tp + ep + pp
    pipeline = (plan.microbatches + plan.pp - 1) * per_micro
    dense = 2 * shape.dense_params() / (plan.pp * plan.tp)
    experts = 2 * shape.expert_params() / (plan.pp * plan.tp * plan.ep)
    dp_link = cluster.link(inside(plan.tp, plan.dp))
    op = "all_reduce" if plan.zero_stage == 0 else "reduce_scatter"
    reduce = dp_link.predict(op, dense, plan.dp) + dp_link.predict(op, experts, plan.dp // plan.ep)
    gather = 0.0 if plan.zero_stage == 0 else \
        dp_link.predict("all_gather", dense, plan.dp) + dp_link.predict("all_gather", experts, plan.dp // plan.ep)
    dp = max(0.0, reduce - compute * 2 / passes) + gather
    total = pipeline + dp
    return total, (plan.microbatches * (tp + ep + pp) + dp) / total, (plan.pp - 1) * per_micro / total


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_moe(shape: MoEShape, cluster: Cluster, global_batch: int, top: int = 10, where: dict | None = None):
    """The `top` plans that fit, fastest first: dp x pp x tp = the GPUs, tp divides the node and the heads, ep divides
    dp and the experts, m divides the replica's batch; `where` keeps only the plans with those values."""
    if global_batch < 1 or top < 1:
        raise ValueError(f"global batch and top must be positive, got {global_batch} and {top}")
    found = []
    for tp in _divisors(math.gcd(cluster.gpus, cluster.gpus_per_node)):
        for pp in _divisors(cluster.gpus // tp):
            dp = cluster.gpus // (tp * pp)
            if shape.heads % tp or pp > shape.layers or global_batch % dp:
                continue
            for ep, m, zero, ckpt in itertools.product(_divisors(math.gcd(dp, shape.experts)),
                                                       _divisors(global_batch // dp), (0, 1), (False, True)):
                p = MoEPlan(dp, pp, tp, ep, zero, m, ckpt, global_batch // (dp * m))
                if any(getattr(p, k) != v for k, v in (where or {}).items()):
                    continue
                seconds, comm, bubble = step_time(p, shape, cluster)
                p = replace(p, memory_per_gpu_gb=memory_per_gpu(p, shape, cluster) / GB, step_seconds=seconds,
                            comm_share=comm, bubble_share=bubble)
                if p.memory_per_gpu_gb <= cluster.gpu_memory_gb:
                    found.append(p)
    if not found:
        raise ValueError(f"no plan fits {shape.params():.3g} parameters ({shape.experts} experts) on {cluster.gpus} "
                         f"GPUs of {cluster.gpu_memory_gb:g} GB" + (f" with {where}" if where else ""))
    return sorted(found, key=lambda p: (p.step_seconds, p.memory_per_gpu_gb))[:top]


def format_moe_plans(plans: list[MoEPlan]) -> str:
    lines = [f"{'dp':>5}{'ep':>4}{'pp':>4}{'tp':>4}{'zero':>5}{'m':>5}{'b':>4}{'ckpt':>6}{'GB/GPU':>8}{'step s':>9}"
             f"{'comm':>7}{'bubble':>8}"]
    for p in plans:
        lines.append(f"{p.dp:>5}{p.ep:>4}{p.pp:>4}{p.tp:>4}{p.zero_stage:>5}{p.microbatches:>5}{p.micro_batch_size:>4}"
                     f"{'yes' if p.checkpointing else 'no':>6}{p.memory_per_gpu_gb:>8.1f}{p.step_seconds:>9.2f}"
                     f"{p.comm_share:>7.1%}{p.bubble_share:>8.1%}")
    return "\n".join(lines)


def run_plan(args, cluster: Cluster) -> tuple[list[MoEPlan], str]:
    """`python -m minidist plan` for an MoE model: --model (one of MOE_SHAPES, or a dense shape of the planner whose
    MLP becomes --experts experts), --experts and --top-k overriding it. (plans, the text to print)."""
    from ..planner import SHAPES
    if args.params is not None:
        raise ValueError("--params does nothing for a mixture of experts: the parameters come from --model and "
                         "--experts")
    if args.top_k and not args.experts and args.model not in MOE_SHAPES:
        raise ValueError("--top-k needs --experts E (and a dense --model whose MLP becomes the experts), or an MoE "
                         "--model (mixtral-8x7b, deepseek-v3)")
    if args.model in MOE_SHAPES:
        shape = MOE_SHAPES[args.model]
    elif args.model in SHAPES and args.experts:
        d = SHAPES[args.model]
        shape = MoEShape(d.layers, d.hidden, d.heads, d.kv_heads, d.ffn, args.experts, args.top_k or 2, d.vocab,
                         d.seq)
    else:
        raise ValueError("--experts needs --model: a mixture-of-experts model (mixtral-8x7b, deepseek-v3) or a dense "
                         "shape whose MLP becomes the experts")
    shape = replace(shape, experts=args.experts or shape.experts, top_k=args.top_k or shape.top_k,
                    seq=args.seq or shape.seq)
    if shape.top_k > shape.experts:
        raise ValueError(f"--top-k {shape.top_k} is more than the {shape.experts} experts")
    plans = plan_moe(shape, cluster, args.global_batch, args.top)
    text = [f"{shape.params():.4g} parameters, {shape.active_params():.4g} active per token ({args.model}: "
            f"{shape.layers} layers, {shape.experts} experts, top-{shape.top_k}, sequence {shape.seq}) on "
            f"{cluster.gpus} GPUs of {cluster.gpu_memory_gb:g} GB; best first:", format_moe_plans(plans)]
    for model, gpus, batch, mesh, source in PUBLISHED:
        if model == args.model and gpus == cluster.gpus and batch == args.global_batch:
            try:
                theirs = plan_moe(shape, cluster, batch, 1, where=mesh)
                text += [f"published ({source}), completed by the planner:", format_moe_plans(theirs)]
            except ValueError as e:
                text.append(f"published ({source}): {e}")
    return plans, "\n".join(text)
