"""The GPU tier: every seed model on 2 GPUs (NCCL, bf16), Ulysses 2 and Ring 2 (keys/values
passed by NCCL or by the copy engines, and gathered; and with the vectors' matmuls split by
columns), against single-GPU eager. Skipped without 2 CUDA devices, so CPU CI is
unchanged; run it with

    python -m pytest -q -m gpu tests/test_gpu.py

``GPU_TIER_RESULTS=path.json`` keeps the worker's results (errors, noise, collectives per model).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    kept = os.environ.get("GPU_TIER_RESULTS")
    out = pathlib.Path(kept) if kept else tmp_path_factory.mktemp("gpu") / "results.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", WORKER, str(out)]
    subprocess.run(command, check=True, timeout=1200)
    return json.loads(out.read_text())


# tests/gpu_worker.py's MESHES, by label (the worker runs under torchrun, apart from pytest)
MESHES = [
    "ring1_ulysses2",
    "ring2_ulysses1",
    "ring2_ulysses1_gather",
    "ring2_ulysses1_copy_engine",
    "ring1_ulysses2_split",
    "ring2_ulysses1_copy_engine_split",
]
MODELS = ["flux", "hunyuan_video", "mochi", "cogvideox", "wan", "sd3", "patch_dit", "joint_dit"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mesh", MESHES)
def test_model_on_two_gpus_matches_eager(results, name, mesh):
    result = results[name]
    assert "error" not in result, result.get("error")
    assert set(result) == {"noise", *MESHES}, f"{name}: the worker's meshes differ from this file's: {sorted(result)}"
    r = result[mesh]
    assert r["graphs"] == 1, f"{name} {mesh}: {r['graphs']} graphs"
    assert not r["fallbacks_in_blocks"], f"{name} {mesh}: fallbacks inside the blocks: {r['fallbacks_in_blocks']}"
    assert set(r["strategies"]) & {"ulysses", "ring"}, f"{name} {mesh}: no context-parallel site: {r['strategies']}"
    assert r["split_vector_matmuls"] == mesh.endswith("_split"), f"{name} {mesh}: split_vector_matmuls {r['split_vector_matmuls']}"
    # bf16 noise: eager's own flash-vs-math difference on the same input (at least 1e-3)
    assert r["rel_err"] <= 2 * max(result["noise"], 1e-3), f"{name} {mesh}: {r['rel_err']} vs noise {result['noise']}"
