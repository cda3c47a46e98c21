"""Every example script, with --tiny, on 2 CPU ranks: it must exit cleanly and save its output.

FLUX runs under torchrun (one process per rank); the others spawn their 2 ranks themselves.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

# name -> (extra flags, output file, what the saved file must hold)
CASES = {
    "flux": ([], "flux.png", ("image", (14, 10))),  # PIL size is (width, height)
    "hunyuan_video": ([], "hunyuan_video.gif", ("video", 9)),
    "mochi": ([], "mochi.gif", ("video", 7)),
    "cogvideox": ([], "cogvideox.gif", ("video", 9)),
    "wan": (["--cache", "0.3"], "wan.gif", ("video", 9)),
    "plain_dit": (["--max-batch", "1"], "plain_dit.pt", ("latent", (1, 4, 10, 14))),
}


def command(name, flags, out):
    script = [os.path.join(EXAMPLES, f"{name}.py"), "--tiny", "--steps", "2", "--runs", "1", "--out", out, *flags]
    if name == "flux":  # torchrun of this interpreter: a torchrun found on PATH may belong to another environment
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]
    return [sys.executable, *script]


def run(args, cwd, timeout=300):
    """Run ``args`` in a new process group, so that a hang kills every rank it started."""
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{args[0]} timed out after {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    return process.returncode, stdout, stderr


@pytest.mark.scripts
@pytest.mark.parametrize("name", list(CASES))
def test_example_runs_on_two_ranks_and_saves(name, tmp_path):
    flags, filename, (kind, expected) = CASES[name]
    out = str(tmp_path / filename)
    returncode, stdout, stderr = run(command(name, flags, out), cwd=tmp_path)
    log = stdout[-3000:] + stderr[-3000:]
    assert returncode == 0, log
    assert f"[{name}] saved {out}" in stdout, log
    if kind == "image":
        assert Image.open(out).size == expected
    elif kind == "video":
        assert Image.open(out).n_frames == expected
    else:
        assert tuple(torch.load(out).shape) == expected
    if name == "wan":
        assert "of 4 transformer calls" in stdout, log  # 2 steps, cond and uncond
    if name == "plain_dit":
        assert "max abs error vs eager on one process" in stdout, log


def test_mode_asks_for_inductor_even_with_tiny():
    sys.path.insert(0, EXAMPLES)
    try:
        import common
    finally:
        sys.path.remove(EXAMPLES)
    parse = lambda *flags: common.parse_args("", "flux", out_extension="png", argv=list(flags))
    assert parse("--tiny").compiler == "aot_eager"
    assert parse("--tiny", "--mode", "max-autotune-no-cudagraphs").compiler == "inductor"
    with pytest.raises(SystemExit):
        parse("--tiny", "--mode", "max-autotune", "--compiler", "aot_eager")
