"""Print the import graph between the package's layers and its clients, and flag every edge that points the
wrong way and every import cycle among the client scripts.

    python tools/import_graph.py [ROOT]        # ROOT: a checkout (default: this one)

The allowed edges (docs/design.md §3): ops -> backends -> triton_kernels; layers -> ops;
losses and optim are plain math (shared utilities only); tta -> layers, losses, optim; svf -> layers, ops
(singular-value fine-tuning of language models); eval -> tta and
the public layers; the package root re-exports everything. Two clients sit on top: benchmarks/ (measurements)
and checks/ (verifications) use the library but not `eval`, and neither imports the other; nothing in the
library imports them. Every package may use the shared utilities (`util`: _extension, overrides, precision,
proc_status, provenance, state_file, text_table). Any other edge is a violation. Inside benchmarks/ and checks/
the scripts import each other by module name (`import bench_common`); those imports must not form a cycle.
Imports inside functions count: a lazy import is still a dependency.
Exit status 1 when a violation or a cycle exists.
"""
import ast
import sys
from collections import defaultdict
from pathlib import Path

ALLOWED = {
    "util": set(),
    "triton_kernels": set(),
    "backends": {"triton_kernels"},
    "ops": {"backends"},
    "layers": {"ops"},
    "losses": set(),
    "optim": set(),
    "tta": {"layers", "losses", "optim"},
    "svf": {"layers", "ops"},
    "eval": {"tta", "layers", "losses", "backends"},
    "root": {"backends", "ops", "layers", "losses", "optim", "tta", "eval", "svf"},
    "benchmarks": {"root", "backends", "ops", "layers", "losses", "optim", "tta", "triton_kernels", "svf"},
    "checks": {"root", "backends", "ops", "layers", "losses", "optim", "tta", "triton_kernels", "svf"},
}
ORDER = list(ALLOWED)
UTIL = {"_extension", "_build_info", "overrides", "precision", "proc_status", "provenance", "state_file",
        "text_table"}
CLIENTS = ("benchmarks", "checks")  # top-level folders of scripts on top of the library
LAYERS = set(ALLOWED) - {"util", "root", *CLIENTS}


def node_of(module: str) -> str:
    """'imse_kernels.ops.planner' -> 'ops'; shared utilities -> 'util'; the package itself -> 'root'."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in UTIL:
        return "util"
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "root"  # the package itself, its __main__, or a name re-exported from it


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] or parts
    return ".".join(parts)


def imports_of(path: Path, module: str, is_pkg: bool):
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".") if is_pkg else module.split(".")[:-1]
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                yield a.name, n.lineno
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package[: len(package) - n.level + 1]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            if n.module is None or n.level:  # `from . import x` / `from .pkg import x`: x may be a module
                for a in n.names:
                    yield f"{target}.{a.name}", n.lineno
            else:
                yield target, n.lineno


def client_scripts(root: Path) -> dict:
    """{client folder: {module name: path}} of benchmarks/ and checks/ (each script imports the others of its
    folder by module name: the folder is on sys.path when a script runs)."""
    return {c: {f.stem: f for f in sorted((root / c).glob("*.py"))} for c in CLIENTS}


def graph(root: Path):
    """(edges between nodes {(src, dst): {"file:line"}}, imports between client scripts {client: {(a, b)}})."""
    scripts = client_scripts(root)
    owner = {name: c for c in CLIENTS for name in scripts[c]}
    files = [(f, None) for f in sorted((root / "imse_kernels").rglob("*.py"))]
    files += [(f, c) for c in CLIENTS for f in scripts[c].values()]
    edges, script_edges = defaultdict(set), {c: set() for c in CLIENTS}
    for f, client in files:
        mod = module_name(f, root) if client is None else f.stem
        src = node_of(mod) if client is None else client
        for target, line in imports_of(f, mod, f.name == "__init__.py"):
            top = target.split(".")[0]
            if top == "imse_kernels":
                dst = node_of(target)
            elif client is not None and top in scripts[client]:  # a script of its own folder
                dst = client
                if top != mod:
                    script_edges[client].add((mod, top))
            elif top in owner:  # a script of a client folder, from the library or from the other client
                dst = owner[top]
            else:
                continue
            if dst != src:
                edges[(src, dst)].add(f"{f.relative_to(root)}:{line}")
    return edges, script_edges


def cycles(pairs: set) -> list:
    """Every import cycle among the modules of `pairs` ({(importer, imported)}), one per strongly connected
    component, as a closed path [a, b, ..., a]."""
    succ = defaultdict(list)
    for a, b in sorted(pairs):
        succ[a].append(b)
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted({m for pair in pairs for m in pair}):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # one closed path through the component, from its first module in name order
        start = min(comp)
        path, seen = [start], {start}
        while True:
            nxt = min(w for w in succ[path[-1]] if w in comp)
            path.append(nxt)
            if nxt in seen:
                break
            seen.add(nxt)
        out.append(path[path.index(path[-1]):])
    return out


def violates(src: str, dst: str) -> bool:
    return dst != "util" and dst not in ALLOWED[src]


def main(argv) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1])
    edges, script_edges = graph(root)
    bad = 0
    for (src, dst), where in sorted(edges.items(), key=lambda e: (ORDER.index(e[0][0]), ORDER.index(e[0][1]))):
        flag = violates(src, dst)
        bad += flag
        print(f"{'VIOLATION ' if flag else ''}{src:>14} -> {dst:<14} ({len(where)} import{'s' * (len(where) > 1)})")
        if flag:
            for w in sorted(where):
                print(f"{'':>26}{w}")
    n_cycles = 0
    for client in CLIENTS:
        found = cycles(script_edges[client])
        n_cycles += len(found)
        print(f"{client}/: {len(script_edges[client])} imports between its scripts, {len(found)} cycles")
        for path in found:
            print(f"CYCLE {client}/: {' -> '.join(path)}")
    print(f"{len(edges)} edges, {bad} pointing the wrong way, {n_cycles} import cycles among the scripts")
    return 1 if bad or n_cycles else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
