"""No user-supplied file is unpickled: every `torch.load` in the package passes
`weights_only=True`, numpy never allows pickles, and remote code stays off by default."""

from __future__ import annotations

import ast
import inspect

from helpers import REPO


def calls(tree: ast.AST, module: str, function: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == function:
            if isinstance(node.func.value, ast.Name) and node.func.value.id in module.split("|"):
                yield node


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def package_sources():
    for path in sorted((REPO / "sphere_pl").rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_every_torch_load_passes_weights_only_true():
    offenders, found = [], 0
    for path, tree in package_sources():
        for node in calls(tree, "torch", "load"):
            found += 1
            value = keyword(node, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found >= 2, "the scan found no torch.load call at all: it is not looking at the package"
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_numpy_never_loads_pickles():
    offenders = []
    for path, tree in package_sources():
        for node in calls(tree, "np|numpy", "load"):
            value = keyword(node, "allow_pickle")
            if not (isinstance(value, ast.Constant) and value.value is False):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"numpy.load without allow_pickle=False: {offenders}"


def test_no_pickle_module_is_used():
    for path, tree in package_sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), f"{path}:{node.lineno}"


def test_remote_code_is_off_unless_configured():
    from sphere_pl import PretrainedModel, load_model_and_tokenizer

    assert inspect.signature(load_model_and_tokenizer).parameters["trust_remote_code"].default is False
    assert inspect.signature(PretrainedModel).parameters["trust_remote_code"].default is False
