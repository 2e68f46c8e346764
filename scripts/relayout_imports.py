#!/usr/bin/env python3
"""Rewrite minidist's old flat module paths to the folder-per-technique layout (issue 20). Idempotent.

    python relayout_imports.py FILE...            rewrite in place (.py, .ipynb, .md); prints each file it changed
    python relayout_imports.py --check FILE...    change nothing; exit 1 if some file would change
    python relayout_imports.py --table            print the mapping old -> new (MAPPING below)
    --root DIR    the repository whose minidist/ already has the new layout (default: found above each file)

What it rewrites, in every file it is given:
  * imports of an old module, absolute or relative (`from minidist.p2p import send`, `from minidist import p2p`,
    `import minidist.batching as batching`, `from .tp_plans import parallelize`, `from . import flight`), in .py
    files, notebook code cells and fenced python blocks of .md files. An old module that is now a package of the
    same name (comm, data_parallel, tensor_parallel, zero, fsdp, checkpoint, memory, compression, plots) keeps its
    import when the package exports every name used (`from minidist.zero import ZeroOptimizer` stays); otherwise
    the import goes to the module that holds the names (`from minidist import checkpoint` in a file that
    monkeypatches `checkpoint.read_pieces` becomes `from minidist.checkpoint import save_load as checkpoint`).
    A module imported as a name keeps that name (`from minidist.comm import ring as collectives`), so the code
    that uses it does not change;
  * dotted paths in any text: comments, strings, markdown, notebook outputs (`minidist.batching.Engine` ->
    `minidist.serving.batching.Engine`), file paths (`minidist/zero_state.py` -> `minidist/zero/state.py`), and
    bare file names that existed once and only in the old layout (`tp_plans.py` -> `tensor_parallel/plans.py`).
    In a notebook's text/latex outputs it also matches the names with pygments' escaped underscores (\\PYZus{}).

Relative imports in a package module are read against the module's current place; an import that does not resolve
there is read against the place the module had in the old layout (MAPPING inverted), so the script can run on a
moved file before or after its imports were fixed. Notebooks are rewritten through their JSON, and written back
byte for byte as before except for the changed strings (the script refuses a notebook it cannot write back exactly).
"""
import argparse
import ast
import importlib.util
import json
import re
import sys
from functools import cache
from pathlib import Path

MAPPING = {  # old module -> new module
    "minidist.comm": "minidist.comm.collectives",
    "minidist.p2p": "minidist.comm.p2p",
    "minidist.checkpoint_files": "minidist.checkpoint.files",
    "minidist.serve_limits": "minidist.serving.limits",
    "minidist.ledger": "minidist.comm.ledger",
    "minidist.backend": "minidist.comm.backend",
    "minidist.collectives": "minidist.comm.ring",
    "minidist.flight": "minidist.comm.flight",
    "minidist.diagnose": "minidist.comm.diagnose",
    "minidist.data_parallel": "minidist.data_parallel.wrapper",
    "minidist.reducer": "minidist.data_parallel.reducer",
    "minidist.buckets": "minidist.data_parallel.buckets",
    "minidist.tensor_parallel": "minidist.tensor_parallel.layers",
    "minidist.vocab_parallel": "minidist.tensor_parallel.vocab",
    "minidist.tp_plans": "minidist.tensor_parallel.plans",
    "minidist.zero": "minidist.zero.optimizer",
    "minidist.zero_state": "minidist.zero.state",
    "minidist.fsdp": "minidist.fsdp.units",
    "minidist.fsdp_state": "minidist.fsdp.state",
    "minidist.checkpoint": "minidist.checkpoint.save_load",
    "minidist.checkpoint_format": "minidist.checkpoint.file_format",
    "minidist.checkpoint_layout": "minidist.checkpoint.layout",
    "minidist.memory": "minidist.memory.accounting",
    "minidist.checkpointing": "minidist.memory.recompute",
    "minidist.offload": "minidist.memory.offload",
    "minidist.compression": "minidist.compression.hooks",
    "minidist.powersgd": "minidist.compression.powersgd",
    "minidist.futures": "minidist.compression.futures",
    "minidist.inference": "minidist.serving.inference",
    "minidist.batching": "minidist.serving.batching",
    "minidist.balancer": "minidist.serving.balancer",
    "minidist.cluster": "minidist.serving.cluster",
    "minidist.replica": "minidist.serving.replica",
    "minidist.serve": "minidist.serving.app",
    "minidist.plots": "minidist.plots.training",
    "minidist.plots_inference": "minidist.plots.serving",
}
INVERSE = {new: old for old, new in MAPPING.items()}
SHADOWED = {old for old, new in MAPPING.items() if new.startswith(old + ".")}  # old modules that are packages now
# Old file names that named one file only, and name none in the new layout: safe to rewrite where they stand alone.
BARE = {"comm", "vocab_parallel", "tp_plans", "zero_state", "fsdp_state", "checkpoint_format", "checkpoint_layout",
        "memory", "plots", "plots_inference"}
