"""The layout is the architecture: the core never imports Lightning, each layer imports only the
layers below it, and the package's import graph has no cycle, function-level imports included.

Layers, lowest first: the core (`data`, `editing`, `sphere`, `evaluation` and the modules they share:
`errors`, `files`, `filters`, `models`, `tracing`, `heap`), the Lightning adapter (`lightning`), the
monitors (`monitors`), the commands (`commands`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sphere_pl"
LAYERS = {"lightning": 1, "monitors": 2, "commands": 3}  # everything else under sphere_pl is the core (0)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> list[tuple[str, bool]]:
    """(imported sphere_pl module, whether inside a function) for every import statement of module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names if alias.name.split(".")[0] == "sphere_pl")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                if source.split(".")[0] != "sphere_pl":
                    continue
                for alias in child.names:  # `from . import state` imports a module; `from .x import name`, module x
                    target = f"{source}.{alias.name}"
                    found.append((target if target in MODULES else source, nested))
            visit(child, nested)

    visit(tree, False)
    return found


def layer(name: str) -> int:
    parts = name.split(".")
    if name == "sphere_pl.__main__":  # `python -m sphere_pl`: the commands' entry point
        return LAYERS["commands"]
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_the_core_runs_without_lightning_in_a_fresh_interpreter():
    code = ("import sys, sphere_pl, sphere_pl.editing, sphere_pl.editing.methods, sphere_pl.sphere, sphere_pl.evaluation, sphere_pl.data\n"
            "from sphere_pl import Editor, SphereProjection, create_method\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    # ... and the shell's names are still there, loaded on first use
    shell = subprocess.run([sys.executable, "-c", "import sphere_pl, sys; sphere_pl.SequentialEditor; print('lightning' in sys.modules)"],
                           capture_output=True, text=True, timeout=300, check=True)
    assert shell.stdout.strip() == "True"


def test_every_layer_imports_only_the_layers_below_it():
    upward = [(name, target) for name in MODULES if name != "sphere_pl" for target, _ in imports(name)
              if target != "sphere_pl" and layer(target) > layer(name)]
    assert not upward, f"imports that run upward (core < lightning < monitors < commands): {upward}"


def test_the_import_graph_has_no_cycle_even_through_function_level_imports():
    graph = {name: {target for target, _ in imports(name) if target in MODULES} for name in MODULES}
    graph["sphere_pl"] = set()  # the package root re-exports the core; subpackages never import it
    assert not any(target == "sphere_pl" for name in MODULES for target, _ in imports(name) if name != "sphere_pl")
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def strongly_connect(node):  # Tarjan
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                strongly_connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongly_connect(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_scan_sees_function_level_imports_and_upward_imports():
    """The checks above would pass vacuously if the scan missed imports: it finds known ones of both kinds."""
    found = dict.fromkeys(target for target, _ in imports("sphere_pl.commands.cli"))
    assert "sphere_pl.commands.study" in found and "sphere_pl.commands.refusals" in found
    assert ("sphere_pl.commands.study", True) in imports("sphere_pl.commands.cli")  # imported inside main(): loaded on demand
    assert layer("sphere_pl.lightning.module") == 1 and layer("sphere_pl.editing.editor") == 0 and layer("sphere_pl.commands.run") == 3
