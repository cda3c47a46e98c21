"""Every example, with --tiny, on 2 CPU ranks: it must finish and save its output.

The plain DiT, which spawns its 2 ranks itself, runs as a script; torchrun's way of launching (one
process per rank) is the README's, whose examples run as scripts in tests/test_readme.py. The
pipelines, whose scripts are the same ``common.main`` with another ``Example``, run that
example's pipeline (``common.run_pipeline``, from the flags to the saved file) as cases of the
world-2 spawn of tests/ranks.py: a script's three processes of start-up each were most of their time.
Those whose pipelines tests/test_pipelines.py runs with nothing the example adds but its flags and
its tiny pipeline (``CHECKED_BY_PIPELINES``) are checked in-process.
"""

import contextlib
import importlib
import io
import os
import sys
import tempfile
import types

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from para_fx.testing import tiny_pipelines
import ranks
import scripts

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)  # the examples import their shared module as `common`, here and on the ranks

import common  # noqa: E402

# name -> (extra flags, output file, what the saved file must hold)
CASES = {
    "flux": ([], "flux.png", ("image", (14, 10))),  # PIL size is (width, height)
    "hunyuan_video": ([], "hunyuan_video.gif", ("video", 9)),
    "mochi": ([], "mochi.gif", ("video", 7)),
    "cogvideox": ([], "cogvideox.gif", ("video", 9)),
    "wan": (["--cache", "0.3"], "wan.gif", ("video", 9)),
    "plain_dit": (["--max-batch", "1"], "plain_dit.pt", ("latent", (1, 4, 10, 14))),
}
SCRIPTS = ("plain_dit",)
# HunyuanVideo's, Mochi's and CogVideoX's examples are the same common.run_pipeline as Wan's (which
# runs on the ranks below: its flags, the cache's two states, a video saved as a GIF) with their own
# tiny pipelines, which tests/test_pipelines.py runs on 2 ranks with their transformers and VAEs
# parallel, against one process (CogVideoX on the CFG batch split its example asks for,
# --max-batch 2); their scripts' flags are read in-process below, and the GIF branch of common.save
# for PIL frames (theirs; Wan's frames are arrays). FLUX's is the README's examples/pipeline.py --tiny
# (tests/test_readme.py): its tiny pipeline on 2 ranks, the parallel VAE, the PNG saved on rank 0;
# the image branch of common.save is run in-process below. Not run here again: four compiles of
# pipelines (CogVideoX's on the ranks: about 3.5 s of CPU on each of 2 ranks).
CHECKED_BY_PIPELINES = ("flux", "hunyuan_video", "mochi", "cogvideox")
ON_RANKS = [name for name in CASES if name not in SCRIPTS + CHECKED_BY_PIPELINES]


def flags(name, out):
    return ["--tiny", "--steps", "2", "--runs", "1", "--out", out, *CASES[name][0]]


# The pipelines on the ranks run the passes' graphs as they are: their numbers are checked in
# tests/test_pipelines.py, and AOTAutograd (--tiny's default) by the plain DiT's script here, the
# README's pipeline (FLUX's tiny pipeline, as examples/flux.py --tiny runs it) and the demo on
# FLUX, and by the GPU tier on every model.
ON_RANKS_FLAGS = ["--compiler", "eager"]


def command(name):
    """The script, saving into its working folder."""
    return [sys.executable, os.path.join(EXAMPLES, f"{name}.py"), *flags(name, CASES[name][1])]


for _name in SCRIPTS:
    scripts.add(f"example {_name}", command(_name), scripts.ENV)


def saved(name, out):
    """What the saved file holds, as CASES states it."""
    kind = CASES[name][2][0]
    if kind == "image":
        return kind, Image.open(out).size
    if kind == "video":
        return kind, Image.open(out).n_frames
    return kind, tuple(torch.load(out).shape)


def example_on_this_rank(name):
    """On one rank: the example's pipeline from its flags, as its script runs it under torchrun;
    rank 0's log and what it saved."""
    example = importlib.import_module(name).EXAMPLE
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, CASES[name][1])
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            common.run_pipeline(common.example_args(example, argv=flags(name, out) + ON_RANKS_FLAGS), example)
        return log.getvalue().replace(out, CASES[name][1]), saved(name, out) if dist.get_rank() == 0 else None


for _name in ON_RANKS:
    ranks.add(2, f"example {_name}", example_on_this_rank, _name)


def check_log(name, log):
    if name == "wan":
        assert "of 4 transformer calls" in log, log  # 2 steps, cond and uncond
    if name == "plain_dit":
        assert "max abs error vs eager on one process" in log, log


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.scripts(f"example {name}")) for name in SCRIPTS])
def test_example_script_runs_on_two_ranks_and_saves(name):
    result = scripts.result(f"example {name}")
    assert result.returncode == 0, result.log()
    assert f"[{name}] saved {CASES[name][1]}" in result.stdout, result.log()
    assert saved(name, result.folder / CASES[name][1]) == CASES[name][2]
    check_log(name, result.stdout)


@pytest.mark.ranks
@pytest.mark.parametrize("name", ON_RANKS)
def test_example_pipeline_runs_on_two_ranks_and_saves(name):
    (log, what), (_, nothing) = ranks.result(2, f"example {name}")
    assert f"[{name}] saved {CASES[name][1]}" in log, log
    assert what == CASES[name][2] and nothing is None  # rank 0 saves
    check_log(name, log)


def test_mode_asks_for_inductor_even_with_tiny():
    parse = lambda *flags: common.parse_args("", "flux", out_extension="png", argv=list(flags))
    assert parse("--tiny").compiler == "aot_eager"
    assert parse("--tiny", "--mode", "max-autotune-no-cudagraphs").compiler == "inductor"
    with pytest.raises(SystemExit):
        parse("--tiny", "--mode", "max-autotune", "--compiler", "aot_eager")


@pytest.mark.parametrize("name", CHECKED_BY_PIPELINES)
def test_examples_checked_by_the_pipeline_cases_build_their_tiny_pipeline_from_their_flags(name, tmp_path):
    """What these examples add to their pipelines (tests/test_pipelines.py): their flags and their
    tiny pipeline with the pipeline's default output (PIL images or frames)."""
    example = importlib.import_module(name).EXAMPLE
    args = common.example_args(example, argv=flags(name, CASES[name][1]))
    assert (args.tiny, args.steps, args.compiler, args.out) == (True, 2, "aot_eager", CASES[name][1])
    if name == "cogvideox":  # on 2 ranks, the CFG batch split its case in tests/test_pipelines.py runs on (2x1x1)
        assert args.max_batch == 2
    pipe, kwargs = example.tiny(args)
    assert "output_type" not in kwargs and kwargs["num_inference_steps"] == 2
    assert type(pipe).__name__ == type(tiny_pipelines.BUILDERS[name]()[0]).__name__
    if example.fps is None:  # an image: rank 0 saves the first one
        out = tmp_path / CASES[name][1]
        common.save(pipe(**kwargs, generator=torch.Generator().manual_seed(0)), str(out), example.fps)
        assert saved(name, out) == CASES[name][2]
    else:  # a video: common.save writes PIL frames (the pipeline's default output) as a GIF
        assert CASES[name][1].endswith(".gif")
        frames = [Image.new("RGB", (14, 10), (16 * i, 0, 0)) for i in range(CASES[name][2][1])]
        out = tmp_path / CASES[name][1]
        common.save(types.SimpleNamespace(frames=[frames]), str(out), example.fps)
        assert saved(name, out) == CASES[name][2]