LINE = 120  # the longest line a generated import may have before it is wrapped


def path_of(module: str) -> str:
    return module.replace(".", "/") + ".py"


# ---- the new layout, read from the repository ---------------------------------------------------------------------

class Layout:
    """The modules of the new layout under `root`/minidist, and what each one binds at its top level."""

    def __init__(self, root: Path):
        self.root = root
        if not (root / "minidist" / "comm" / "__init__.py").exists():
            raise SystemExit(f"{root} does not have the new layout (no minidist/comm/__init__.py): pass --root")
        self.files = {}
        for p in sorted((root / "minidist").rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            self.files[name] = p

    def is_module(self, name: str) -> bool:
        return name in self.files

    def is_package(self, name: str) -> bool:
        return name in self.files and self.files[name].name == "__init__.py"

    @cache
    def bindings(self, module: str) -> tuple[frozenset, frozenset]:
        """(names defined, names imported) at the top level of `module`; a package's submodules count as defined."""
        if module not in self.files:
            return frozenset(), frozenset()
        tree = ast.parse(self.files[module].read_text())
        defined, imported = set(), set()
        for stmt in tree.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(stmt.name)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            elif isinstance(stmt, ast.Import):
                imported |= {a.asname or a.name.split(".")[0] for a in stmt.names}
            elif isinstance(stmt, ast.ImportFrom):
                imported |= {a.asname or a.name for a in stmt.names}
        if self.is_package(module):
            defined |= {m.rpartition(".")[2] for m in self.files if m.rpartition(".")[0] == module}
        return frozenset(defined), frozenset(imported)

    def binds(self, module: str, name: str) -> bool:
        defined, imported = self.bindings(module)
        return name in defined or name in imported

    def home(self, old: str, name: str) -> str:
        """The new module that holds `name`, an attribute of the old module `old`: the module `old` became if it
        defines the name, else the module of the same package that defines it, else one that imports it."""
        new = MAPPING.get(old, old)
        package = new.rpartition(".")[0]
        siblings = [m for m in self.files if m.rpartition(".")[0] == package and m != new]
        for m in [new, *siblings]:
            if name in self.bindings(m)[0]:
                return m
        for m in [new, *siblings, package]:
            if name in self.bindings(m)[1]:
                return m
        return new


# ---- what a piece of python code does with the names it imports --------------------------------------------------

def usage(tree: ast.AST) -> dict[str, tuple[set, bool]]:
    """For every name in `tree`: the attributes read from it (x.attr) and whether it is also used bare (passed to a
    function such as monkeypatch.setattr, assigned to, ...), where the attributes of a package would not do."""
    attrs: dict[str, set] = {}
    bare: set = set()
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            parent = parents.get(id(node))
            if isinstance(parent, ast.Attribute) and parent.value is node:
                attrs.setdefault(node.id, set()).add(parent.attr)
            else:
                bare.add(node.id)
    return {name: (attrs.get(name, set()), name in bare) for name in set(attrs) | bare}


class Rewriter:
    def __init__(self, layout: Layout):
        self.layout = layout

    # Where each imported name goes. `names`: (name, asname) pairs; returns [(module, name, asname), ...].
    def place(self, base: str, names, uses, inside: str | None) -> list[tuple[str, str, str | None]]:
        out = []
        for name, asname in names:
            full = f"{base}.{name}"
            if full in MAPPING:  # an old module imported as a name: `from minidist import p2p`
                local = asname or name
                if full in SHADOWED and self.facade_serves(full, *uses.get(local, (set(), False)), inside):
                    out.append((base, name, asname))
                else:
                    parent, _, leaf = MAPPING[full].rpartition(".")
                    out.append((parent, leaf, None if leaf == local else local))
            elif self.layout.is_module(full) or base not in MAPPING:
                out.append((base, name, asname))
            elif base in SHADOWED and self.layout.binds(base, name) and not self.within(inside, base):
                out.append((base, name, asname))  # the package exports it: `from minidist.zero import ZeroOptimizer`
            else:
                out.append((self.layout.home(base, name), name, asname))
        return out

    def facade_serves(self, package: str, attrs: set, bare: bool, inside: str | None) -> bool:
        """Whether the new package can stand for the old module of the same name in this code: it exports every
        attribute read, the name is never used bare (monkeypatch.setattr(module, ...)), and the code is not in it."""
        return not bare and not self.within(inside, package) and all(self.layout.binds(package, a) for a in attrs)

    @staticmethod
    def within(inside: str | None, package: str) -> bool:
        return inside is not None and (inside == package or inside.startswith(package + "."))

    def import_from(self, node: ast.ImportFrom, uses, current: str | None) -> list[tuple] | None:
        """The statements (module or relative text, name, asname) that replace `node`, or None to leave it."""
        names = [(a.name, a.asname) for a in node.names]
        if node.level == 0:
            if not (node.module or "").startswith("minidist") or names == [("*", None)]:
                return None
            placed = self.place(node.module, names, uses, current)
            return None if placed == [(node.module, n, a) for n, a in names] else placed
        if current is None:
            return None
        package = current if self.layout.is_package(current) else current.rpartition(".")[0]
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        if self.valid(base, names) and base not in MAPPING and not any(f"{base}.{n}" in MAPPING for n, _ in names):
            return None  # right where the module stands now
        if not self.valid(base, names):  # written for the module's old place
            old = INVERSE.get(current, current)
            old_package = old if self.layout.is_package(current) and old == current else old.rpartition(".")[0]
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), old_package)
            except ImportError:
                return None
        placed = self.place(base, names, uses, current)
        relative = [(self.relative(m, package), n, a) for m, n, a in placed]
        original = "." * node.level + (node.module or "")
        return None if relative == [(original, n, a) for n, a in names] else relative

    def valid(self, base: str, names) -> bool:
        return self.layout.is_module(base) and all(
            self.layout.is_module(f"{base}.{n}") or self.layout.binds(base, n) for n, _ in names)

    @staticmethod
    def relative(module: str, package: str) -> str:
        """`module` as seen from a module of `package`: "..comm", ".ring", "."."""
        target, here = module.split("."), package.split(".")
        common = 0
        while common < min(len(target), len(here)) and target[common] == here[common]:
            common += 1
        return "." * (len(here) - common + 1) + ".".join(target[common:])

    def import_plain(self, node: ast.Import, uses, current: str | None) -> list[str] | None:
        out, changed = [], False
        for a in node.names:
            if a.name in MAPPING and a.asname:
                keep = a.name in SHADOWED and self.facade_serves(a.name, *uses.get(a.asname, (set(), False)),
                                                                  current)
                out.append(f"{a.name if keep else MAPPING[a.name]} as {a.asname}")
                changed |= not keep
            elif a.name in MAPPING and a.name not in SHADOWED:  # `import minidist.batching`: its uses are text
                out.append(MAPPING[a.name])
                changed = True
            else:
                out.append(a.name + (f" as {a.asname}" if a.asname else ""))
        return out if changed else None

    # ---- python source ----------------------------------------------------------------------------------------

    def python(self, source: str, current: str | None = None, uses=None) -> str:
        """`source` with its imports of old modules rewritten, then its text (comments, strings) too. `current`:
        the module's name when the source is a module of the package (relative imports); `uses`: usage() of the
        code that shares its names (a notebook's other cells), else computed from `source`."""
        tree = parse(source)
        if tree is None:
            return self.text(source)
        uses = usage(tree) if uses is None else uses
        lines = source.splitlines(keepends=True)
        edits = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                placed = self.import_from(node, uses, current)
                if placed is not None:
                    edits.append((node, self.render_from(placed, node, lines)))
            elif isinstance(node, ast.Import):
                names = self.import_plain(node, uses, current)
                if names is not None:
                    edits.append((node, "import " + ", ".join(names)))
        for node, text in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
            start = offset(lines, node.lineno, node.col_offset)
            stop = offset(lines, node.end_lineno, node.end_col_offset)
            joined = "".join(lines)
            lines = (joined[:start] + text + joined[stop:]).splitlines(keepends=True)
        return self.text("".join(lines))

    def render_from(self, placed, node: ast.ImportFrom, lines: list[str]) -> str:
        """The new statement(s): the original text with only its module replaced when every name goes to one module
        under its own name (line breaks and parentheses kept), else one statement per module, wrapped at LINE."""
        original = statement_text(lines, node)
        modules = list(dict.fromkeys(m for m, _, _ in placed))
        same_names = all((n, a) == (b.name, b.asname) for (_, n, a), b in zip(placed, node.names))
        if len(modules) == 1 and same_names:
            kept = re.sub(r"^from\s+\S+", f"from {modules[0]}", original, count=1)
            if widest(kept, node.col_offset) <= LINE or widest(original, node.col_offset) > LINE or "#" in original:
                return kept
            # the longer module pushed a line past LINE: wrap the names again (no comment inside is lost)
        indent = " " * node.col_offset
        prefix = lines[node.lineno - 1][:node.col_offset]
        sep = "\n" + indent if not prefix.strip() else "; "
        return sep.join(wrap(m, [f"{n} as {a}" if a else n for mm, n, a in placed if mm == m], node.col_offset)
                        for m in modules)

    # ---- text: comments, strings, markdown, outputs -------------------------------------------------------------

    def text(self, s: str, latex: bool = False) -> str:
        us = r"(?:_|\\PYZus\{\})" if latex else "_"

        def lit(name: str) -> str:
            return re.escape(name).replace("_", us)

        def same_escaping(found: str, new: str) -> str:
            return new.replace("_", r"\PYZus{}") if latex and r"\PYZus{}" in found else new

        def plain(found: str) -> str:
            return found.replace(r"\PYZus{}", "_")

        # minidist/old.py -> minidist/new/path.py
        for old, new in MAPPING.items():
            pattern = r"(?<![\w.])" + lit(path_of(old)) + r"\b"
            s = re.sub(pattern, lambda m, new=new: same_escaping(m.group(0), path_of(new)), s)
        # bare old.py, where only one file had that name and none has it now
        for name in sorted(BARE):
            new = path_of(MAPPING[f"minidist.{name}"]).removeprefix("minidist/")
            pattern = r"(?<![\w/.\\-])" + lit(name + ".py") + r"\b"
            s = re.sub(pattern, lambda m, new=new: same_escaping(m.group(0), new), s)
        # minidist.old[.attr]
        names = sorted(MAPPING, key=len, reverse=True)
        pattern = r"(?<![\w.])(" + "|".join(lit(n) for n in names) + r")(?![\w])((?:\.)(" + r"(?:[A-Za-z0-9]|" + us + \
                  r")+))?"

        def dotted(m: re.Match) -> str:
            old, attr = plain(m.group(1)), plain(m.group(3)) if m.group(3) else None
            if old in SHADOWED and (attr is None or self.layout.binds(old, attr)):
                return m.group(0)  # the package stands for the old module here
            if attr is None:
                return same_escaping(m.group(0), MAPPING[old])
            if self.layout.is_module(f"{MAPPING[old]}.{attr}"):
                return m.group(0)
            return same_escaping(m.group(0), f"{self.layout.home(old, attr)}.{attr}")
        return re.sub(pattern, dotted, s)

    # ---- files ----------------------------------------------------------------------------------------------------

    def module_name(self, path: Path) -> str | None:
        try:
            parts = path.resolve().relative_to(self.layout.root.resolve()).with_suffix("").parts
        except ValueError:
            return None
        if not parts or parts[0] != "minidist":
            return None
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def file(self, path: Path) -> str:
        original = path.read_text()
        if path.suffix == ".py":
            return self.python(original, self.module_name(path))
        if path.suffix == ".ipynb":
            return self.notebook(original, path)
        if path.suffix == ".md":
            return self.markdown(original)
        return self.text(original)

    def notebook(self, original: str, path: Path) -> str:
        nb = json.loads(original)
        dump = notebook_dumper(nb, original, path)
        cells = nb["cells"]
        uses: dict = {}
        for c in cells:  # the names every code cell shares: one usage table for the notebook
            tree = parse(mask_magics(cell_source(c))[0]) if c["cell_type"] == "code" else None
            for name, (attrs, bare) in (usage(tree) if tree is not None else {}).items():
                known = uses.setdefault(name, (set(), False))
                uses[name] = (known[0] | attrs, known[1] or bare)
        for c in cells:
            source = cell_source(c)
            if c["cell_type"] == "code":
                masked, magics = mask_magics(source)
                new = unmask_magics(self.python(masked, None, uses), magics, self.text)
            else:
                new = self.text(source)
            if new != source:
                c["source"] = split_lines(new) if isinstance(c["source"], list) else new
            for out in c.get("outputs", []):
                if "text" in out:
                    out["text"] = self.strings(out["text"])
                for mime, value in out.get("data", {}).items():
                    if mime.startswith("text/"):
                        out["data"][mime] = self.strings(value, latex=mime == "text/latex")
        return dump(nb)

    def strings(self, value, latex: bool = False):
        if isinstance(value, list):
            joined = "".join(value)
            new = self.text(joined, latex)
            return value if new == joined else split_lines(new)
        return self.text(value, latex)

    def markdown(self, original: str) -> str:
        """Fenced python blocks are code (their imports rewritten, sharing one usage table); the rest is text."""
        fence = re.compile(r"(^```(?:python|py)\s*\n)(.*?)(^```)", re.S | re.M)
        blocks = [m.group(2) for m in fence.finditer(original)]
        tree = parse("\n".join(blocks))
        uses = usage(tree) if tree is not None else None
        out, last = [], 0
        for m in fence.finditer(original):
            out += [self.text(original[last:m.start()]), m.group(1), self.python(m.group(2), None, uses), m.group(3)]
            last = m.end()
        out.append(self.text(original[last:]))
        return "".join(out)


