"""The house's layout, guarded: small modules, no import cycle, layers that import only downward.

Cheap: every .py under trainer/, cluster/, data/ and models/ is parsed with `ast`; nothing is imported.
Imports are followed at module level and inside functions alike (a function-level import is a lazy
one, still a dependency): `import a.b`, `from a.b import c` (the submodule a.b.c where it exists, else
the module a.b) and relative imports. Imports by computed name (importlib.import_module(name): the CLI's
subcommand table, trainer.eval's lazy exports) are not followed.

The layers (docs/design.md): cluster/ -> trainer/ -> models/, data/.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "cluster", "data", "models")
MAX_LINES = 450

# Temporary: these three are being split on other branches right now (the config onto pydantic in
# trainer/config/; cluster/plan.py and cluster/submit.py by the cluster reorganisation). The lead removes
# this allow-list when those branches merge. An entry that is gone or small again is not an error.
OVERSIZE_ALLOWED: set[str] = set()

# trainer's sub-packages: no import cycle among these, at package level either.
TRAINER_SUBPACKAGES = ("trainer.checkpoint", "trainer.config", "trainer.tracking", "trainer.eval", "trainer.loop")

# Layer violations that exist on other engineers' files, each "importer -> imported" with the reason it
# is tolerated; empty: none found.
LAYER_ALLOWED: dict[str, str] = {}

# Package-level cycles found on files other engineers own, tolerated until they are cut (each a sorted tuple
# of packages: the edges behind it, and why it is not a module cycle). The test names any new one.
PACKAGE_CYCLES_ALLOWED: dict[tuple[str, ...], str] = {
    # trainer's own top-level modules count as the package `trainer`: trainer.model_io -> trainer.checkpoint.store
    # (model_io.py:52, function level: what "committed" means) against trainer.checkpoint.manager -> trainer.faults
    # (manager.py:39, the fault-injection hooks). Two unrelated leaf modules, no module cycle; it goes once
    # model_io (a checkpoint reader) lives in trainer/checkpoint/ or faults in a package of its own.
    ("trainer", "trainer.checkpoint"): "trainer's loose modules: model_io reads checkpoints, checkpoint calls faults",
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of ours (a package by its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The module of ours that `name` (a module, or an attribute inside one) lives in; None: not ours."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def _imports(name: str) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in module `name`, at any depth."""
    path = MODULES[name]
    package = name if _is_package(name) else name.rpartition(".")[0]
    edges = []
    tree = ast.parse(path.read_text(), str(path))
    # `if TYPE_CHECKING:` imports are for annotations only: they never run, so they close no cycle
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                   for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package (level 1) or above it
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != name:
                edges.append((resolved, node.lineno))
    return edges


GRAPH: dict[str, list[tuple[str, int]]] = {name: _imports(name) for name in MODULES}


def _where(importer: str, imported: str) -> str:
    lines = [line for target, line in GRAPH[importer] if target == imported]
    return f"{importer} -> {imported} ({MODULES[importer].relative_to(REPO)}:{lines[0]})"


def _package(name: str) -> str:
    return name if _is_package(name) else name.rpartition(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative): each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(component: list[str], graph: dict[str, set[str]], edge_text) -> str:
    members = set(component)
    edges = [edge_text(a, b) for a in component for b in sorted(graph[a]) if b in members]
    return f"{' <-> '.join(component)}: " + "; ".join(edges)


def _package_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """Packages and the imports between them; for each package edge, one module import behind it."""
    graph: dict[str, set[str]] = defaultdict(set)
    witness: dict[tuple[str, str], str] = {}
    for importer, edges in GRAPH.items():
        graph[_package(importer)]
        for imported, _line in edges:
            a, b = _package(importer), _package(imported)
            if a != b:
                graph[a].add(b)
                witness.setdefault((a, b), _where(importer, imported))
    return graph, witness


def test_no_module_is_over_the_size_limit():
    over = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in MODULES.values()}
    over = {rel: lines for rel, lines in over.items() if lines > MAX_LINES and rel not in OVERSIZE_ALLOWED}
    assert not over, f"modules over {MAX_LINES} lines (split them by concern): {over}"


def test_no_import_cycle_between_modules():
    graph = {name: {target for target, _ in edges} for name, edges in GRAPH.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles between modules:\n" + "\n".join(
        _describe(component, graph, _where) for component in cycles)


def test_no_import_cycle_between_packages():
    """Collapsed to packages (trainer.loop, trainer.checkpoint, cluster.cli, data, ...): every cycle is
    named with one import behind each of its edges; none is allowed among trainer's sub-packages."""
    graph, witness = _package_graph()
    cycles = {tuple(component): _describe(component, graph, lambda a, b: witness[(a, b)])
              for component in _cycles(graph)}
    unexpected = {members: text for members, text in cycles.items() if members not in PACKAGE_CYCLES_ALLOWED}
    assert not unexpected, "import cycles between packages:\n" + "\n".join(unexpected.values())
    for members in cycles:
        inside_trainer = [package for package in members if package in TRAINER_SUBPACKAGES]
        assert len(inside_trainer) < 2, f"a cycle among trainer's sub-packages: {cycles[members]}"


def test_layers_import_only_downward():
    """models/ and data/ import nothing of ours (of trainer/ and cluster/ above all: docs/design.md has them
    apart from each other too); trainer/ imports nothing of cluster/."""
    forbidden = {"models": ("trainer", "cluster", "data"), "data": ("trainer", "cluster", "models"),
                 "trainer": ("cluster",)}
    found = {}
    for importer, edges in GRAPH.items():
        above = forbidden.get(importer.split(".")[0], ())
        for imported, _line in edges:
            if imported.split(".")[0] in above:
                found[f"{importer} -> {imported}"] = _where(importer, imported)
    unexpected = {key: text for key, text in found.items() if key not in LAYER_ALLOWED}
    assert not unexpected, "imports against the layers:\n" + "\n".join(sorted(unexpected.values()))


def test_the_guards_see_what_they_guard():
    """The graph is real: known imports are in it (a parser that saw nothing would pass every test above)."""
    assert len(MODULES) > 50
    assert "trainer.checkpoint.manager" in {target for target, _ in GRAPH["trainer.loop.run"]}
    assert "trainer.loop.run" in {target for target, _ in GRAPH["cluster.driver.fit"]}  # a function-level import
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
