"""The parallelism planner behind `python -m minidist plan`: which (dp, pp, tp, cp, ZeRO stage, micro-batches,
activation checkpointing) to train a model of P parameters on G GPUs, by minidist's own models of memory and time.

Enumerate every mesh dp x pp x cp x tp = G (tp dividing a node: it talks every layer), micro-batch count m, interleaving
depth v and both checkpointing choices, with ZeRO stages 0-3 without a pipeline and 0-1 with one (DeepSpeed's pipeline
engine refuses stages 2 and 3: partitioned gradients would be reduce-scattered once per micro-batch); keep the plans
that fit in memory; rank them by predicted step time. GB here is 1e9 bytes (an "80 GB" H100 holds about 85.5e9).

Memory per GPU (chapter 00, memory/accounting.py), the larger of the first pipeline rank's and the last's:
    model states   zero_state_bytes(P_stage / tp, dp cp, stage) for the largest stage: ceil(L/pp) layers plus the
                   embedding (first) or the output layer (last), P_stage = P without a pipeline; the cp ranks hold
                   the same weights as dp replicas
    activations    per layer: Korthikanti et al.'s 16-bit formula for s/cp positions, b sequences, divided by tp
                   (sequence parallelism splits all of it); no a s^2 b score terms (FlashAttention keeps no scores);
                   x ceil(L/pp) layers x the micro-batches in flight (chapter 07): min(pp, m) on the first rank and 1
                   on the last with 1F1B; with v interleaved chunks of 1/v stage, 2(pp-1) + (v-1)pp + 1 on the first
                   and (v-1)pp + 1 on the last (at most m v). Checkpointing keeps each layer's input (2 s b h / (cp tp)
                   bytes) per layer and micro-batch in flight, plus one layer's full activations (recomputed)
    logits         the last rank's b s V / (cp tp) logits (16-bit) and their fp32 softmax
    reserve        --reserve-gb for the CUDA context, communication buffers and fragmentation
Time per step (chapter 01's alpha-beta model on two links: --intra-node-gbps inside a node, --inter-node-gbps
between nodes; a group is inside a node when the block of consecutive ranks it spans, over its axis and the faster
ones, divides the node; otherwise some of its groups straddle two nodes):
    compute        6 P_stage + 6 L_stage s h FLOPs per token on the slowest stage (its ceil(L/pp) layers and the
                   output layer; 8 P_stage + ... with recomputation) at --tflops x --mfu
    tp             4 all-reduces of b s h / cp 16-bit values per layer and micro-batch (6 with recomputation)
    cp             (3 cp - 2) K/V blocks per layer and micro-batch, hidden behind the attention they overlap
    pp             one activation and one gradient per micro-batch and stage boundary (v times as many)
    pipeline       (m + (pp - 1) / v) x (one micro-batch's compute and communication on a stage): chapter 07's bubble
    dp             gradients reduced over dp x cp, hidden behind the last micro-batch's backward (chapter 02); ZeRO-1
                   then all-gathers the parameters (chapter 05); ZeRO-2 reduce-scatters each micro-batch's gradients
                   behind its backward; ZeRO-3 gathers each layer's parameters twice and reduce-scatters its gradients
                   for every micro-batch, behind its compute (chapters 05-06)
TFLOP/s per GPU: model FLOPs, (6 P + 6 L s h) per token (causal attention; no recomputation), over the step time.
"""
import itertools
import math
from dataclasses import asdict, dataclass, replace

from .comm.ring import AlphaBeta
from .memory import GB, activation_bytes_per_layer, zero_state_bytes


