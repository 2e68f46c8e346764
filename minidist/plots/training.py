"""Figures for the chapters (matplotlib). Each function draws from numbers it is given, or from a pure simulation."""
import matplotlib.pyplot as plt
from matplotlib.patches import Patch


def bars(groups: dict[str, dict[str, float]], title: str, ylabel: str, scale: float = 1.0, ax=None):
    """Grouped bars: {group: {series: value}}, e.g. {"params": {"formula": 4.0, "measured": 4.0}, ...}."""
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [g.get(s, 0) / scale for g in groups.values()], width, label=s)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    return ax


def lines(xs, curves: dict[str, list[float]], title: str, xlabel: str, ylabel: str, log: bool = True, ax=None):
    """One line per curve over xs; styles: names ending in "(model)" are dashed."""
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    for name, ys in curves.items():
        ax.plot(xs, ys, "--" if name.endswith("(model)") else "o-", label=name)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{x:,.0f}" if x < 1e4 else f"{x:.0e}" for x in xs])
        ax.minorticks_off()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return ax


def ring_states(n: int) -> list[list[list[frozenset]]]:
    """Simulate ring all-reduce on symbols: states[step][rank][chunk] = the ranks whose data that chunk now holds.

    Step 0 is the start; steps 1..N-1 are reduce-scatter, N..2N-2 all-gather, with the same chunk indices as
    collectives.ring_reduce_scatter_ and ring_all_gather_.
    """
    state = [[frozenset([r]) for _ in range(n)] for r in range(n)]
    states = [state]
    # reduce-scatter: rank r sends chunk c = (r-s-1); rank r+1 adds it into its own chunk c (for rank r+1, c is its
    # (rank - s - 2), the chunk collectives.ring_reduce_scatter_ receives into)
    for s in range(n - 1):
        new = [row[:] for row in state]
        for r in range(n):
            c = (r - s - 1) % n
            new[(r + 1) % n][c] = state[(r + 1) % n][c] | state[r][c]
        states.append(state := new)
    for s in range(n - 1):  # all-gather: rank r forwards finished chunk (r-s); its right neighbour overwrites
        new = [row[:] for row in state]
        for r in range(n):
            c = (r - s) % n
            new[(r + 1) % n][c] = state[r][c]
        states.append(state := new)
    return states


def draw_ring(n: int = 4):
    """A grid per step: rows are ranks, columns chunks; a cell's shade is how many ranks' data it holds."""
    states = ring_states(n)
    fig, axes = plt.subplots(1, len(states), figsize=(2.0 * len(states), 2.4), squeeze=False)
    for step, (ax, state) in enumerate(zip(axes[0], states)):
        grid = [[len(cell) for cell in row] for row in state]
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=n)
        for r, row in enumerate(state):
            for c, cell in enumerate(row):
                full = len(cell) == n
                ax.text(c, r, "all" if full else "".join(map(str, sorted(cell))), ha="center", va="center",
                        fontsize=8, color="white" if full else "black")
        phase = "start" if step == 0 else ("reduce-scatter" if step < n else "all-gather")
        ax.set_title(f"{phase}\nstep {step}", fontsize=8)
        ax.set_xticks(range(n), [f"c{c}" for c in range(n)], fontsize=7)
        ax.set_yticks(range(n), [f"rank {r}" for r in range(n)], fontsize=7)
    fig.tight_layout()
    return fig


def timeline(events_per_rank: list[list[tuple[str, float, float]]], title: str, ax=None):
    """Per rank, a compute bar (the first event) above one thin lane per communication event (times in ms)."""
    ax = ax or plt.subplots(figsize=(9, 0.9 + 0.9 * len(events_per_rank)))[1]
    t0 = min(start for events in events_per_rank for _, start, _ in events)
    for rank, events in enumerate(events_per_rank):
        top = len(events_per_rank) - rank  # each rank owns the band [top - 1, top)
        (label, start, end), comms = events[0], events[1:]
        ax.barh(top - 0.2, (end - start) * 1e3, left=(start - t0) * 1e3, height=0.3, color="tab:blue",
                label=label if rank == 0 else None)
        lane = 0.6 / max(1, len(comms))
        for k, (_, start, end) in enumerate(comms):
            ax.barh(top - 0.4 - (k + 0.5) * lane, max(end - start, 1e-5) * 1e3, left=(start - t0) * 1e3,
                    height=lane * 0.8, color="tab:orange", label="all-reduce, one lane per bucket"
                    if rank == 0 and k == 0 else None)
    ax.set_yticks([len(events_per_rank) - r - 0.5 for r in range(len(events_per_rank))],
                  [f"rank {r}" for r in range(len(events_per_rank))])
    ax.set_xlabel("ms since the step started")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return ax


