"""The package's import graph: no module imports, directly or through others, a module that
imports it back, whether at module level or inside a function (where a cycle hides until a
call runs the import). Read from the sources with ast, nothing imported."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cattn"


def _module_name(path, package):
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node):
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree, name, is_package, modules):
    """The cattn modules a module's source imports anywhere (functions included), except
    under `if TYPE_CHECKING:`, which never runs."""
    found = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                package = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(package + ([base] if base else []))
            for a in node.names:  # `from cattn import _api`: the submodule itself
                target = f"{base}.{a.name}"
                if target in modules:
                    found.add(target)
                elif base in modules:
                    found.add(base)
        stack.extend(ast.iter_child_nodes(node))
    found.discard(name)
    return found


def import_graph(package=PACKAGE):
    """{module: the cattn modules it imports} over every .py file of the package (the
    compiled-only modules, .pyx, are leaves: they import no Python module of cattn)."""
    paths = {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    modules = set(paths) | {_module_name(p, package) for p in package.rglob("*.pyx")}
    graph = {name: set() for name in modules}
    graph.update({name: _imports(ast.parse(path.read_text(), str(path)), name,
                                 path.name == "__init__.py", modules)
                  for name, path in paths.items()})
    return graph


def import_cycles(graph):
    """The cycles of the graph, each as the list of modules around it (first repeated)."""
    cycles, state = [], {}
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = "open"
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                state[nxt] = "open"
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return cycles


def test_the_graph_is_read():
    """Bug caught: a walker that finds no edges (every test below would pass)."""
    graph = import_graph()
    assert {"cattn", "cattn.layers", "cattn._cache", "cattn.models.bert"} <= set(graph)
    assert {"cattn._api", "cattn._cache"} <= graph["cattn.layers"]
    assert "cattn.layers" in graph["cattn.models.bert"]


def test_cycles_are_found(tmp_path):
    """The walker sees an import inside a function, a relative one and a submodule imported
    by `from package import`, and skips TYPE_CHECKING. Bug caught: a cycle closed only by
    a function-level import passing unseen."""
    package = tmp_path / "cattn"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cattn import c\n")
    (package / "a.py").write_text("from cattn import b\n")
    (package / "b.py").write_text("def f():\n    from cattn.sub.c import g\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from .. import a\n")
    graph = import_graph(package)
    assert graph["cattn"] == set()
    assert import_cycles(graph) == [["cattn.a", "cattn.b", "cattn.sub.c", "cattn.a"]]


# The benchmark's serving cases reuse the suite's summary, and the suite runs them: a
# cycle in the benchmark tool, outside the library, left for the benchmark's own layout.
TOOL_CYCLES = [["cattn.bench.serving", "cattn.bench.suite", "cattn.bench.serving"],
               ["cattn.bench.suite", "cattn.bench.serving", "cattn.bench.suite"]]


def test_no_import_cycles():
    """Bug caught: two modules importing each other (a cache module and the layer module,
    say), which works only as long as one of the imports stays inside a function."""
    cycles = [c for c in import_cycles(import_graph()) if c not in TOOL_CYCLES]
    assert cycles == []
