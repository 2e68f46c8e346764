"""The backward pass cut in two, as zero-bubble schedules need it (Qi et al. 2023): B now, W later.

    B  the gradient of the stage's *input*: the previous stage is waiting for it, so it is on the critical path;
    W  the gradients of the stage's *weights*: nobody waits for them before the optimizer step, so they can fill idle
       time. Together they cost one ordinary backward; the activations stay alive until W.

Autograd computes only what is asked for: `torch.autograd.grad(y, x)` runs the graph nodes on the paths from y to x,
and at a Linear computes grad_x = grad_y @ A but skips grad_A = grad_y^T @ x. W needs, at each such node, the
gradient that reached it during B. So before B we find the *boundary* nodes: on a path to the input, with an edge
that leads only to parameters (a Linear's matmul, a LayerNorm). A pre-hook keeps the gradient each boundary node
receives during B; W restarts the backward there, one `torch.autograd.grad` per boundary node, from that gradient
(a GradientEdge as the output) to the parameters behind it, and adds the results into `.grad`.
torch.distributed.pipelining does the same in `stage_backward_input` / `stage_backward_weight`.
"""
import torch
from torch.autograd.graph import GradientEdge


def _grad_node(t: torch.Tensor):
    """The node where a tensor's gradient lands: its grad_fn, or for a leaf its AccumulateGrad node."""
    return t.grad_fn if t.grad_fn is not None else t.view_as(t).grad_fn.next_functions[0][0]


def _walk(root):
    """Every node reachable from `root`, children before their parents (an iterative depth-first post-order)."""
    order, expanded, stack = [], set(), [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            order.append(node)
        elif node not in expanded:
            expanded.add(node)
            stack.append((node, True))  # comes back once every child below it is finished (the graph is acyclic)
            stack += [(c, False) for c, _ in node.next_functions if c is not None and c not in expanded]
    return order


def boundary_nodes(output: torch.Tensor, x: torch.Tensor | None, params: list) -> dict:
    """{node: [parameters]}: nodes on a path from `output` to `x` with an edge that reaches only parameters.

    With no input gradient to compute (x None: the first stage, whose input is token ids), the whole backward is
    W: the one boundary node is the output's own.
    """
    leaf_of = {_grad_node(p): id(p) for p in params if p.requires_grad}  # parameters known by id: a tensor's
    if x is None:                                                           # == compares values
        return {output.grad_fn: [p for p in params if p.requires_grad]}
    target = _grad_node(x)
    reaches_x, under = {}, {}  # node -> leads to x; node -> parameters behind it
    for node in _walk(output.grad_fn):
        children = [c for c, _ in node.next_functions if c is not None]
        reaches_x[node] = node is target or any(reaches_x[c] for c in children)
        under[node] = {leaf_of[node]} if node in leaf_of else set().union(*(under[c] for c in children))
    boundary = {}
    for node in reaches_x:
        if not reaches_x[node]:
            continue
        side = [c for c, _ in node.next_functions if c is not None and not reaches_x[c] and under[c]]
        found = set().union(*(under[c] for c in side))
        deeper = set().union(*(under[c] for c, _ in node.next_functions if c is not None and reaches_x[c]))
        if found & deeper:
            raise ValueError("a parameter is used at two depths of one stage: its gradient cannot be split into B "
                             "and W here; use a schedule without W")
        if found:
            boundary[node] = [p for p in params if id(p) in found]
    return boundary


def backward_input(output: torch.Tensor, grad_output: torch.Tensor | None, x: torch.Tensor | None, params: list):
    """B: returns (the gradient of x, or None when x is None, and W: a function that adds the parameters'
    gradients into their .grad). The graph stays alive until W has run and its caller drops it."""
    boundary = boundary_nodes(output, x, params)
    saved = {}
    if x is None:  # nothing to compute now: W starts from the output itself
        grads = [None] * (output.output_nr + 1)   # the gradient goes in at the output's own slot of its node
        grads[output.output_nr] = torch.ones_like(output) if grad_output is None else grad_output
        saved[output.grad_fn] = tuple(grads)
        dx = None
    else:
        hooks = [node.register_prehook(lambda grads, node=node: saved.__setitem__(node, grads)) for node in boundary]
        try:
            (dx,) = torch.autograd.grad(output, x, grad_output, retain_graph=True)
        finally:
            for h in hooks:
                h.remove()

    def weight_gradients():
        for node, ps in boundary.items():
            edges = [(GradientEdge(node, i), g) for i, g in enumerate(saved.pop(node, ())) if g is not None]
            if not edges:
                continue
            grads = torch.autograd.grad([e for e, _ in edges], ps, [g for _, g in edges], retain_graph=True,
                                        allow_unused=True)
            for p, g in zip(ps, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
    return dx, weight_gradients
