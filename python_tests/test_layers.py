"""Imports go one way (DESIGN §2): core → drafters → engine → distill → eval → cli/demo.

Every module of the package is parsed with ``ast``; an import of a higher layer fails the test
wherever it stands: at module level or inside a function, absolute, relative
(``from ..eval import x``), as ``from fastspec import eval``, or through
``importlib.import_module("fastspec.eval")``. ``fastspec/__init__.py`` is the package facade
(it exposes submodules lazily) and is exempt.
"""
import ast
import os
from typing import List

import fastspec

PACKAGE_DIR = os.path.dirname(os.path.abspath(fastspec.__file__))
LAYERS = {"drafters": 1, "engine": 2, "distill": 3, "eval": 4, "cli": 5, "demo": 5}  # anything else is core (0)


def layer(module: str) -> int:
    """'fastspec.drafters.ngram' -> 1; the engine may be a module or a package (fastspec/engine/)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "fastspec":
        return 0
    return LAYERS["engine"] if parts[1].startswith("engine") else LAYERS.get(parts[1], 0)


def is_module(name: str) -> bool:
    """Whether ``fastspec.x.y`` is a module or package of the installed fastspec."""
    parts = name.split(".")
    if parts[0] != "fastspec":
        return False
    path = os.path.join(PACKAGE_DIR, *parts[1:])
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def _resolve_relative(module: str, is_package: bool, level: int, name: str) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imported_modules(module: str, source: str, is_package: bool = False) -> List[tuple]:
    """(line, imported fastspec module) for every import in ``source``, the module ``module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, is_package, node.level, node.module or "") if node.level else node.module or ""
            found.append((node.lineno, base))
            # `from fastspec import eval` / `from . import cli`: names that are submodules
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if is_module(f"{base}.{alias.name}")]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name == "fastspec" or name.startswith("fastspec.")]


def upward_imports(module: str, source: str, is_package: bool = False) -> List[str]:
    """Imports in ``source`` of a layer above ``module``'s own."""
    own = layer(module)
    return [f"{module}:{line} imports {name}" for line, name in imported_modules(module, source, is_package)
            if layer(name) > own]


def package_modules():
    """(module name, path, is_package) of every .py file of the installed fastspec."""
    for folder, _, files in os.walk(PACKAGE_DIR):
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
                is_package = file == "__init__.py"
                yield (rel[: -len(".__init__")] if is_package else rel), path, is_package


def test_no_module_imports_a_higher_layer():
    violations = []
    modules = list(package_modules())
    assert len(modules) > 20  # the walk found the package
    for module, path, is_package in modules:
        if module == "fastspec":  # the facade: lazy access to every submodule
            continue
        with open(path, encoding="utf-8") as handle:
            violations += upward_imports(module, handle.read(), is_package)
    assert violations == []


def test_upward_imports_are_found_in_every_form():
    source = '''
import importlib
from fastspec.drafters.base import Drafter          # same layer: fine
from fastspec import ops, introspect                # core: fine

def fit(self):
    from fastspec.distill.trainer import Trainer    # function level, upward
    return Trainer

def names():
    from fastspec import eval                        # a submodule named in a from-import
    from ..cli import main                           # relative, two levels up
    return importlib.import_module("fastspec.demo")  # by name
'''
    found = upward_imports("fastspec.drafters.neural", source)
    assert found == [
        "fastspec.drafters.neural:7 imports fastspec.distill.trainer",
        "fastspec.drafters.neural:11 imports fastspec.eval",
        "fastspec.drafters.neural:12 imports fastspec.cli",
        "fastspec.drafters.neural:13 imports fastspec.demo",
    ]


def test_downward_and_same_layer_imports_pass():
    source = "from fastspec.drafters import load_drafter\nfrom fastspec import engine, targets\nfrom . import students\n"
    assert upward_imports("fastspec.distill.trainer", source) == []
    assert upward_imports("fastspec.distill", "from .trainer import Trainer\n", is_package=True) == []
    # the engine package ranks as the engine, above the drafters and below distill
    assert upward_imports("fastspec.engine.speculative", "from fastspec.drafters.base import Drafter\n") == []
    assert upward_imports("fastspec.engine.speculative", "from fastspec.distill import losses\n") == [
        "fastspec.engine.speculative:1 imports fastspec.distill",
        "fastspec.engine.speculative:1 imports fastspec.distill.losses",
    ]
