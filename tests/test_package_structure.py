"""The package's shape holds: no import cycles, no import from a lower layer to a higher one (imports inside
functions and modules named in strings for lazy loading included), no module over 400 lines, a one-line
docstring for every package, and other libraries' private API used only in dtrain/compat.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dtrain"
MAX_LINES = 400

# Lower layers first. A module may import its own layer (without cycles) and the layers below it.
LAYERS = [
    ("core", ["dtrain.errors", "dtrain.utils", "dtrain.compat", "dtrain.faults", "dtrain.distributed",
              "dtrain.config", "dtrain.rng", "dtrain.lock", "dtrain.weights", "dtrain.checksum", "dtrain.durations",
              "dtrain.redact"]),
    ("storage and data", ["dtrain.checkpoint", "dtrain.data"]),
    ("integrations", ["dtrain.integrations"]),
    ("tasks", ["dtrain.tasks"]),
    ("training", ["dtrain.training"]),
    ("pipeline", ["dtrain.pipeline"]),
    ("commands", ["dtrain.commands"]),
    ("entry points", ["dtrain", "dtrain.train", "dtrain.cli", "dtrain.export"]),
]
# Attributes of Accelerate's, torch's and fsspec's objects that are not their public API.
PRIVATE_API = {"_models", "_optimizers", "_schedulers", "_custom_objects", "_dataloaders",
               "_save_model_state_pre_hook", "_reset_state", "_last_lr", "_strip_protocol"}
MODULE_IN_STRING = re.compile(r"^(dtrain(?:\.\w+)+)(?::\w+)?$")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every dtrain module `name` imports, wherever the import stands, or names in a string for lazy loading."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from dtrain import rng` imports a module; `from x import name`, x
                targets.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            match = MODULE_IN_STRING.match(node.value)  # "module:function", loaded by name when used
            if match:
                targets = [match.group(1)]
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "").endswith("EXPORTS") for t in node.targets):
            targets = [v.value for v in getattr(node.value, "values", []) if isinstance(v, ast.Constant)]
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if (module == member or module.startswith(member + ".")) and len(member) > best:
                best, rank = len(member), index
    assert rank is not None, f"{module} belongs to no layer of this test: add it to LAYERS"
    return rank


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_imports_inside_functions_and_lazy_names_count(tmp_path):
    module = tmp_path / "hidden.py"
    module.write_text("def later():\n    from dtrain.training import trainer\n\n"
                      "HANDLER = 'dtrain.commands.ckpt:ckpt_list'\n")
    assert imports_of("dtrain.checkpoint.hidden", module, modules()) == {"dtrain.training.trainer",
                                                                         "dtrain.commands.ckpt"}


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert upward == []


def test_no_module_is_over_400_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in long.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_every_package_says_in_its_first_line_what_lives_there(package):
    docstring = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert docstring, f"dtrain/{package}/__init__.py has no docstring"
    assert docstring.splitlines()[0].strip().endswith("."), f"dtrain/{package}: a one-line summary first"


def test_private_api_of_other_libraries_is_used_only_in_the_compat_module():
    users = []
    for name, path in modules().items():
        if name == "dtrain.compat":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_API:
                users.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} .{node.attr}")
    assert users == []


def attributes_set_outside_init(tree: ast.Module) -> list[str]:
    """`Class.attr (method)` for every `self.attr = ...` in a method whose attribute `__init__` (or the class
    body) does not set."""
    found = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        declared = {t.id for n in cls.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        assigned: dict[str, str] = {}
        for method in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
            for node in ast.walk(method):
                if not isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                    continue
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for part in ast.walk(target):
                        if (isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name)
                                and part.value.id == "self"):
                            if method.name == "__init__":
                                declared.add(part.attr)
                            else:
                                assigned.setdefault(part.attr, method.name)
        found += [f"{cls.name}.{attr} ({method})" for attr, method in assigned.items() if attr not in declared]
    return found


def test_every_attribute_of_an_object_is_set_in_its_init():
    late = [f"{path.relative_to(PACKAGE.parent)}: {item}" for path in modules().values()
            for item in attributes_set_outside_init(ast.parse(path.read_text()))]
    assert late == []


def test_an_attribute_first_set_outside_init_is_found():
    tree = ast.parse("class A:\n    def __init__(self):\n        self.a = 1\n    def f(self):\n"
                     "        self.a = 2\n        self.b = 3\n")
    assert attributes_set_outside_init(tree) == ["A.b (f)"]