def tp_block(ax=None):
    """Where tensor parallelism's collectives sit in a transformer block, without and with sequence parallelism.

    Colors: replicated on every rank (grey), split by features across ranks (blue), split by sequence (green)."""
    ax = ax or plt.subplots(figsize=(11, 3.6))[1]
    colors = {"rep": "#dddddd", "tp": "#9ecae1", "seq": "#a1d99b", "comm": "#fdae6b"}
    steps = [("Layer\nNorm", "norm"), ("f", "enter"), ("q k v\ncolumn", "tp"), ("attention\n(heads)", "tp"),
             ("proj\nrow", "tp"), ("g", "leave"), ("+", "norm"), ("Layer\nNorm", "norm"), ("f", "enter"),
             ("fc\ncolumn", "tp"), ("GELU", "tp"), ("proj\nrow", "tp"), ("g", "leave"), ("+", "norm")]
    for row, (sp, title) in enumerate(((False, "tensor parallel (f: backward all-reduce; g: backward identity)"),
                                       (True, "+ sequence parallel (all-gather: backward reduce-scatter, and back)"))):
        y = 1.6 - 1.6 * row
        ax.text(-0.2, y + 0.45, title, ha="left", fontsize=10, weight="bold")
        for i, (label, kind) in enumerate(steps):
            if kind in ("enter", "leave"):
                label = {"enter": "all-\ngather" if sp else "f\nidentity",
                         "leave": "reduce-\nscatter" if sp else "g\nall-reduce"}[kind]
                color = colors["comm"]
            else:
                color = colors["tp"] if kind == "tp" else colors["seq" if sp else "rep"]
            ax.add_patch(plt.Rectangle((i, y - 0.3), 0.9, 0.6, facecolor=color, edgecolor="black", lw=0.6))
            ax.text(i + 0.45, y, label, ha="center", va="center", fontsize=7.5)
            if i:
                ax.annotate("", (i, y), (i - 0.1, y), arrowprops=dict(arrowstyle="->", lw=0.6))
    for kind, text in (("rep", "replicated (B, T, C)"), ("seq", "sequence shard (B, T/N, C)"),
                       ("tp", "feature shard: C/N or heads/N"), ("comm", "collective")):
        ax.bar(0, 0, color=colors[kind], label=text)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.08), ncol=4, fontsize=8, frameon=False)
    ax.set(xlim=(-0.3, len(steps)), ylim=(-0.5, 2.2))
    ax.axis("off")
PIPELINE_COLORS = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green"}


def pipeline_timeline(events_per_rank, title: str, ax=None, unit: float = 1e3, xlabel: str = "ms"):
    """One lane per pipeline rank, one bar per action ((label, start, end), label like "F3", "B2.1", "W0"): forward
    blue, backward orange, weight gradient green, chunk 1 and later hatched; white space is the bubble."""
    ax = ax or plt.subplots(figsize=(9, 0.5 + 0.45 * len(events_per_rank)))[1]
    t0 = min(float(start) for events in events_per_rank for _, start, _ in events)
    for rank, events in enumerate(events_per_rank):
        for label, start, end in events:
            label = str(label)
            left, width = (float(start) - t0) * unit, (float(end) - float(start)) * unit
            ax.barh(rank, width, left=left, height=0.8, color=PIPELINE_COLORS[label[0]], edgecolor="white",
                    hatch="//" if "." in label else None)
            ax.text(left + width / 2, rank, label[1:].split(".")[0], ha="center", va="center", fontsize=7,
                    color="white")
    ax.set_yticks(range(len(events_per_rank)), [f"rank {r}" for r in range(len(events_per_rank))])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    return ax


