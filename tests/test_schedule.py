"""The collective scheduling pass: independent work moves into each transfer's window, waits
move to their first user, and nothing that writes shared memory or draws random numbers moves."""

import torch
import torch.fx as fx

import para_fx
from para_fx.testing import zoo
from para_fx.core.backend import recording
from para_fx.inspect.explain import simulated_mesh
from para_fx.passes.schedule import WAIT, overlap_collectives

aten = torch.ops.aten
A2A = torch.ops._c10d_functional.all_to_all_single.default


def _graph(build) -> fx.GraphModule:
    graph = fx.Graph()
    build(graph)
    return fx.GraphModule(torch.nn.Module(), graph)


def _order(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function"]


def test_independent_work_moves_behind_the_collective_and_the_wait_to_its_first_user():
    def build(g):
        x, w = g.placeholder("x"), g.placeholder("w")
        send = g.call_function(aten.mul.Tensor, (x, 2.0), name="send")
        mlp = g.call_function(aten.mm.default, (x, w), name="mlp")  # needs no transfer
        a2a = g.call_function(A2A, (send, [1, 1], [1, 1], "0"), name="a2a")
        got = g.call_function(WAIT, (a2a,), name="got")
        late = g.call_function(aten.relu.default, (mlp,), name="late")
        g.output(g.call_function(aten.add.Tensor, (got, late), name="out"))

    gm = _graph(build)
    assert overlap_collectives(gm) == 1
    assert _order(gm) == ["send", "a2a", "mlp", "late", "got", "out"]


def test_work_the_collective_needs_stays_before_it():
    def build(g):
        x = g.placeholder("x")
        a = g.call_function(aten.relu.default, (x,), name="a")
        b = g.call_function(aten.mul.Tensor, (a, 2.0), name="b")
        a2a = g.call_function(A2A, (b, [1, 1], [1, 1], "0"), name="a2a")
        g.output(g.call_function(WAIT, (a2a,), name="got"))

    gm = _graph(build)
    assert overlap_collectives(gm) == 0
    assert _order(gm) == ["a", "b", "a2a", "got"]


def test_writes_to_shared_memory_and_random_numbers_keep_their_place():
    def build(g):
        x = g.placeholder("x")
        buf = g.call_function(aten.clone.default, (x,), name="buf")
        read = g.call_function(aten.mul.Tensor, (buf, 3.0), name="read")  # reads buf before the write
        g.call_function(aten.add_.Scalar, (buf, 1.0), name="write")  # buf has another reader: a barrier
        noise = g.call_function(aten.rand_like.default, (x,), name="noise")  # random: a barrier
        after = g.call_function(aten.relu.default, (x,), name="after")
        a2a = g.call_function(A2A, (x, [1, 1], [1, 1], "0"), name="a2a")
        got = g.call_function(WAIT, (a2a,), name="got")
        g.output((got, read, noise, after, buf))

    gm = _graph(build)
    assert overlap_collectives(gm) == 1  # only the work after the last barrier
    assert _order(gm) == ["buf", "read", "write", "noise", "a2a", "after", "got"]


def test_in_place_op_on_a_private_temporary_moves_with_it():
    def build(g):
        x = g.placeholder("x")
        tmp = g.call_function(aten.mul.Tensor, (x, 2.0), name="tmp")
        bumped = g.call_function(aten.add_.Scalar, (tmp, 1.0), name="bumped")
        a2a = g.call_function(A2A, (x, [1, 1], [1, 1], "0"), name="a2a")
        got = g.call_function(WAIT, (a2a,), name="got")
        g.output(g.call_function(aten.add.Tensor, (got, bumped), name="out"))

    gm = _graph(build)
    assert overlap_collectives(gm) == 2
    assert _order(gm) == ["a2a", "tmp", "bumped", "got", "out"]


def _window_ops(code: str) -> list[list[str]]:
    """For each all-to-all in generated code, the lines between it and its own wait."""
    lines = [line.strip() for line in code.splitlines()]
    windows = []
    for i, line in enumerate(lines):
        if "all_to_all_single.default(" in line:
            name = line.split(" = ")[0]
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("wait_tensor") and f"({name})" in lines[j])
            windows.append(lines[i + 1 : end])
    return windows


def test_flux_mlp_projection_runs_under_the_attention_transfer():
    """FLUX's single-stream blocks compute the MLP input projection beside the attention: on both
    meshes it moves between the block's first transfer and its wait."""
    model, kwargs = zoo.flux(height=4, width=6, text_len=4)
    for degrees in ({"ulysses": 2}, {"ring": 2}):
        torch._dynamo.reset()
        with simulated_mesh(2, **degrees) as mesh, torch.no_grad(), recording() as report:
            backend = para_fx.backend(mesh=mesh, compiler="eager", schedule_collectives=True)
            torch.compile(model, backend=backend)(**kwargs)
        windows = _window_ops(report.graphs["schedule_collectives"])
        hidden = [w for w in windows if any("proj_mlp_weight" in line for line in w)]
        assert len(hidden) == 2, (degrees, [len(w) for w in windows])  # both single-stream blocks