# ---- helpers ------------------------------------------------------------------------------------------------------

def parse(source: str):
    try:
        return ast.parse(source)
    except SyntaxError:
        return None


def offset(lines: list[str], lineno: int, col: int) -> int:
    """The character offset of (lineno, col), col counted in UTF-8 bytes as ast counts it."""
    before = sum(len(line) for line in lines[:lineno - 1])
    return before + len(lines[lineno - 1].encode()[:col].decode())


def statement_text(lines: list[str], node: ast.AST) -> str:
    joined = "".join(lines)
    return joined[offset(lines, node.lineno, node.col_offset):offset(lines, node.end_lineno, node.end_col_offset)]


def widest(statement: str, indent: int) -> int:
    """The longest line of a statement that starts at column `indent`."""
    lines = statement.splitlines() or [""]
    return max(indent + len(lines[0]), *map(len, lines[1:])) if len(lines) > 1 else indent + len(lines[0])


def wrap(module: str, names: list[str], indent: int) -> str:
    """`from module import names` for a statement at column `indent`, wrapped in parentheses past LINE."""
    one = f"from {module} import {', '.join(names)}"
    if indent + len(one) <= LINE:
        return one
    head = f"from {module} import ("
    lines, current, width = [], head, indent  # width: the columns before `current` on its line
    for k, name in enumerate(names):
        piece = name + (")" if k == len(names) - 1 else ",")
        candidate = current + ("" if current == head else " ") + piece
        if width + len(candidate) > LINE and current != head:
            lines.append(current)
            current, width = " " * (indent + len(head)) + piece, 0
        else:
            current = candidate
    return "\n".join(lines + [current])