def unit_timeline(events: list[tuple[str, float, float]], title: str, ax=None):
    """FSDP events ("forward u", "backward u", "all-gather u", "reduce-scatter u"; start, end in seconds), one row per
    unit: compute as wide bars (faded when they enclose inner units' compute: the root's forward runs the blocks),
    communication as thin bars under them (times in ms)."""
    units = list(dict.fromkeys(what.split(" ", 1)[1] for what, _, _ in events))
    ax = ax or plt.subplots(figsize=(9, 1.2 + 0.55 * len(units)))[1]
    style = {"forward": ("tab:blue", 0.0, 0.5), "backward": ("tab:green", 0.0, 0.5),
             "all-gather": ("tab:orange", -0.32, 0.22), "reduce-scatter": ("tab:red", -0.32, 0.22)}
    computes = [(w.split(" ", 1)[1], s, e) for w, s, e in events if w.startswith(("forward", "backward"))]
    for what, start, end in events:
        kind, unit = what.split(" ", 1)
        color, shift, height = style[kind]
        encloses = shift == 0 and any(u != unit and start <= s and e <= end for u, s, e in computes)
        ax.barh(len(units) - units.index(unit) + shift, max(end - start, 1e-5) * 1e3, left=start * 1e3,
                height=height, color=color, alpha=0.3 if encloses else 1.0)
    ax.set_yticks([len(units) - k for k in range(len(units))], units)
    ax.set_xlabel("ms since the step started")
    ax.set_title(title)
    ax.legend([Patch(color=color) for color, _, _ in style.values()], list(style), loc="upper center",
              bbox_to_anchor=(0.5, -0.22), fontsize=8, ncol=4)


