"""``python -m para_fx explain``: a user's factory, a built-in example, bad arguments."""

import re
import runpy
import sys

import pytest

from para_fx.inspect.cli import main
from para_fx.testing import dits, zoo


def test_explain_factory_as_python_m_writes_html(tmp_path, monkeypatch, capsys, fresh_dynamo):
    """``python -m para_fx explain FILE:FACTORY ...``, run as Python's -m runs it (runpy, para_fx's
    __main__ with these arguments), in this process: a process of its own cost 6 s of start-up on the
    2-core machine. The entry point in a fresh process: tests/test_backend.py."""
    html = tmp_path / "report.html"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the working directory the CLI makes importable
    monkeypatch.setattr(sys, "argv", ["python -m para_fx", "explain", f"{dits.__file__}:patch_dit",
                                      "--world-size", "4", "--ulysses", "2", "--ring", "2", "--html", str(html)])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("para_fx", run_name="__main__", alter_sys=True)
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err[-3000:]
    out = captured.out
    assert "attention sites (2, 2 split over the ranks):" in out
    assert len(re.findall(r"\n  \S+\s+hybrid\s", out)) == 2  # two rows of the sites' table
    assert "parallel: yes, all 2 attention sites split the tokens over the ranks (hybrid)" in out
    assert "FLOPs sharded (estimate)" in out and "over 4 ranks" in out
    assert f"wrote {html}" in out
    assert "<h2>attention sites (2, 2 split over the ranks)</h2>" in html.read_text()


def test_explain_builtin_example_infers_the_world_size(capsys, fresh_dynamo):
    assert main(["explain", "--example", "flux", "--ulysses", "2"]) == 0  # no --world-size: 2 ranks
    out = capsys.readouterr().out
    assert "attention sites (4, 4 split over the ranks):" in out
    assert "model: FluxTransformer2DModel on rank 0 of 2 (batch 1 x ring 1 x ulysses 2, simulated)" in out
    assert out.count(" 22/42 ") == 4  # 42 query tokens split over 2 ranks
    assert "transformer_blocks.0" in out and "single_transformer_blocks.1" in out  # the blocks table


def test_explain_rejects_bad_targets(capsys):
    with pytest.raises(SystemExit):
        main(["explain"])  # neither a factory nor an example
    assert "MODULE:FACTORY or --example" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no function 'nothing'"):
        main(["explain", f"{dits.__file__}:nothing"])


def one_line_error(capsys, argv, usage):
    """stderr of a failing run: usage errors print and exit 2, the others exit with their message (status 1)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    if usage:
        assert code == 2, code
        err = capsys.readouterr().err
    else:
        assert isinstance(code, str), code
        err = code
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_missing_module_is_one_line_without_traceback(capsys, monkeypatch, tmp_path):
    """In this process: SystemExit with a message is Python's exit status 1 with the message on
    stderr, and ``python -m para_fx`` runs this ``main`` (test_explain_factory_as_python_m_writes_html)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the working directory the CLI makes importable
    err = one_line_error(capsys, ["explain", "nosuchmod:make"], usage=False)
    assert err == (
        "explain: cannot import 'nosuchmod' (No module named 'nosuchmod'); run from the folder that "
        "holds it, or give path/to/file.py:make"
    )


def test_arguments_are_checked_before_the_model_is_built(capsys, monkeypatch):
    def never(**kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setitem(zoo.FACTORIES, "flux", never)
    flux = ["explain", "--example", "flux"]
    err = one_line_error(capsys, [*flux, "--world-size", "3", "--ulysses", "2"], usage=True)
    assert "ulysses=2 does not divide the world size 3" in err
    err = one_line_error(capsys, [*flux, "--cache", "-1"], usage=True)
    assert "the threshold must be >= 0, got -1" in err
    err = one_line_error(capsys, [*flux, "--ulysses", "2", "--rank", "2"], usage=True)
    assert "--rank 2 is not in [0, 2)" in err
    err = one_line_error(capsys, [*flux, "--ring", "0"], usage=True)
    assert "must be >= 1, got 0" in err


def test_an_error_in_the_model_is_one_line_unless_verbose(capsys, monkeypatch):
    def broken():
        raise RuntimeError("the factory failed\nsecond line")

    monkeypatch.setitem(zoo.FACTORIES, "flux", broken)
    err = one_line_error(capsys, ["explain", "--example", "flux"], usage=False)
    assert "explain flux: RuntimeError: the factory failed (-v for the traceback)" in err
    with pytest.raises(RuntimeError, match="the factory failed"):
        main(["explain", "--example", "flux", "-v"])
