"""The exercises, generated from one source of truth: minidist's own code.

An exercise is a region of a function in the package, between marker comments:

    def ring_all_gather_(chunks, group=None):
        '''...the docstring is the exercise's specification...'''
        # <exercise ring_all_gather points=2>
        # hint: ...
        ...the reference answer...
        # </exercise>

`python -m minidist.exercises` writes, for every chapter, exercises/chNN_topic.py (each marked region replaced by
its hints and `raise NotImplementedError`) and solutions/chNN_topic.py (the same file, answers kept). Both import
from the package what the functions need, except the chapter's own exercise functions: in the file, a learner's
ring_all_reduce calls their own reduce-scatter. (The grader isolates exercises: see grading.implementation.)
tests/test_exercises.py fails when the committed files differ from what this generator writes, so nobody edits a
generated file by hand.
"""
import ast
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
CHAPTERS = {  # generated file -> package modules whose exercises it holds, in order
    "ch00_memory": ["memory.accounting"],
    "ch01_collectives": ["comm.ring", "comm.collectives"],
    "ch02_data_parallel": ["data_parallel.wrapper", "data_parallel.buckets", "mixed_precision"],
    "ch03_data_loading": ["samplers"],
    "ch04_tensor_parallel": ["tensor_parallel.layers", "tensor_parallel.vocab"],
    "ch05_zero": ["zero.phases", "data_parallel.shards"],
    "ch06_fsdp": ["fsdp.units", "fsdp.state"],
    "ch07_pipeline": ["pipeline.schedule", "pipeline.stages", "pipeline.actions"],
    "ch08_3d_parallel": ["parallel3d", "context_parallel", "ulysses"],  # the notebook's order of the exercises
    "ch09_memory": ["memory.recompute", "memory.offload"],
    "ch10_compression": ["compression.hooks", "compression.powersgd"],
    "ch11_checkpoints": ["checkpoint.layout", "checkpoint.save_load", "checkpoint.file_format"],
    "ch12_inference": ["serving.inference", "serving.balancer", "monitor"],
    "ch13_moe": ["moe.layer", "moe.parallel"],
}
BEGIN = re.compile(r"^(\s*)# <exercise (\w+) points=(\d+)>\s*$")
END = re.compile(r"^\s*# </exercise>\s*$")


@dataclass(frozen=True)
class Exercise:
    name: str
    points: int
    chapter: str
    module: str      # e.g. "comm.ring"
    function: str    # e.g. "ring_all_gather_"


def _functions_with_regions(module: str):
    """(function node, source lines, [(begin line, end line, indent, name, points)]) for each exercise function."""
    source = (PACKAGE / f"{module.replace('.', '/')}.py").read_text()
    lines, tree = source.splitlines(), ast.parse(source)
    for k, node in enumerate(tree.body):
        if not isinstance(node, ast.FunctionDef):
            continue
        # A closing marker after a final `return` lies past the function's last statement: include it.
        stop = tree.body[k + 1].lineno - 1 if k + 1 < len(tree.body) else len(lines)
        closing = [i + 1 for i in range(node.end_lineno, stop) if END.match(lines[i])]
        node.end_lineno = max([node.end_lineno, *closing])
        regions, open_region = [], None
        for i in range(node.lineno - 1, node.end_lineno):
            if m := BEGIN.match(lines[i]):
                open_region = (i, m.group(1), m.group(2), int(m.group(3)))
            elif END.match(lines[i]):
                if open_region is None:
                    raise ValueError(f"{module}.py:{i + 1}: '# </exercise>' without a matching begin marker")
                regions.append((open_region[0], i, *open_region[1:]))
                open_region = None
        if open_region:
            raise ValueError(f"{module}.py:{open_region[0] + 1}: exercise {open_region[2]!r} is never closed")
        if regions:
            yield node, lines, regions, tree


def registry() -> list[Exercise]:
    """Every exercise, in chapter order."""
    out = []
    for chapter, modules in CHAPTERS.items():
        for module in modules:
            for node, _, regions, _ in _functions_with_regions(module):
                out += [Exercise(name, points, chapter, module, node.name) for *_, name, points in regions]
    names = [e.name for e in out]
    if len(names) != len(set(names)):
        raise ValueError(f"exercise names must be unique: {names}")
    return out