def draw_mesh(shape: dict, ax=None):
    """The ranks of a mesh with three axes of size > 1 (slowest first): one row per value of the first axis, a block
    of columns per value of the second, the third (fastest) side by side. Boxes enclose the fastest axis' groups,
    arrows join the second axis' groups, dashed lines the first's."""
    from ..mesh import coordinates
    axes = [(a, s) for a, s in shape.items() if s > 1]
    if len(axes) != 3:
        raise ValueError(f"draw_mesh draws three axes of size > 1, got {shape}")
    (a0, n0), (a1, n1), (a2, n2) = axes
    world = n0 * n1 * n2
    ax = ax or plt.subplots(figsize=(1.6 * n1 * (n2 + 1), 1.6 * n0 + 0.6))[1]
    pos = {}
    for r in range(world):
        c = coordinates(r, axes=list(shape.items()))
        pos[r] = (c[a1] * (n2 + 1) + c[a2], -1.6 * c[a0])
        ax.add_patch(plt.Rectangle((pos[r][0] - 0.35, pos[r][1] - 0.3), 0.7, 0.6, facecolor="#9ecae1",
                                   edgecolor="black", lw=0.6))
        ax.text(*pos[r], f"rank {r}\n" + " ".join(f"{a}{c[a]}" for a, _ in axes), ha="center", va="center",
                fontsize=7)
    for r in range(world):
        c, (x, y) = coordinates(r, axes=list(shape.items())), pos[r]
        if c[a2] == 0:
            ax.add_patch(plt.Rectangle((x - 0.45, y - 0.4), n2 - 0.1, 0.8, fill=False, edgecolor="tab:red", lw=1.5))
        if c[a1] + 1 < n1:
            arrow = dict(arrowstyle="->", color="tab:green", lw=1.2, connectionstyle="arc3,rad=-0.3")
            ax.annotate("", (x + n2 + 1 - 0.37, y), (x + 0.37, y), arrowprops=arrow)
        if c[a0] + 1 < n0:
            ax.plot([x, x], [y - 0.3, y - 1.3], "--", color="tab:purple", lw=1.2)
    ax.plot([], [], color="tab:red", label=f"{a2} group (boxed)")
    ax.plot([], [], color="tab:green", label=f"{a1} group (arrows)")
    ax.plot([], [], "--", color="tab:purple", label=f"{a0} group (dashed)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=8, frameon=False)
    ax.set(xlim=(-0.6, n1 * (n2 + 1) - 1.4), ylim=(-1.6 * (n0 - 1) - 0.6, 0.6))
    ax.set_title(" x ".join(f"{a}={s}" for a, s in axes) + f": {world} ranks, {a2} fastest", fontsize=9)
    ax.axis("off")
    return ax


def causal_blocks(n: int, balanced: bool = True, ax=None):
    """The causal score matrix cut into 2n x 2n chunk blocks (queries down, keys across): each block a query chunk
    must see, colored by the rank that computes it (its queries' owner), labeled with the ring step at which that
    rank holds the keys. Rank i owns chunks i and 2n-1-i when balanced, chunks 2i and 2i+1 when not."""
    owner = [min(k, 2 * n - 1 - k) for k in range(2 * n)] if balanced else [k // 2 for k in range(2 * n)]
    ax = ax or plt.subplots(figsize=(3.4, 3.4))[1]
    cmap, work = plt.get_cmap("tab10"), [0] * n
    for q in range(2 * n):
        for k in range(q + 1):
            work[owner[q]] += 1
            ax.add_patch(plt.Rectangle((k, q), 1, 1, facecolor=cmap(owner[q]), alpha=0.35 + 0.3 * (k == q),
                                       edgecolor="white"))
            ax.text(k + 0.5, q + 0.5, str((owner[q] - owner[k]) % n), ha="center", va="center", fontsize=7)
    ax.set(xlim=(0, 2 * n), ylim=(2 * n, 0), xlabel="key chunk", ylabel="query chunk")
    ax.set_xticks([k + 0.5 for k in range(2 * n)], range(2 * n), fontsize=7)
    ax.set_yticks([k + 0.5 for k in range(2 * n)], range(2 * n), fontsize=7)
    ax.set_title(f"{'load-balanced' if balanced else 'contiguous'}, cp={n}: blocks per rank "
                 f"{'/'.join(map(str, work))}", fontsize=9)
    return ax


def element_runs(lengths, source) -> list[tuple[int, int]]:
    """The box `source` (slices) of a row-major chunk of `lengths`, as [start, stop) runs of the chunk's flat
    elements (adjacent runs merged): the byte ranges a reader touches, divided by the element size."""
    import itertools
    strides = [1] * len(lengths)
    for d in range(len(lengths) - 2, -1, -1):
        strides[d] = strides[d + 1] * lengths[d + 1]
    runs = []
    for lead in itertools.product(*[range(s.start, s.stop) for s in source[:-1]]):
        base = sum(i * st for i, st in zip(lead, strides))
        start, stop = (base + source[-1].start, base + source[-1].stop) if source else (0, 1)
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((start, stop))
    return runs


def read_plan(plans: list[list[dict]], key: str, ax=None):
    """Which elements of each saved chunk of `key` every loading rank reads: a bar per saved chunk (its file),
    coloured by the reading rank. plans[r]: the reads of rank r (minidist.checkpoint.plan_load)."""
    ax = ax or plt.subplots(figsize=(9, 2.2))[1]
    chunks = sorted({(r["file"], tuple(r["chunk"][1])) for plan in plans for r in plan if r["key"] == key})
    for y, (file, lengths) in enumerate(chunks):
        total = 1
        for n in lengths:
            total *= n
        ax.barh(y, total, color="0.92", edgecolor="0.4")
        for rank, plan in enumerate(plans):
            for r in (r for r in plan if r["key"] == key and r["file"] == file):
                for start, stop in element_runs(lengths, r["source"]):
                    ax.barh(y, stop - start, left=start, color=f"C{rank}", edgecolor="none")
    ax.set_yticks(range(len(chunks)), [f"{f} {'x'.join(map(str, ln))}" for f, ln in chunks])
    ax.set_xlabel("element of the saved chunk (row-major)")
    ax.set_title(f"{key}: what each new rank reads")
    ax.legend(handles=[Patch(color=f"C{r}", label=f"new rank {r}") for r in range(len(plans))],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return ax
