"""The package has no import cycles: every module can be read (and replaced) on its own."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_package_imports_itself_through_others():
    assert _cycles(_import_graph()) == []


def _crossings(graph: dict[str, set[str]], package: str, forbidden: tuple[str, ...]) -> list[tuple[str, str]]:
    """(module, import) pairs where a module of ``package`` imports one of ``forbidden``."""
    def inside(name: str, pkg: str) -> bool:
        return name == pkg or name.startswith(pkg + ".")

    return sorted((m, t) for m, targets in graph.items() if inside(m, package)
                  for t in targets if any(inside(t, f) for f in forbidden))


def test_the_crossing_finder_finds_a_runtime_module_importing_the_simulator():
    graph = {"gossamer.runtime.peer": {"gossamer.sim.drivers.base", "gossamer.protocols"},
             "gossamer.cli": {"gossamer.sim"}, "gossamer.simple": set()}
    assert _crossings(graph, "gossamer.runtime", ("gossamer.sim",)) == [
        ("gossamer.runtime.peer", "gossamer.sim.drivers.base")]
    assert _crossings({"gossamer.runtime": {"gossamer.simple"}}, "gossamer.runtime", ("gossamer.sim",)) == []


def test_the_runtime_never_imports_the_simulator():
    """runtime/ executes the protocols on real processes; anything both executors need lives
    in protocols/, algorithms/ or the shared experiment builder, never in sim/."""
    assert _crossings(_import_graph(), "gossamer.runtime", ("gossamer.sim",)) == []


def test_protocols_and_algorithms_never_import_an_executor():
    graph = _import_graph()
    for package in ("gossamer.protocols", "gossamer.algorithms"):
        assert _crossings(graph, package, ("gossamer.sim", "gossamer.runtime")) == []
