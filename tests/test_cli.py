"""``python -m para_fx explain``: a user's factory in a subprocess, a built-in example, bad arguments."""

import os
import subprocess
import sys

import pytest
import torch

from para_fx.cli import main

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_explain_factory_in_subprocess_writes_html(tmp_path):
    html = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "para_fx", "explain", f"{TESTS}/dits.py:patch_dit",
         "--world-size", "4", "--ulysses", "2", "--ring", "2", "--html", str(html)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "attention sites (2):" in out
    assert out.count(" hybrid ") == 2
    assert "FLOPs sharded (estimate)" in out and "over 4 ranks" in out
    assert f"wrote {html}" in out
    assert "<h2>attention sites (2)</h2>" in html.read_text()


def test_explain_builtin_example(capsys):
    torch._dynamo.reset()
    assert main(["explain", "--example", "flux", "--world-size", "2"]) == 0
    torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "attention sites (4):" in out and out.count(" ulysses ") == 4
    assert "transformer_blocks.0" in out and "single_transformer_blocks.1" in out  # the blocks table


def test_explain_rejects_bad_targets(capsys):
    with pytest.raises(SystemExit):
        main(["explain"])  # neither a factory nor an example
    assert "MODULE:FACTORY or --example" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no function 'nothing'"):
        main(["explain", f"{TESTS}/dits.py:nothing"])
