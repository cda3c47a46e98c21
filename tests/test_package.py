"""What a newcomer finds from Python: the version, the public names, the subpackages, and no import cycle between modules."""

import ast
import os
import pathlib
import pydoc
import re

import pytest

import para_fx
import para_fx.adapters
import para_fx.passes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_and_public_names():
    assert re.fullmatch(r"\d+\.\d+\.\d+", para_fx.__version__)
    assert all(hasattr(para_fx, name) for name in para_fx.__all__)
    from para_fx.inspect.report import Report

    assert para_fx.Report is Report


def test_help_names_the_subpackages():
    text = pydoc.render_doc(para_fx)
    for module in (
        "para_fx.core", "para_fx.passes", "para_fx.runtime", "para_fx.inspect", "para_fx.adapters.diffusers",
        "para_fx.testing.zoo", "para_fx.runtime.runner", "python -m para_fx explain",
    ):
        assert module in text, module
    assert "parallelize_pipe" in para_fx.adapters.__doc__


def test_metadata_takes_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "para_fx.__version__"}
    assert project["project"]["authors"]


def _load_time_imports(tree: ast.Module):
    """The import statements a module runs when it is imported: not those inside functions (deferred)
    nor under ``if TYPE_CHECKING`` (never run)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            todo.extend(ast.iter_child_nodes(node))


def test_no_import_cycles():
    """No module of the package imports, at load time, a module that imports it back (through any chain)."""
    files = {}
    for package in (para_fx, para_fx.passes, para_fx.adapters):
        for path in pathlib.Path(package.__path__[0]).rglob("*.py"):
            parts = path.relative_to(package.__path__[0]).with_suffix("").parts
            name = ".".join((package.__name__, *parts)).removesuffix(".__init__")
            files.setdefault(name, path)
    assert {"para_fx.core.backend", "para_fx.runtime.cache", "para_fx.inspect.report", "para_fx.testing.zoo", "para_fx.passes.shard"} <= set(files)
    imports = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in _load_time_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source for alias in node.names]
            found |= {t for t in targets if t in files and t != name}
        imports[name] = found

    def cycle_from(start):
        todo, seen = [(start, [start])], set()
        while todo:
            node, path = todo.pop()
            for after in sorted(imports[node]):
                if after == start:
                    return path + [start]
                if after not in seen:
                    seen.add(after)
                    todo.append((after, path + [after]))
        return None

    cycles = [" -> ".join(c) for c in map(cycle_from, sorted(imports)) if c]
    assert not cycles, cycles