def cell_source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def split_lines(s: str) -> list[str]:
    return s.splitlines(keepends=True)


MAGIC = re.compile(r"^[ \t]*[%!].*$", re.M)
PLACEHOLDER = "#relayout-magic-{}"


def mask_magics(source: str) -> tuple[str, list[str]]:
    """IPython magics (%time, !ls) replaced by numbered comment lines, so that the cell parses as python."""
    magics = []

    def hide(m):
        magics.append(m.group(0))
        return PLACEHOLDER.format(len(magics) - 1)
    return MAGIC.sub(hide, source), magics


def unmask_magics(new: str, magics: list[str], text) -> str:
    """Put back the magics, their text rewritten by `text` (`!python -m minidist.serve` names a module too)."""
    for k, magic in enumerate(magics):
        new = new.replace(PLACEHOLDER.format(k), text(magic), 1)
    return new


def notebook_dumper(nb, original: str, path: Path):
    """How this notebook was written (nbformat: indent 1, non-ASCII kept, keys as found or sorted), checked by
    writing it back unchanged; the function that writes it the same way."""
    for sort in (False, True):
        for ascii_ in (False, True):
            def dump(obj, sort=sort, ascii_=ascii_):
                return json.dumps(obj, indent=1, sort_keys=sort, ensure_ascii=ascii_) + "\n"
            if dump(nb) == original:
                return dump
    raise SystemExit(f"{path}: cannot write this notebook back byte for byte; rewrite it by hand")


def find_root(path: Path) -> Path:
    for parent in path.resolve().parents:
        if (parent / "minidist" / "__init__.py").exists():
            return parent
    raise SystemExit(f"{path}: no minidist/ above it: pass --root")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--root", type=Path, help="the repository with the new layout (default: above each file)")
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a file would change")
    parser.add_argument("--table", action="store_true", help="print the mapping old -> new")
    args = parser.parse_args(argv)
    if args.table or not args.files:
        width = max(map(len, MAPPING))
        print("\n".join(f"{old:<{width}}  ->  {new}" for old, new in MAPPING.items()))
        return 0
    rewriters: dict[Path, Rewriter] = {}
    changed = []
    for path in args.files:
        root = (args.root or find_root(path)).resolve()
        rewriter = rewriters.setdefault(root, Rewriter(Layout(root)))
        new = rewriter.file(path)
        if new != path.read_text():
            changed.append(path)
            if not args.check:
                path.write_text(new)
            print(f"{'would rewrite' if args.check else 'rewrote'} {path}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
