"""The package's layout: no import cycles between tp_kernels modules, and constants defined once.

An import cycle is what made the code hide imports inside functions ("imports this module: import here");
this test reads every module's imports (function bodies included, `if TYPE_CHECKING:` blocks excluded:
those never run) and fails on any cycle, naming it.
"""
import ast
import os
import re

import tp_kernels

PACKAGE_DIR = os.path.dirname(os.path.abspath(tp_kernels.__file__))
ROOT = os.path.dirname(PACKAGE_DIR)


def _modules():
    """{module name: path} of every .py file of the package, and the compiled extension (path None: it
    imports nothing of the package)."""
    found = {"tp_kernels._C": None}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _type_checking_lines(tree):
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _imports(name, path, modules):
    """The tp_kernels modules that module `name` imports when it runs."""
    if path is None:
        return set()
    tree = ast.parse(open(path).read())
    skip = _type_checking_lines(tree)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
    return {t for t in targets if t in modules and t != name}


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_constants_defined_once():
    """ROPE_STYLES and the parsing of TP_KERNELS_COMM_TIMEOUT each live in one module."""
    definitions = {"ROPE_STYLES =": [], "os.environ.get(TIMEOUT_ENV)": [], "environ.get(TIMEOUT_ENV)": []}
    for name, path in _modules().items():
        if path is None:
            continue
        text = open(path).read()
        for pattern in definitions:
            if re.search(re.escape(pattern), text):
                definitions[pattern].append(name)
    assert definitions["ROPE_STYLES ="] == ["tp_kernels.reference"]
    assert definitions["environ.get(TIMEOUT_ENV)"] == ["tp_kernels.comm.base"]
    assert definitions["os.environ.get(TIMEOUT_ENV)"] == []
