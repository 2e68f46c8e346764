"""The tour's row format: one dict per check, `passed` derived from its numbers."""
from fractions import Fraction

def covers(*names: str):
    """Declare what a check's rows are about (words of their technique names), so `tour --only TEXT` runs only the
    checks that can produce a matching row."""
    def mark(check):
        check.covers = " ".join(names).lower()
        return check
    return mark


KEYS = ("technique", "reference", "max_abs_diff", "tolerance", "passed", "comm_bytes", "comm_bytes_theory",
        "state_bytes_per_rank", "state_bytes_per_rank_theory", "seconds")


def make_row(technique: str, reference: str, **values) -> dict:
    """A tour row: `passed` is derived from the values, so no check can claim a pass its numbers do not show.

    Measured bytes must equal their formula exactly (the ledger keeps fractional bytes as Fractions); they are
    turned into floats for printing and JSON only after the comparison. A row that trains replicas may carry
    `replica_divergence` (the largest difference between ranks' weights): it must be exactly 0. A row whose bytes are
    given as None while a formula exists fails: the bytes must come from a counted run.
    """
    row = dict.fromkeys(KEYS) | {"technique": technique, "reference": reference} | values
    checks = []
    if row["max_abs_diff"] is not None:
        checks.append(row["max_abs_diff"] <= row["tolerance"])
    if row.get("replica_divergence") is not None:  # replicas that applied the same bytes must be bitwise equal
        checks.append(row["replica_divergence"] == 0)
    for measured, theory in (("comm_bytes", "comm_bytes_theory"),
                             ("state_bytes_per_rank", "state_bytes_per_rank_theory")):
        if row[theory] is not None:
            checks.append(row[measured] is not None and row[measured] == row[theory])
    row["passed"] = bool(checks) and all(checks)
    return {k: float(v) if isinstance(v, Fraction) else v for k, v in row.items()}


def format_rows(rows: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    width = max(len(r["technique"]) for r in rows) + 2
    lines = [f"{'technique':<{width}}{'reference':<34}{'max|diff|':>10}{'tol':>8}{'bytes/rank':>13}{'formula':>13}"
             f"{'state B/rank':>13}{'formula':>13}{'s':>7}  ok"]
    for r in rows:
        lines.append(f"{r['technique']:<{width}}{r['reference']:<34}{fmt(r['max_abs_diff'], '.2g'):>10}"
                     f"{fmt(r['tolerance'], '.0e'):>8}{fmt(r['comm_bytes'], ',.0f'):>13}"
                     f"{fmt(r['comm_bytes_theory'], ',.0f'):>13}{fmt(r['state_bytes_per_rank'], ',.0f'):>13}"
                     f"{fmt(r['state_bytes_per_rank_theory'], ',.0f'):>13}{fmt(r['seconds'], '.2f'):>7}"
                     f"  {'yes' if r['passed'] else 'NO'}")
    return "\n".join(lines)
