"""The backend checks its quantized weights itself instead of Dynamo's per-call guards on their
insides (para_fx/core/weight_guards.py): no ``__tensor_flatten__`` per call, a replaced weight of
the same layout used, one of another layout, with an attribute reassigned or an inner tensor
changed in place refused."""

import pytest
import torch

import para_fx

quantization = pytest.importorskip("torchao.quantization", reason="needs torchao")


def _quantized_model(config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    quantization.quantize_(model, config)
    return model


def _flatten_calls(cls, run):
    calls, flatten = [0], cls.__tensor_flatten__

    def counting(self):
        calls[0] += 1
        return flatten(self)

    cls.__tensor_flatten__ = counting
    try:
        run()
    finally:
        cls.__tensor_flatten__ = flatten
    return calls[0]


@pytest.mark.usefixtures("fresh_dynamo")
def test_quantized_weights_are_checked_by_para_and_a_changed_layout_raises():
    model = _quantized_model(quantization.Int8WeightOnlyConfig())
    weight_type = type(model[0].weight)
    compiled = torch.compile(model, backend=para_fx.backend(compiler="eager"))
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
        # Dynamo calls __tensor_flatten__ twice per weight on every call when it guards them
        assert _flatten_calls(weight_type, lambda: compiled(x)) == 0

    replacement = torch.nn.Linear(32, 16)  # other values, the same layout
    quantization.quantize_(replacement, quantization.Int8WeightOnlyConfig())
    model[2].weight = replacement.weight
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)  # the new weight, not the compiled one

    dynamic = torch.nn.Linear(32, 16)  # the same shapes, activations quantized too
    quantization.quantize_(dynamic, quantization.Int8DynamicActivationInt8WeightConfig())
    assert type(dynamic.weight) is weight_type and dynamic.weight.qdata.shape == model[2].weight.qdata.shape
    same_object = model[2].weight
    kept_setting = same_object.act_quant_kwargs
    same_object.act_quant_kwargs = dynamic.weight.act_quant_kwargs  # its metadata reassigned in place
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"quantized weight \S*2_weight changed layout"):
        compiled(x)
    same_object.act_quant_kwargs = kept_setting
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)

    model[2].weight = dynamic.weight  # replaced by one of another layout
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"quantized weight \S*2_weight changed layout"):
        compiled(x)


@pytest.mark.usefixtures("fresh_dynamo")
def test_an_inner_tensor_changed_in_place_raises_and_restored_runs():
    """Dynamo no longer guards the inner tensors (it would recompile here instead); para's check does."""
    model = _quantized_model(quantization.Int8WeightOnlyConfig())
    compiled = torch.compile(model, backend=para_fx.backend(compiler="eager"))
    x = torch.randn(4, 16)
    inner = model[2].weight.qdata
    kept = inner.data
    with torch.no_grad():
        compiled(x)
        inner.data = kept.t().contiguous().t()  # the same values and shape, column-major strides
        with pytest.raises(RuntimeError, match=r"inner tensor of a quantized weight changed in place .*2_weight\.qdata.*stride"):
            compiled(x)
        inner.data = kept
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_explain_reports_the_weights_it_guards():
    model = _quantized_model(quantization.Int8WeightOnlyConfig())
    with torch.no_grad():
        report = para_fx.explain(model, (torch.randn(4, 16),))
    assert "Dynamo's per-call guards inside 2 weight(s) replaced by para's checks" in str(report)
