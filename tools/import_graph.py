"""Print the package's import graph between its layers and flag every edge that points the wrong way.

    python tools/import_graph.py [ROOT]        # ROOT: a checkout (default: this one)

The allowed edges (docs/design.md §3): ops -> backends -> triton_kernels; layers -> ops;
losses and optim are plain math (shared utilities only); tta -> layers, losses, optim; svf -> layers, ops
(singular-value fine-tuning of language models); eval -> tta and
the public layers; the package root re-exports everything; benchmarks use the library but not `eval`.
Every package may use the shared utilities (`util`: _extension, overrides, precision, proc_status, state_file).
Any other edge is a violation. Imports inside functions count: a lazy import is still a dependency.
Exit status 1 when a violation exists.
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
}
ORDER = list(ALLOWED)
UTIL = {"_extension", "_build_info", "overrides", "precision", "proc_status", "state_file"}


def node_of(module: str) -> str:
    """'imse_kernels.ops.planner' -> 'ops'; shared utilities -> 'util'; the package itself -> 'root'."""
    parts = module.split(".")
    if parts[0] != "imse_kernels":
        return "benchmarks"
    if len(parts) > 1 and parts[1] in UTIL:
        return "util"
    if len(parts) > 1 and parts[1] in ALLOWED and parts[1] not in ("util", "root", "benchmarks"):
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


def graph(root: Path):
    files = sorted((root / "imse_kernels").rglob("*.py")) + sorted((root / "benchmarks").glob("*.py"))
    edges = defaultdict(set)
    for f in files:
        mod = module_name(f, root)
        src = node_of(mod) if mod.startswith("imse_kernels") else "benchmarks"
        for target, line in imports_of(f, mod, f.name == "__init__.py"):
            if not target.startswith("imse_kernels"):
                continue
            dst = node_of(target)
            if dst != src:
                edges[(src, dst)].add(f"{f.relative_to(root)}:{line}")
    return edges


def violates(src: str, dst: str) -> bool:
    return dst != "util" and dst not in ALLOWED[src]


def main(argv) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1])
    edges = graph(root)
    bad = 0
    for (src, dst), where in sorted(edges.items(), key=lambda e: (ORDER.index(e[0][0]), ORDER.index(e[0][1]))):
        flag = violates(src, dst)
        bad += flag
        print(f"{'VIOLATION ' if flag else ''}{src:>14} -> {dst:<14} ({len(where)} import{'s' * (len(where) > 1)})")
        if flag:
            for w in sorted(where):
                print(f"{'':>26}{w}")
    print(f"{len(edges)} edges, {bad} pointing the wrong way")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
