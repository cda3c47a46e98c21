"""The para backend on one process, its registration, and the mesh constructor's errors."""

import gc
import os
import subprocess
import sys
import textwrap
import warnings
import weakref

import pytest
import torch

import para_fx
from para_fx.core.backend import recording
from para_fx.inspect.explain import simulated_mesh
from para_fx.testing.dits import joint_dit, patch_dit
import ranks


def test_backend_name_works_without_importing_para_fx_and_torchao_stays_unimported():
    """The entry point, with Inductor (the default inner compiler) on one attention layer: its few
    kernels keep the C++ builds short; Inductor on whole models is tested in test_cache.py,
    test_shared_blocks.py and test_fuse_projections.py. Then, in the same fresh process (one start
    of Python, torch and Inductor for both checks), the backend with the First Block Cache and
    explain: none of it imports torchao, which only torchao's weights need (diffusers imports it
    whenever it is installed, tests/test_quiet.py)."""
    script = textwrap.dedent(
        """
        import sys, torch
        import torch.nn.functional as F

        class Attention(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv = torch.nn.Linear(16, 48)

            def forward(self, x):
                q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).relu()

        torch.manual_seed(0)
        model, x = Attention().eval(), torch.randn(2, 7, 16)
        print("loaded_before_compile", "para_fx" in sys.modules)
        with torch.no_grad():
            out = torch.compile(model, backend="para")(x)
            expected = model(x)
        print("loaded_after_compile", "para_fx" in sys.modules)  # through the entry point, not by us
        print("max_abs_error", (out - expected).abs().max().item())

        import para_fx
        from para_fx.testing.dits import patch_dit

        model, kwargs = patch_dit()
        cache = para_fx.FirstBlockCache(0.08)
        with torch.no_grad():
            torch.compile(model, backend=para_fx.backend(cache=cache, compiler="eager"))(**kwargs)
            para_fx.explain(model, kwargs=kwargs, world_size=2)
        print("torchao imported" if "torchao" in sys.modules else "no torchao")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded_before_compile False" in result.stdout and "loaded_after_compile True" in result.stdout, result.stdout
    error = float(result.stdout.split("max_abs_error")[1].split()[0])
    assert error <= 1e-5
    assert result.stdout.strip().endswith("no torchao"), result.stdout[-3000:]


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("factory", [patch_dit, joint_dit])
def test_world_one_equals_eager(compiler, factory):
    model, kwargs = factory()
    compiled = torch.compile(model, backend=para_fx.backend(compiler=compiler), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kwargs), model(**kwargs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_quantized_weights_compile_through_their_inner_tensors(compiler):
    """torchao weights are tensor subclasses (fp8 on GPUs; int8 weight-only here on CPU)."""
    quantization = pytest.importorskip("torchao.quantization", reason="needs torchao")
    Int8WeightOnlyConfig, quantize_ = quantization.Int8WeightOnlyConfig, quantization.quantize_

    model, kwargs = patch_dit()
    quantize_(model, Int8WeightOnlyConfig())
    assert type(model.blocks[0].mlp.fc1.weight).__name__ != "Parameter"
    cache = para_fx.FirstBlockCache(threshold=0)
    with torch.no_grad():
        expected = model(**kwargs)
        compiled = torch.compile(model, backend=para_fx.backend(cache=cache, compiler=compiler))
        with para_fx.cache_session(compiled):
            out = compiled(**kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert para_fx.cache_stats(compiled).computed == 1


def test_quantized_weights_are_flattened_once_and_again_when_an_inner_tensor_changes():
    """Flattening hundreds of quantized weights per call costs milliseconds: the inner tensors are
    reused while the weight and each inner tensor are the same objects, and not after."""
    quantization = pytest.importorskip("torchao.quantization", reason="needs torchao")
    from para_fx.core.capture import SubclassFlattener, flatten_subclasses

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    x = torch.randn(2, 8)
    args = [model[0].weight, x, model[1].weight]
    flatten = SubclassFlattener(args)
    first = flatten(args)
    assert [id(t) for t in first] == [id(t) for t in flatten_subclasses(args)] and len(first) == 7
    kept = {position: seen[2] for position, seen in flatten.seen.items()}
    assert [id(t) for t in flatten(args)] == [id(t) for t in first] and all(flatten.seen[p][2] is kept[p] for p in kept)  # reused
    model[1].weight.qdata = model[1].weight.qdata.clone()  # an inner tensor replaced
    fresh = flatten(args)
    assert fresh[4] is model[1].weight.qdata and fresh[4] is not first[4]
    assert flatten.seen[0][2] is kept[0] and flatten.seen[2][2] is not kept[2]
    other = [model[0].weight, torch.randn(2, 8), model[1].weight]  # plain inputs pass through
    assert flatten(other)[3] is other[1]


def test_inputs_read_as_numbers_compile_one_graph_per_value():
    """Dynamo 2.11 hands a LayerNorm's eps over as a 0-dim tensor input read with .item()."""
    graph = torch.fx.Graph()
    x, eps = graph.placeholder("x"), graph.placeholder("eps")
    graph.output((graph.call_function(torch.add, (x, graph.call_method("item", (eps,)))),))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    fn = para_fx.backend(compiler="eager")(gm, [torch.ones(3), torch.tensor(0.5)])
    assert fn(torch.ones(3), torch.tensor(0.5))[0].tolist() == [1.5] * 3
    assert fn(torch.ones(3), torch.tensor(2.0))[0].tolist() == [3.0] * 3  # a new value: a new graph, not a stale one


def test_backend_rejects_bad_arguments():
    with pytest.raises(ValueError, match="compiler must be one of"):
        para_fx.backend(compiler="tensorrt")
    with pytest.raises(TypeError, match="DeviceMesh"):
        para_fx.backend(mesh=[0, 1])


def test_init_mesh_without_process_group():
    assert para_fx.init_mesh() is None
    with pytest.raises(RuntimeError, match="not initialised"):
        para_fx.init_mesh(ulysses=2)
    with pytest.raises(ValueError, match="positive int"):
        para_fx.init_mesh(ring=0)


def test_a_compiled_model_does_not_keep_its_mesh_alive():
    """Each process group polls its transport on threads of its own until it is freed: a mesh that
    para-fx kept after the model and the user let go of it would leak them (a server that builds
    meshes per request, or many models in one process)."""
    model, kwargs = joint_dit()
    with simulated_mesh(2, ring=2) as mesh:
        with torch.no_grad():
            torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager"))(**kwargs)
        freed = weakref.ref(mesh)
        del mesh
    torch._dynamo.reset()
    gc.collect()
    assert freed() is None, [type(r).__name__ for r in gc.get_referrers(freed())]


def test_ring_kv_gather_gathers_keys_and_values_at_every_ring_site():
    model, kwargs = joint_dit()
    torch._dynamo.reset()
    with simulated_mesh(2, ring=2) as mesh, torch.no_grad(), recording() as report:
        torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager", ring_kv="gather"))(**kwargs)
    transports = [{c.kind for c in report.site_collectives(i)} for i in range(len(report.attention_sites))]
    assert transports and all(kinds == {"all_gather_into_tensor"} for kinds in transports), transports
    with pytest.raises(ValueError, match="ring_kv must be one of"):
        para_fx.backend(ring_kv="scatter")


def test_ring_transport_reaches_every_ring_pass_and_is_checked_against_the_mesh(monkeypatch):
    """On CPU the copy engines are not used (gloo carries the blocks either way): what is checked here
    is that the option reaches each Ring pass, and which meshes refuse it; the GPU tier checks the
    outputs (tests/gpu_worker.py, "ring2_ulysses1_copy_engine")."""
    from para_fx.runtime import attention

    passed = []
    real_pass = attention._pass_to_next
    monkeypatch.setattr(attention, "_pass_to_next", lambda x, info, transport: passed.append(transport) or real_pass(x, info))
    model, kwargs = joint_dit()
    torch._dynamo.reset()
    with simulated_mesh(2, ring=2) as mesh, torch.no_grad():
        torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager", ring_transport="copy_engine"))(**kwargs)
    assert passed and set(passed) == {"copy_engine"}, passed
    with pytest.raises(ValueError, match="ring_transport must be one of"):
        para_fx.backend(ring_transport="pigeon")
    with simulated_mesh(4, ring=4) as mesh, pytest.raises(ValueError, match="ring of 2 ranks, this mesh's ring has 4"):
        para_fx.backend(mesh=mesh, ring_transport="copy_engine")


def mesh_shapes_and_errors():
    shapes = {}
    for kwargs in ({}, {"ring": 2}, {"ulysses": 2}, {"batch": 2}, {"batch": 2, "ring": 2}):
        mesh = para_fx.init_mesh(**kwargs)
        assert mesh.mesh_dim_names == ("batch", "ring", "ulysses")
        shapes[str(kwargs)] = tuple(mesh.shape)
    errors = []
    for kwargs in ({"ulysses": 3}, {"ring": 2, "ulysses": 3}, {"batch": 3}, {"batch": 2, "ring": 4}):
        with pytest.raises(ValueError, match="world size|divide") as info:
            para_fx.init_mesh(**kwargs)
        errors.append(str(info.value))
    return shapes, errors


ranks.add(4, "backend init_mesh shapes and errors", mesh_shapes_and_errors)


@pytest.mark.ranks
def test_init_mesh_shapes_and_errors():
    shapes, errors = ranks.result(4, "backend init_mesh shapes and errors")[0]
    assert shapes == {
        "{}": (1, 1, 4),
        "{'ring': 2}": (1, 2, 2),
        "{'ulysses': 2}": (1, 2, 2),
        "{'batch': 2}": (2, 1, 2),
        "{'batch': 2, 'ring': 2}": (2, 2, 1),
    }
    assert errors[0] == "init_mesh: ulysses=3 does not divide the world size 4 / batch 1 = 4"
    assert errors[1] == "init_mesh: batch=1 x ring=2 x ulysses=3 must multiply to the world size 4"


def test_a_shape_that_comes_back_is_not_compiled_again(monkeypatch):
    """Dynamo's dynamic graph (made at the second shape) is tried before the first, static one:
    the first shape coming back reuses the static graph instead of compiling it again. Every call's
    output is compared with eager: a new resolution (18, then 10) recompiles correctly."""
    import importlib

    backend_module = importlib.import_module("para_fx.core.backend")
    compiled_shapes = []
    compile_static = backend_module._compile_static

    def counting(gm, example_inputs, options):
        compiled_shapes.append(next(tuple(x.shape) for x in example_inputs[::-1] if isinstance(x, torch.Tensor)))
        return compile_static(gm, example_inputs, options)

    monkeypatch.setattr(backend_module, "_compile_static", counting)
    torch._dynamo.reset()
    model, _ = joint_dit()
    compiled = torch.compile(model, backend=para_fx.backend(compiler="eager"))
    with torch.no_grad():
        for height in (14, 18, 14, 18, 10, 14):
            _, kwargs = joint_dit(height=height)
            torch.testing.assert_close(compiled(**kwargs), model(**kwargs), rtol=0, atol=1e-5)
    torch._dynamo.reset()
    assert len(compiled_shapes) == 3, compiled_shapes  # one compile per distinct shape


def test_the_last_compile_dynamo_allows_warns():
    """After recompile_limit compiles of a frame Dynamo runs it eagerly: unsharded, so said loudly."""
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend=para_fx.backend(compiler="eager"), dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=3), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in range(1, 5):
            compiled(torch.randn(rows, 4))
    torch._dynamo.reset()
    ours = [str(w.message) for w in caught if "para_fx" in str(w.message)]
    assert len(ours) == 1 and "recompile_limit (3)" in ours[0] and "unsharded" in ours[0], ours