@dataclass(frozen=True)
class Shape:
    """A transformer's shape: layers, hidden size, heads (key-value heads), MLP width, vocabulary, sequence."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int

    def params(self) -> float:
        kv = self.hidden * self.kv_heads // self.heads
        mlp = (3 if self.ffn != 4 * self.hidden else 2) * self.hidden * self.ffn    # SwiGLU has three matrices
        return self.layers * (2 * self.hidden ** 2 + 2 * self.hidden * kv + mlp) + 2 * self.vocab * self.hidden


SHAPES = {
    "gpt3-175b": Shape(96, 12288, 96, 96, 4 * 12288, 50257, 2048),
    "llama3-8b": Shape(32, 4096, 32, 8, 14336, 128256, 8192),
    "llama3-70b": Shape(80, 8192, 64, 8, 28672, 128256, 8192),
    "llama3-405b": Shape(126, 16384, 128, 8, 53248, 128256, 8192),
}


# Published configurations: (model, GPUs, global batch in sequences, the published plan, where it comes from).
# NVIDIA's runs use Megatron's distributed optimizer (optimizer states sharded over dp: ZeRO-1), written in here.
PUBLISHED = [
    ("gpt3-175b", 128, 256, dict(dp=4, pp=8, tp=4, cp=1, microbatches=64, micro_batch_size=1, virtual_stages=6,
                                 zero_stage=1),
     "NVIDIA NeMo 24.07 performance summary (Megatron-Core), DGX-H100, FP8, virtual pipeline 6"),
    ("llama3-70b", 64, 128, dict(dp=2, pp=4, tp=4, cp=2, microbatches=64, micro_batch_size=1, virtual_stages=5,
                                 zero_stage=1),
     "NVIDIA NeMo 24.07 performance summary (Megatron-Core), DGX-H100, FP8, virtual pipeline 5"),
    ("llama3-405b", 8192, 2048, dict(dp=64, pp=16, tp=8, cp=1),
     "Llama 3 paper (Dubey et al. 2024), Table 4: 8,192 H100s, BF16, 16M tokens per batch (schedule not in the table)"),
]


def shape_for(params: float, seq: int = 2048) -> Shape:
    """A GPT-3-like shape for `params` when no model is named: hidden = 128 layers, 128-wide heads."""
    layers = max(1, round((params / (12 * 128 ** 2)) ** (1 / 3)))
    hidden = 128 * layers
    return Shape(layers, hidden, hidden // 128, hidden // 128, 4 * hidden, 50257, seq)


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_memory_gb: float
    gpus_per_node: int = 8
    tflops: float = 989.0          # peak 16-bit TFLOP/s per GPU (H100 SXM, dense)
    mfu: float = 0.5               # the fraction of peak the matmuls reach
    intra_node_gbps: float = 450.0  # GB/s per GPU, one direction (NVLink)
    inter_node_gbps: float = 50.0   # GB/s per GPU (400 Gb/s)
    alpha_us: float = 5.0          # latency per message
    reserve_gb: float = 4.0

    def link(self, inside: bool) -> AlphaBeta:
        return AlphaBeta(self.alpha_us * 1e-6, 1 / ((self.intra_node_gbps if inside else self.inter_node_gbps) * GB))


@dataclass(frozen=True)
class Plan:
    dp: int
    pp: int
    tp: int
    cp: int
    zero_stage: int
    microbatches: int
    checkpointing: bool
    micro_batch_size: int = 0
    virtual_stages: int = 1
    memory_per_gpu_gb: float = 0.0
    step_seconds: float = 0.0
    comm_share: float = 0.0
    bubble_share: float = 0.0
    tflops_per_gpu: float = 0.0


def stage_params(params: float, shape: Shape, pp: int) -> float:
    """Parameters of the largest pipeline stage: ceil(L/pp) layers and the embedding (or the output layer)."""
    if pp == 1:
        return params
    per_layer = max(0.0, params - 2 * shape.vocab * shape.hidden) / shape.layers
    return math.ceil(shape.layers / pp) * per_layer + shape.vocab * shape.hidden


def in_flight(plan: Plan) -> tuple[float, float]:
    """Micro-batches whose activations the first and the last pipeline rank hold at once (chapter 07)."""
    p, v, m = plan.pp, plan.virtual_stages, plan.microbatches
    if v == 1:
        return min(p, m), 1
    return min(2 * (p - 1) + (v - 1) * p + 1, m * v) / v, min((v - 1) * p + 1, m * v) / v


def memory_per_gpu(plan: Plan, params: float, shape: Shape, cluster: Cluster) -> float:
    """Bytes one GPU holds under `plan`, by the module docstring's model (the first or the last pipeline rank)."""
    states = zero_state_bytes(stage_params(params, shape, plan.pp) / plan.tp, plan.dp * plan.cp, plan.zero_stage)
    s, b, h = shape.seq // plan.cp, plan.micro_batch_size, shape.hidden
    layer = activation_bytes_per_layer(s, b, h, 0, bytes_per_value=2, dropout=False) / plan.tp   # no score terms
    layers = math.ceil(shape.layers / plan.pp)

    def held(micro_batches: float) -> float:
        if plan.checkpointing:
            return layers * micro_batches * 2 * s * b * h / plan.tp + layer
        return layers * micro_batches * layer

    first, last = in_flight(plan)
    logits = b * s * shape.vocab / plan.tp * (2 + 4)
    activations = held(first) + logits if plan.pp == 1 else max(held(first), held(last) + logits)
    return states.total + activations + cluster.reserve_gb * GB


