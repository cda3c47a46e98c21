"""The README as written: each Python block is a whole example file, each runs at world 2 on CPU,
and every file the README names exists."""

import os
import re
import runpy
import sys

import pytest
from PIL import Image

import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def torchrun(*args):
    """torchrun of this interpreter: a torchrun found on PATH may belong to another environment."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def test_every_python_block_is_an_example_file():
    assert len(PYTHON_BLOCKS) >= 5
    for block in PYTHON_BLOCKS:
        first_line = block.splitlines()[0]
        named = re.search(r"examples/\w+\.py", first_line)
        assert named, f"a README Python block whose first line names no example file: {first_line!r}"
        with open(os.path.join(ROOT, named.group()), encoding="utf-8") as f:
            assert f.read() == block, f"README block differs from {named.group()}"


def test_every_file_the_readme_names_exists():
    """Paths from the repository root; a bare file name (the examples' list) may be in examples/."""
    named = set(re.findall(r"\b((?:[\w.-]+/)*[\w.-]+\.(?:py|md|json|pt|png))\b", README)) - {"flux.png"}  # flux.png: written by pipeline.py
    exists = lambda n: os.path.exists(os.path.join(ROOT, n)) or ("/" not in n and os.path.exists(os.path.join(ROOT, "examples", n)))
    missing = sorted(n for n in named if not exists(n))
    assert not missing, missing


# example -> (command, what its output must hold)
RUNS = {
    "usage": (  # the error as a number: the two ranks' lines may run together on one stdout
        torchrun("examples/usage.py"), [r"rank [01]: output \(1, 35, 16\), max abs error vs eager (\d\.\de[+-]\d+)"]
    ),
    "cache": (torchrun("examples/cache.py"), [r"rank [01]: (\d+) of 28 steps skipped"]),
    "pipeline": (torchrun("examples/pipeline.py", "--tiny"), [r"saved flux.png \(14x10\); cache: CacheStats\(steps=4"]),
    "explain": (
        [sys.executable, "examples/explain.py"],
        [r"parallel: yes, all 4 attention sites split the tokens over the ranks \(hybrid\)", r"\+\+\+ shard_seq"],
    ),
    "serve": ([sys.executable, "examples/serve.py"], [r"request 0: image \(3, 10, 14\)", r"request 1: image \(3, 10, 14\)"]),
}


# explain.py launches nothing: it runs in the first tier, in this process, as Python runs a file
# (runpy, as __main__, in a folder of its own; a process of its own cost 6 s of start-up, torch and
# diffusers imported again, on the 2-core machine); the examples on 2 ranks run with the scripts,
# in the background
ONE_PROCESS = "explain"


def absolute(command):
    return [os.path.join(ROOT, a) if a.startswith("examples/") else a for a in command]


def in_this_process(path, folder, monkeypatch, capsys):
    """``python PATH`` run in ``folder``, here: its outcome as a script's (an exception fails the test)."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", [path])
    runpy.run_path(path, run_name="__main__")
    captured = capsys.readouterr()
    return scripts.Outcome(0, captured.out, captured.err, folder)


for _name, (_command, _) in RUNS.items():
    if _name != ONE_PROCESS:
        scripts.add(_name, absolute(_command), scripts.ENV)


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=() if name == ONE_PROCESS else pytest.mark.scripts(name)) for name in RUNS]
)
def test_example_runs_as_written(name, tmp_path, monkeypatch, capsys, fresh_dynamo):
    command, patterns = RUNS[name]
    result = in_this_process(absolute(command)[1], tmp_path, monkeypatch, capsys) if name == ONE_PROCESS else scripts.result(name)
    assert result.returncode == 0, result.log()
    found = {pattern: re.findall(pattern, result.stdout) for pattern in patterns}
    assert all(found.values()), result.log()
    if name == "usage":
        errors = [float(e) for e in found[patterns[0]]]
        assert len(errors) == 2 and max(errors) <= 1e-4, errors
    if name == "cache":
        skipped = found[patterns[0]]
        assert len(skipped) == 2 and skipped[0] == skipped[1] and int(skipped[0]) > 0, skipped  # ranks agree
    if name == "pipeline":
        assert Image.open(result.folder / "flux.png").size == (14, 10)
    if name == "explain":
        assert "<h1>para-fx report</h1>" in (result.folder / "report.html").read_text()
