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
    for s in range(n - 1):  # reduce-scatter: rank r sends chunk (r-s-1), adds it into chunk (r-s-2) of rank r+1
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
    return ax
