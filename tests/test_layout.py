"""The package's shape: imports flow one way through its layers, and the public namespace is exactly ``__all__``."""

import ast
import graphlib
from pathlib import Path

import ih_circuits

PACKAGE = Path(ih_circuits.__file__).parent

# Bottom to top. A module may import from its own layer or below, never above; the layers read
# task -> model -> training -> probes -> views -> cli, with the small utilities underneath.
LAYERS = [
    {"checks"},
    {"seeds", "memory", "checkpoint", "chain"},
    {"priors", "predictors", "task", "sources", "theory"},
    {"model", "adapters", "ordinary"},
    {"history", "training", "presets", "baselines", "optimal"},
    {"probes"},
    {"views", "reporting"},
    {"sweep"},
    {"cli"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every ``ih_circuits`` module ``path`` imports, at the top or inside functions (``ast.walk`` sees both)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, node.module] if node.module else base) if node.level else node.module
            found |= {source} | {f"{source}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items() if name != "ih_circuits"}


def layer_of(module: str) -> int:
    return LAYER[module.split(".")[1]]


def test_every_module_has_a_layer():
    assert {m.split(".")[1] for m in import_graph()} == set(LAYER)


def test_imports_never_go_up_a_layer():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target != "ih_circuits" and layer_of(target) > layer_of(module)
    )
    assert upward == []


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t in targets if t != "ih_circuits"} for m, targets in import_graph().items()}
    assert len(list(graphlib.TopologicalSorter(graph).static_order())) == len(graph)


def test_the_checks_module_imports_nothing_from_the_package():
    assert import_graph()["ih_circuits.checks"] == set()


def test_the_namespace_is_exactly_all():
    assert dir(ih_circuits) == sorted(ih_circuits.__all__)
    for name in ih_circuits.__all__:
        assert getattr(ih_circuits, name) is not None, name
    assert {"views", "register_prior", "SparseSupportPrior"} <= set(ih_circuits.__all__)
