"""The package's modules import each other without cycles, counting imports inside functions too (a deferred
import still ties two modules together: neither can be read, moved or tested without the other)."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"fastrl": os.path.join(ROOT, "fastrl"), "fastrl.kernels": os.path.join(ROOT, "kernels")}


def module_files() -> dict[str, str]:
    """module name -> file, for every .py file of fastrl and fastrl.kernels (installed layout)."""
    out = {}
    for package, folder in PACKAGES.items():
        for dirpath, dirnames, files in os.walk(folder):
            rel = os.path.relpath(dirpath, folder)
            if package == "fastrl" and rel.split(os.sep)[0] == "kernels":
                dirnames.clear()  # the symlink to ../kernels: walked as fastrl.kernels
                continue
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


def imports_of(name: str, path: str, modules: set[str]) -> set[str]:
    """The fastrl modules `name` imports anywhere in its file (top level or inside functions)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod when there is one
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_plan_and_bench_modules_are_found():
    files = module_files()
    assert {"fastrl.plan.predict", "fastrl.plan.advice", "fastrl.bench.worker", "fastrl.kernels.checks"} <= set(files)
    graph = {m: imports_of(m, p, set(files)) for m, p in files.items()}
    assert "fastrl.plan.predict" in graph["fastrl.plan.advice"]  # a deferred or relative import is an edge too
    assert "fastrl.bench.e2e" in graph["fastrl.bench.worker"]


def test_no_import_cycles():
    files = module_files()
    graph = {m: imports_of(m, p, set(files)) for m, p in files.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