def _imports(module: str, tree: ast.Module, node: ast.AST, local: set[str]) -> list[tuple[str, str]]:
    """(module, name) pairs for what `node` uses: the module's own imports (made absolute, name "" for a plain
    `import x`) and its module-level definitions, except `local` names (defined by the generated file itself).
    For an exercise stub, `node` is the stub itself: what only the answer uses is not imported (that would tell)."""
    used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - local
    pairs = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            pairs += [(ast.unparse(a), "") for a in stmt.names if (a.asname or a.name.split(".")[0]) in used]
        elif isinstance(stmt, ast.ImportFrom):  # relative imports resolved against the module's own package
            package = "minidist." + module.rpartition(".")[0] if "." in module else "minidist"
            base = importlib.util.resolve_name("." * stmt.level + (stmt.module or ""), package) if stmt.level \
                else stmt.module
            pairs += [(base, ast.unparse(a)) for a in stmt.names if (a.asname or a.name) in used]
    defined = {n.id for s in tree.body if isinstance(s, (ast.Assign, ast.AnnAssign))
               for n in ast.walk(s) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    defined |= {s.name for s in tree.body if isinstance(s, (ast.FunctionDef, ast.ClassDef))}
    return pairs + [(f"minidist.{module}", name) for name in sorted(used & defined)]


def _import_block(pairs: list[tuple[str, str]]) -> str:
    """Import lines grouped as isort would: standard library, torch, minidist."""
    froms: dict[str, list[str]] = {}
    plain = []
    for base, name in pairs:
        if name:
            froms.setdefault(base, [])
            froms[base] += [name] if name not in froms[base] else []
        elif base not in plain:
            plain.append(base)
    lines = [f"import {b}" for b in plain] + [f"from {b} import {', '.join(sorted(n))}" for b, n in froms.items()]
    groups = [[ln for ln in lines if not ln.split()[1].startswith(("torch", "minidist"))],
              [ln for ln in lines if ln.split()[1].startswith("torch")],
              [ln for ln in lines if ln.split()[1].startswith("minidist")]]
    return "\n\n".join("\n".join(sorted(g, key=lambda ln: (ln.startswith("from"), ln))) for g in groups if g)


def _render(node: ast.FunctionDef, lines: list[str], regions, solution: bool) -> list[str]:
    start = node.lineno - 1 - len(node.decorator_list)
    body, i = [], start
    for begin, end, indent, name, points in regions:
        body += lines[i:begin]
        region = lines[begin + 1:end]
        n_hints = next((k for k, ln in enumerate(region) if not ln.strip().startswith("#")), len(region))
        unit = "point" if points == 1 else "points"
        body.append(f"{indent}# ---- exercise {name} ({points} {unit}) " + "-" * max(0, 70 - len(name)))
        if solution:
            body += region
        else:  # the leading comment lines are the hints
            body += region[:n_hints] + [f'{indent}raise NotImplementedError("exercise {name}: write this part")']
        body.append(f"{indent}# ---- end of exercise {name} " + "-" * max(0, 77 - len(name)))
        i = end + 1
    return body + lines[i:node.end_lineno]


def render_chapter(chapter: str, solution: bool) -> str:
    title = chapter.split("_", 1)[1].replace("_", " ")
    kind = "solutions" if solution else "exercises"
    header = [f'"""Chapter {chapter[2:4]} ({title}): {kind}.', ""]
    header += ["Fill in every region marked `exercise` (replace its `raise NotImplementedError`), following the",
               "function's docstring and hints; import from minidist whatever else you need (the functions an answer",
               "calls are not imported for you: that would give it away). Check your work as you go:",
               f"    python -m minidist grade {kind}/ --only <exercise name>"] if not solution else [
               "The reference answers: the same code minidist itself runs."]
    header += ["", "Generated by `python -m minidist.exercises` from the marked regions in minidist/; do not edit the",
               'copy in the repository by hand (edit the package and regenerate)."""']
    found = [(module, *f) for module in CHAPTERS[chapter] for f in _functions_with_regions(module)]
    local = {node.name for _, node, *_ in found}
    imports, functions = [], []
    for module, node, lines, regions, tree in found:
        rendered = "\n".join(_render(node, lines, regions, solution))
        # Stubs import what they use, plus the plain modules (torch, dist, math) the answer uses: never a function.
        imports += [pair for pair in _imports(module, tree, node, local) if not pair[1]]
        imports += _imports(module, tree, ast.parse(rendered), local)
        functions.append(rendered)
    return "\n".join(header) + "\n" + _import_block(imports) + "\n\n\n" + "\n\n\n".join(functions) + "\n"


def generate(root: Path = ROOT) -> list[Path]:
    """Write exercises/ and solutions/ under `root`; return the files written."""
    written = []
    for kind, solution in (("exercises", False), ("solutions", True)):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for chapter in CHAPTERS:
            path = root / kind / f"{chapter}.py"
            path.write_text(render_chapter(chapter, solution))
            written.append(path)
    return written


def out_of_date(root: Path = ROOT) -> list[str]:
    """The generated files under `root` that differ from what the generator writes now."""
    stale = []
    for kind, solution in (("exercises", False), ("solutions", True)):
        for chapter in CHAPTERS:
            path = root / kind / f"{chapter}.py"
            if not path.exists() or path.read_text() != render_chapter(chapter, solution):
                stale.append(f"{kind}/{chapter}.py")
    return stale


def stub_source(source: str) -> str:
    """`source` with every exercise region replaced by what the learner's file shows: its hints and a raise."""
    lines, out, skipping = source.splitlines(), [], False
    for line in lines:
        if m := BEGIN.match(line):
            indent, name, skipping, hints = m.group(1), m.group(2), True, True
            out.append(f"{indent}# ---- exercise {name}: yours to write (exercises/, graded by `python -m minidist "
                       f"grade --only {name}`)")
        elif END.match(line):
            out.append(f'{indent}raise NotImplementedError("exercise {name}: write this part")')
            skipping = False
        elif skipping:
            hints = hints and line.strip().startswith("#")
            if hints:
                out.append(line)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def show(func):
    """Display the source of `func` (a function, method or class) as a learner may see it: every exercise region
    replaced by its hints and a stub. Notebooks use this instead of inspect.getsource, so no chapter shows the
    answers to its own exercises."""
    import inspect
    import textwrap
    text = textwrap.dedent(stub_source(inspect.getsource(func)))  # a method's source is indented: remove it evenly
    try:
        from IPython.display import Code
        return Code(text, language="python")
    except ImportError:
        return text


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(f"wrote {p}")