def inside_node(cluster: Cluster, *sizes: int) -> bool:
    """Whether a group spanning sizes' product consecutive ranks lies within one node (else it crosses nodes)."""
    return min(cluster.gpus, cluster.gpus_per_node) % math.prod(sizes) == 0


def step_time(plan: Plan, params: float, shape: Shape, cluster: Cluster) -> tuple[float, float, float]:
    """(seconds per step, share lost to exposed communication, share lost to the pipeline bubble)."""
    s, b, h, L = shape.seq, plan.micro_batch_size, shape.hidden, math.ceil(shape.layers / plan.pp)
    rate = cluster.tflops * 1e12 * cluster.mfu
    tokens = b * s / plan.cp                                                # this rank's tokens per micro-batch
    passes = 4 if plan.checkpointing else 3                                 # forward, backward = 2 forwards, redo
    stage = stage_params(params, shape, plan.pp)                            # the slowest stage's parameters
    dense = 2 * stage * tokens / plan.tp
    attention = 2 * L * b * s * s * h / (plan.cp * plan.tp)                 # causal: half of 4 b s^2 h per layer
    compute = passes * (dense + attention) / rate                           # one micro-batch on one stage
    inside = lambda *axes: inside_node(cluster, *axes)                      # noqa: E731
    act = 2 * tokens * h                                                    # 16-bit activations of a micro-batch
    tp = L * (6 if plan.checkpointing else 4) * cluster.link(True).predict("all_reduce", act, plan.tp)
    kv = 2 * tokens * h * shape.kv_heads / shape.heads / plan.tp * 2
    ring = cluster.link(inside(plan.tp, plan.cp)).predict("send", kv, 2) * (3 * plan.cp - 2) if plan.cp > 1 else 0
    cp = L * max(0.0, ring - passes * attention / L / rate)                # what the attention does not hide
    v = plan.virtual_stages
    pp = 2 * v * cluster.link(inside(plan.tp, plan.cp, plan.pp)).predict("send", act, 2) if plan.pp > 1 else 0
    per_micro = compute + tp + cp + pp
    pipeline = (plan.microbatches + (plan.pp - 1) / v) * per_micro
    grads = 2 * stage / plan.tp                                             # 16-bit gradients of one stage
    n, dp_link = plan.dp * plan.cp, cluster.link(inside(plan.tp, plan.cp, plan.pp, plan.dp))
    backward = compute * 2 / passes
    if plan.zero_stage == 3:  # one unit per layer: each layer's parameters gathered twice, its gradients scattered
        unit = grads / L
        gathers = L * (2 * dp_link.predict("all_gather", unit, n) + dp_link.predict("reduce_scatter", unit, n))
        dp = plan.microbatches * max(0.0, gathers - compute)
    elif plan.zero_stage == 2:  # each micro-batch's gradients reduce-scattered behind its backward
        dp = plan.microbatches * max(0.0, dp_link.predict("reduce_scatter", grads, n) - backward) + \
            dp_link.predict("all_gather", grads, n)
    else:
        reduce = dp_link.predict("all_reduce" if plan.zero_stage == 0 else "reduce_scatter", grads, n)
        dp = max(0.0, reduce - backward) + (dp_link.predict("all_gather", grads, n) if plan.zero_stage else 0.0)
    total = pipeline + dp
    comm = plan.microbatches * (tp + cp + pp) + dp
    return total, comm / total, (plan.pp - 1) / v * per_micro / total


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(params: float, shape: Shape, cluster: Cluster, global_batch: int):
    """Every plan the model allows: dp x pp x cp x tp = the GPUs, tp divides the node and the heads, pp <= layers,
    2 cp divides the sequence, dp x m x b = the global batch; v interleaved chunks divide a stage's layers, with m a
    multiple of pp; ZeRO-2 and -3 only without a pipeline."""
    g = cluster.gpus
    for tp in _divisors(math.gcd(g, cluster.gpus_per_node)):
        if shape.heads % tp or shape.kv_heads % tp and tp % shape.kv_heads:
            continue
        for pp in _divisors(g // tp):
            for cp in _divisors(g // (tp * pp)):
                dp = g // (tp * pp * cp)
                assert dp * pp * cp * tp == g
                if pp > shape.layers or shape.seq % (2 * cp) and cp > 1 or global_batch % dp:
                    continue
                for m in _divisors(global_batch // dp):
                    chunks = _divisors(math.ceil(shape.layers / pp)) if pp > 1 and m % pp == 0 else [1]
                    for zero, v, ckpt in itertools.product((0, 1, 2, 3) if pp == 1 else (0, 1), chunks,
                                                           (False, True)):
                        yield Plan(dp, pp, tp, cp, zero, m, ckpt, global_batch // (dp * m), v)


def evaluate(plan: Plan, params: float, shape: Shape, cluster: Cluster) -> Plan:
    """The plan with its memory, step time, shares and achieved TFLOP/s per GPU filled in."""
    seconds, comm, bubble = step_time(plan, params, shape, cluster)
    tokens = plan.dp * plan.microbatches * plan.micro_batch_size * shape.seq
    flops = (6 * params + 6 * shape.layers * shape.seq * shape.hidden) * tokens      # model FLOPs, no recomputation
    return replace(plan, memory_per_gpu_gb=memory_per_gpu(plan, params, shape, cluster) / GB, step_seconds=seconds,
                   comm_share=comm, bubble_share=bubble, tflops_per_gpu=flops / seconds / cluster.gpus / 1e12)


def plan(params: float, cluster: Cluster, shape: Shape | None = None, global_batch: int = 1024,
         top: int = 10, where: dict | None = None) -> list[Plan]:
    """The `top` plans that fit in memory, fastest first (ties: less memory first); `where` ({field: value}) keeps
    only the plans with those values (say, a published mesh, to let the planner complete it)."""
    shape = shape or shape_for(params)
    _check(params=params, global_batch=global_batch, top=top)
    if not 0 < cluster.mfu <= 1:
        raise ValueError(f"mfu is the fraction of the peak the matmuls reach, in (0, 1], got {cluster.mfu!r}")
    if cluster.gpus % cluster.gpus_per_node and cluster.gpus > cluster.gpus_per_node:
        raise ValueError(f"{cluster.gpus} GPUs are not whole nodes of {cluster.gpus_per_node}")
    chosen = (c for c in candidates(params, shape, cluster, global_batch)
              if all(getattr(c, k) == v for k, v in (where or {}).items()))
    fits = [p for p in (evaluate(c, params, shape, cluster) for c in chosen)
            if p.memory_per_gpu_gb <= cluster.gpu_memory_gb]
    if not fits:
        raise ValueError(f"no plan fits a {params:.3g}-parameter model on {cluster.gpus} GPUs of "
                         f"{cluster.gpu_memory_gb:g} GB (global batch {global_batch}"
                         + (f", {where}" if where else "") + "); add GPUs or memory")
    return sorted(fits, key=lambda p: (p.step_seconds, p.memory_per_gpu_gb))[:top]


def _check(**values) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v!r}")


def as_json(plans: list[Plan]) -> dict:
    return {"plans": [asdict(p) for p in plans]}


def format_plans(plans: list[Plan]) -> str:
    lines = [f"{'dp':>5}{'pp':>4}{'v':>3}{'tp':>4}{'cp':>4}{'zero':>5}{'m':>5}{'b':>4}{'ckpt':>6}{'GB/GPU':>8}"
             f"{'step s':>9}{'comm':>7}{'bubble':>8}{'TFLOP/s':>9}"]
    for p in plans:
        lines.append(f"{p.dp:>5}{p.pp:>4}{p.virtual_stages:>3}{p.tp:>4}{p.cp:>4}{p.zero_stage:>5}{p.microbatches:>5}"
                     f"{p.micro_batch_size:>4}{'yes' if p.checkpointing else 'no':>6}{p.memory_per_gpu_gb:>8.1f}"
                     f"{p.step_seconds:>9.2f}{p.comm_share:>7.1%}{p.bubble_share:>8.1%}{p.tflops_per_gpu:>9.0f}")
    return "\n".join(lines)
