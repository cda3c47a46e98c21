"""What a newcomer finds from Python: the version, the public names, the subpackages."""

import os
import pydoc
import re

import pytest

import para_fx
import para_fx.adapters

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
