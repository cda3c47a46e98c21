"""Dynamo's torch-IR graph -> a functional aten inference graph the passes can read.

The passes want canonical aten ops (``torch.Tag.pointwise``, one SDPA op that returns its
log-sum-exp), a fake value with a static shape on every node (``meta["val"]``) and the model's
module paths and source lines (``nn_module_stack``, ``stack_trace``) for reports. ``make_fx`` over
an ``Interpreter`` with ``preserve_node_meta`` gives all of that with public APIs that have been
stable across torch releases, and ``functionalize`` removes in-place ops. After a pass,
:func:`inline_helpers` gives the same graph without tracing it whole again.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def capture_aten(
    gm: fx.GraphModule, example_inputs: Sequence[Any], functional: bool = True, scalars: dict[int, Any] | None = None
) -> fx.GraphModule:
    """Trace ``gm`` to aten with static shapes, keeping node metadata; ``example_inputs`` are concrete.

    Also used after the cache pass (``functional=False``), whose ``cond`` branches need tracing;
    the shard passes' output takes the cheaper :func:`inline_helpers`. Tensor-subclass inputs (torchao's fp8 weights)
    become their inner tensors: see :func:`flatten_subclasses`. ``scalars`` (from
    :func:`scalar_reads`) are the values of the inputs the graph reads as numbers.
    """
    if any(is_traceable_wrapper_subclass(x) for x in example_inputs):
        return capture_aten(_desugar_subclasses(gm, example_inputs), flatten_subclasses(example_inputs), functional)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [_to_fake(fake_mode, x) for x in example_inputs]
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    read_values = {placeholders[i]: value for i, value in (scalars or {}).items()}

    # Traced plainly first: most graphs write nothing in place, and ``functionalize`` cannot trace
    # through ``vmap`` (flex attention's block masks), which then falls back instead of failing.
    traced = _trace(gm, fake_mode, fake_inputs, False, read_values)
    if functional and _writes_to_inputs(traced):
        traced = _trace(gm, fake_mode, fake_inputs, True, read_values)
    if functional and _writes_in_place(traced) and not _unobserved_writes_made_functional(traced, fake_mode):
        # ``functionalize`` does not see the writes of an op whose kernel runs below it (pad_sequence
        # copies its sequences into a zero buffer): traced again, they are plain aten ops that it rewrites
        traced = _trace(traced, fake_mode, fake_inputs, True, {})
    _name_inputs(gm, traced)
    traced.recompile()
    return traced


def _trace(
    gm: fx.GraphModule, fake_mode: FakeTensorMode, fake_inputs: list[Any], functional: bool, read_values: dict
) -> fx.GraphModule:
    def run(*args):
        return _Interpreter(gm, read_values).run(*args)

    fn = torch.func.functionalize(run, remove="mutations") if functional else run
    with torch.fx.traceback.preserve_node_meta(), torch.no_grad(), fake_mode:
        traced = make_fx(fn, pre_dispatch=False)(*fake_inputs)
    traced.graph.eliminate_dead_code()
    return traced


def inline_helpers(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """A pass's output as a capture: the Python helpers it inserted (collectives, context-parallel
    attention) inlined as aten ops, and a fake value on every node.

    What ``capture_aten(gm, example_inputs, functional=False)`` gives for a graph of aten ops and
    helper calls, at a fraction of its cost: the aten ops, already captured, are only run on fake
    values; each helper alone is traced, under its call's metadata.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    captured = [node.meta.get("val") for node in placeholders]
    # the capture's fake mode: its fake inputs are reused, and its cache knows most ops' shapes
    fake_mode = next((v.fake_mode for v in captured if isinstance(v, FakeTensor)), None) or FakeTensorMode(
        allow_non_fake_inputs=True
    )
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}  # a node of gm -> its node of graph (a structure of them for a helper)
    traces: dict[tuple, fx.GraphModule] = {}
    with torch.fx.traceback.preserve_node_meta(), torch.no_grad(), fake_mode:
        for node, value, fake in zip(placeholders, example_inputs, captured, strict=True):
            env[node] = new = graph.placeholder(node.target)  # first, as in a traced graph; a pass may interleave them
            new._rename(node.name)  # as named (``placeholder`` would make ``adaLN`` ``ada_ln``)
            new.target = node.target
            _set_value(new, fake if _same_fake(fake, value, fake_mode) else _to_fake(fake_mode, value))
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                graph.output(fx.node.map_arg(node.args[0], env.__getitem__))
            elif node.target is operator.getitem and not isinstance(env[node.args[0]], fx.Node):
                env[node] = env[node.args[0]][node.args[1]]  # an item of a helper's inlined result
            elif isinstance(node.target, torch._ops.OpOverload):
                env[node] = _run_op(graph, node, env)
            elif node.target is operator.getitem or isinstance(node.target, torch._ops.HigherOrderOperator):
                env[node] = graph.node_copy(node, env.__getitem__)  # flex attention: kept, its subgraphs too
                propagate(env[node])
            elif node.op == "call_function":
                env[node] = _inline(graph, node, env, traces)
            else:  # a constant the capture kept as an attribute
                env[node] = graph.node_copy(node)
                env[node].meta["val"] = _to_fake(fake_mode, getattr(gm, node.target))
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph)


def _same_fake(fake: Any, value: Any, mode: FakeTensorMode) -> bool:
    """Whether ``fake`` (a captured input's) stands for ``value`` in ``mode``."""
    return (
        isinstance(fake, FakeTensor) and fake.fake_mode is mode and isinstance(value, torch.Tensor)
        and fake.shape == value.shape and fake.stride() == value.stride() and fake.dtype == value.dtype
        and fake.device == value.device
    )


def propagate(node: fx.Node) -> None:
    """Give ``node`` its fake value: its op run on its arguments' values (for ``getitem``, an item
    of its argument's)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
    _set_value(node, args[0][args[1]] if node.target is operator.getitem else node.target(*args, **kwargs))


def call_like(graph: fx.Graph, target: Any, args: tuple, like: fx.Node, kwargs: dict | None = None) -> fx.Node:
    """A new node of ``graph`` with its fake value and ``like``'s call metadata (:data:`_CALL_META`:
    the model's source line and module path that reports show, its placement): a pass's
    replacement for ``like``."""
    node = graph.call_function(target, args, kwargs or {})
    propagate(node)
    node.meta.update({k: like.meta[k] for k in _CALL_META if k in like.meta})
    return node


def _set_value(node: fx.Node, value: Any) -> None:
    """``meta["val"]`` and ``meta["tensor_meta"]`` as ``make_fx`` records them (less its detached
    copy: each call here makes a new fake value, which nothing else holds)."""
    node.meta["val"] = value
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(value)
    else:
        node.meta.pop("tensor_meta", None)


def _run_op(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, Any]) -> fx.Node:
    """The node ``make_fx`` makes for an aten op of the captured graph, without tracing: named after
    the op, its arguments in the dispatcher's form, its value the op run on fake values. (The ops
    here came out of ``make_fx``, so none decomposes further.)"""
    args, kwargs = fx.node.map_arg(_dispatcher_form(node.target, node.args, node.kwargs), env.__getitem__)
    new = graph.create_node("call_function", node.target, args, kwargs, name=node.target.overloadpacket.__name__)
    new.meta = dict(node.meta)
    propagate(new)
    return new


def _dispatcher_form(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """An aten call's arguments as the dispatcher hands them to a tracer: positional where the
    schema allows, trailing defaults and defaulted keyword-only ones left out. (The shard pass
    names every argument of a call whose sizes it localises.)"""
    if not kwargs:
        return args, kwargs
    schema = op._schema.arguments
    bound = {a.name: args[i] if i < len(args) else kwargs.get(a.name, a.default_value) for i, a in enumerate(schema)}
    is_default = lambda a: a.has_default_value() and not isinstance(bound[a.name], fx.Node) and bound[a.name] == a.default_value
    positional = [a for a in schema if not a.kwarg_only]
    while positional and is_default(positional[-1]):
        positional.pop()
    keyword = {a.name: bound[a.name] for a in schema if a.kwarg_only and not is_default(a)}
    return tuple(bound[a.name] for a in positional), keyword


def _inline(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, Any], traces: dict) -> Any:
    """Copy the ops of the helper that ``node`` calls into ``graph``, each with the call's metadata
    and its fake value; the helper's result as a structure of ``graph``'s nodes. The helper is
    traced once per signature (its non-tensor arguments, its tensors' shapes and strides) in
    ``traces``: a model's blocks call the same helpers with the same shapes."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
    leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node)]
    values = [leaf.meta["val"] if isinstance(leaf, fx.Node) else leaf for leaf in leaves]
    signature = (node.target, spec, *(_key(v) for v in values))
    try:
        traced = traces.get(signature)
    except TypeError:  # an argument that cannot be a key: traced for this call alone
        signature, traced = None, None
    if traced is None:

        def call(*tensor_values):
            filled = list(leaves)
            for i, value in zip(tensors, tensor_values):
                filled[i] = value
            a, k = torch.utils._pytree.tree_unflatten(filled, spec)
            return node.target(*a, **k)

        traced = make_fx(call, pre_dispatch=False)(*[values[i] for i in tensors])
        if signature is not None:
            traces[signature] = traced
    meta = {k: node.meta[k] for k in _CALL_META if k in node.meta}
    inner: dict[fx.Node, Any] = dict(zip(traced.graph.find_nodes(op="placeholder"), [leaves[i] for i in tensors]))
    for op in traced.graph.nodes:
        if op.op == "output":
            return fx.node.map_arg(op.args[0], inner.__getitem__)
        if op.op == "get_attr":
            raise NotImplementedError(f"inline_helpers: {node.target} makes a constant")
        if op.op == "call_function":
            inner[op] = new = graph.node_copy(op, inner.__getitem__)
            new.meta = dict(meta)
            propagate(new)
    raise AssertionError("a traced graph ends in its output")


# The metadata a helper's ops take from its call, as ``make_fx`` under ``preserve_node_meta`` gives them
_CALL_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "custom")


def _key(value: Any) -> Any:
    """What of a helper's argument its trace depends on: a tensor's shape, strides, dtype and device."""
    return (value.shape, value.stride(), value.dtype, value.device) if isinstance(value, torch.Tensor) else value


def _writes_in_place(gm: fx.GraphModule) -> bool:
    """Whether an op writes to a value the graph made: the passes shard values, not writes into them.
    (Writes back to the graph's inputs, which ``functionalize`` adds at the end, stay.)"""
    return any(_writes_made_value(node) for node in gm.graph.nodes)


def _writes_to_inputs(gm: fx.GraphModule) -> bool:
    """Whether an op writes to one of the graph's inputs: ``functionalize`` turns those writes into
    copies back to the inputs at the graph's end, which the passes keep."""
    return any(_mutates(node) and not _writes_made_value(node) for node in gm.graph.nodes)


def _mutates(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def _writes_made_value(node: fx.Node) -> bool:
    if not _mutates(node):
        return False
    written = node.args[0] if node.args else None
    return not (isinstance(written, fx.Node) and written.op == "placeholder")


def _unobserved_writes_made_functional(gm: fx.GraphModule, fake_mode: FakeTensorMode) -> bool:
    """Rewrite the writes into values the graph made that no other op can see as functional ops;
    whether that removed them all. Cheaper than a second trace under ``functionalize``, for the two
    kinds models make: a write into a fresh tensor (made by an op that returns no alias) that nothing
    else reads becomes its out-of-place op (the CPU kernel of ``rms_norm`` adds eps in place to the
    mean it just computed); a copy or fill into a slice or select of a fresh tensor becomes a scatter,
    which stands for the tensor from there on (Wan's rotary embedding writes the even and odd
    features into an ``empty_like``; HunyuanVideo sets a column of its attention mask)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if not _writes_made_value(node):
            continue
        written = node.args[0]
        out_of_place = _out_of_place(node.target)
        if _fresh(written) and len(written.users) == 1 and out_of_place is not None:
            node.target = out_of_place
        elif not _write_into_view_as_scatter(gm, node, order, fake_mode):
            return False
    return True


def may_alias(node: fx.Node) -> bool:
    """Whether ``node``'s result may share memory with another value (a view, or an item of one)."""
    if node.target is operator.getitem:
        return may_alias(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _fresh(node: fx.Node) -> bool:
    """A new tensor made by an aten op (not a view of anything)."""
    return isinstance(node.target, torch._ops.OpOverload) and not may_alias(node)


_aten = torch.ops.aten
_SCATTER_OF_VIEW = {_aten.slice.Tensor: _aten.slice_scatter.default, _aten.select.int: _aten.select_scatter.default}
_COPIES = (_aten.copy_.default, _aten.fill_.Tensor, _aten.fill_.Scalar)


def _write_into_view_as_scatter(gm: fx.GraphModule, write: fx.Node, order: dict, fake_mode: FakeTensorMode) -> bool:
    """``base[index] = src`` as ``base = scatter(base, src, index)`` where no other op sees ``base``
    change: ``base`` is fresh, the view is only written, and no view of ``base`` taken before the
    write is read (every later reader of ``base`` reads the scatter instead)."""
    view = write.args[0]
    scatter = _SCATTER_OF_VIEW.get(view.target)
    base = view.args[0] if view.args else None
    if scatter is None or write.target not in _COPIES or write.users or len(view.users) != 1 or not _fresh(base):
        return False
    if any(order.get(u, -1) < order[write] and u is not view and not _fresh(u) for u in base.users):
        return False  # an alias of base made before the write would see it
    graph, target = gm.graph, view.meta["val"]

    def add(op, args, kwargs=None):
        new = graph.create_node("call_function", op, args, kwargs or {}, name=op.overloadpacket.__name__)
        new.meta = {k: write.meta[k] for k in _CALL_META if k in write.meta}
        with fake_mode:
            propagate(new)
        return new

    with graph.inserting_before(write.next):
        if write.target is _aten.fill_.Scalar:
            src = add(_aten.full.default, (list(target.shape), write.args[1]),
                      dict(dtype=target.dtype, layout=torch.strided, device=target.device, pin_memory=False))
        else:
            src = write.args[1]  # a fill's value may be a CPU scalar tensor for a CUDA tensor
            if src.meta["val"].dtype != target.dtype or src.meta["val"].device != target.device:
                src = add(_aten._to_copy.default, (src,), dict(dtype=target.dtype, device=target.device))
            if src.meta["val"].shape != target.shape:
                src = add(_aten.expand.default, (src, list(target.shape)))
        scattered = add(scatter, (base, src, *view.args[1:]))
    for user in list(base.users):
        if order.get(user, -1) > order[write]:
            user.replace_input_with(base, scattered)
    graph.erase_node(write)
    graph.erase_node(view)
    return True


def _out_of_place(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.add_.Scalar`` -> ``aten.add.Scalar``: the same arguments, a new result."""
    name = op.overloadpacket.__name__
    packet = getattr(torch.ops.aten, name[:-1], None) if name.endswith("_") else None
    functional = getattr(packet, op._overloadname, None) if packet is not None else None
    return functional if functional is not None and not functional._schema.is_mutable else None


def _name_inputs(gm: fx.GraphModule, traced: fx.GraphModule) -> None:
    """Give the traced graph's inputs (``make_fx`` names them ``arg0_1``, ...) the names of the
    model's values they hold (``hidden_states``, ``transformer_blocks_0_attn_to_q_weight``), so
    that reports and dumps say which parameter or argument an input is."""
    sources = list(gm.graph.find_nodes(op="placeholder"))
    targets = list(traced.graph.find_nodes(op="placeholder"))
    if len(sources) != len(targets):  # tensor-subclass inputs were flattened: no one-to-one map
        return
    for source, target in zip(sources, targets):
        target._rename(input_name(source))
        target.target = target.name


def input_name(placeholder: fx.Node) -> str:
    """A Dynamo graph input's name from the model's point of view, as an identifier:
    ``L['self']...._modules['attn']._parameters['weight']`` -> ``attn_weight``,
    ``L['kwargs']['hidden_states']`` -> ``hidden_states``; other graphs keep their names."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    text = getattr(source, "name", None)
    text = text() if callable(text) else text  # a method on torch 2.11, a property on 2.13
    if not text:
        return placeholder.name
    path = re.sub(r"^L\['(self|kwargs|args)'\]", "", text)
    path = re.sub(r"\.(?:__dict__\['_modules'\]|_modules|_parameters|_buffers)\[", "[", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", re.sub(r"^L\[", "[", path))
    name = re.sub(r"\W+", "_", path).strip("_")
    return name or placeholder.name


def scalar_reads(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[int, Any]:
    """Positions and values of the inputs the graph reads as Python numbers (``x.item()``).

    Dynamo (2.11) passes some float attributes of modules (a LayerNorm's eps) as 0-dim CPU tensor
    inputs and reads them back with ``.item()``; a fake trace cannot read a value, so the capture
    uses the current one and the backend compiles one graph per value.
    """
    found = {}
    for index, (node, value) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), example_inputs)):
        if (
            isinstance(value, torch.Tensor)
            and not isinstance(value, FakeTensor)
            and value.dim() == 0
            and value.device.type == "cpu"
            and any(_reads_number(user) for user in node.users)
        ):
            found[index] = value.item()
    return found


def _reads_number(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "item") or node.target is torch.Tensor.item


class _Interpreter(fx.Interpreter):
    """Runs a graph, answering ``.item()`` on the given placeholders with their known values."""

    def __init__(self, gm: fx.GraphModule, read_values: dict[fx.Node, Any]):
        super().__init__(gm)
        self.read_values = read_values

    def run_node(self, n: fx.Node) -> Any:
        if _reads_number(n) and n.args[0] in self.read_values:
            return self.read_values[n.args[0]]
        return super().run_node(n)


def _to_fake(mode: FakeTensorMode, x: Any) -> Any:
    if isinstance(x, FakeTensor):
        x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if isinstance(x, torch.Tensor):
        return mode.from_tensor(x, static_shapes=True)
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return x


def flatten_subclasses(values: Sequence[Any]) -> list[Any]:
    """``values`` with every traceable tensor subclass replaced by its inner tensors (recursively),
    in ``__tensor_flatten__`` order: the inputs of a graph captured from subclass inputs."""
    return [part for value in values for part in _inner_tensors(value, [])]


class SubclassFlattener:
    """``flatten_subclasses`` for every call of one compiled graph, at a fraction of its host cost.

    torchao's quantized weights are subclasses whose inner tensors the graph takes; flattening a
    few hundred of them costs milliseconds per call. The weights are the same objects every call,
    so each input's inner tensors are kept and reused while the input, every inner tensor and every
    other attribute of it are still the objects they were (a reassigned one is flattened again).
    ``check`` (the backend's :class:`~para_fx.core.weight_guards.LayoutCheck`, for the weights whose
    guards it took from Dynamo) sees each input flattened anew (``check.new_weight(position,
    value)``), and ``check.in_place(parts, paths)`` (each part's input position and attribute path)
    makes the check run on every call that the inner tensors kept their metadata."""

    def __init__(self, example_inputs: Sequence[Any], check: Any = None):
        self.subclass_positions = [i for i, x in enumerate(example_inputs) if is_traceable_wrapper_subclass(x)]
        self.seen: dict[int, tuple[Any, list[tuple[Any, str, Any]], list[Any], list[str]]] = {}
        self.check = check
        self.last: _LastCall | None = None

    def __call__(self, values: Sequence[Any]) -> list[Any]:
        if self.last is None or not self.last.same_objects(values, self.subclass_positions):
            self.last = self._flatten(values)
        self.last.unchanged_in_place()
        return self.last.flat(values)

    def _flatten(self, values: Sequence[Any]) -> _LastCall:
        parts = {i: self._inner(i, values[i]) for i in self.subclass_positions}
        links = [link for i in self.subclass_positions for link in self.seen[i][1]]
        in_place = None
        if self.check is not None:
            paths = [(i, path) for i in self.subclass_positions for path in self.seen[i][3]]
            in_place = self.check.in_place([p for inner in parts.values() for p in inner], paths)
        return _LastCall(values, parts, links, in_place)

    def _inner(self, position: int, value: Any) -> list[Any]:
        seen = self.seen.get(position)
        if seen is not None and seen[0] is value and all(getattr(owner, name) is inner for owner, name, inner in seen[1]):
            return seen[2]
        if self.check is not None:
            self.check.new_weight(position, value)
        links: list[tuple[Any, str, Any]] = []
        paths: list[str] = []
        parts = _inner_tensors(value, links, paths)
        self.seen[position] = (value, links, parts, paths)
        return parts


class _LastCall:
    """The objects of a flattening, compared and reused with C loops (``map`` over ``operator.is_``
    and ``itemgetter``): a Python loop over FLUX's 504 weights alone costs half a millisecond a call."""

    def __init__(self, values: Sequence[Any], parts: dict[int, list[Any]], links: list[tuple[Any, str, Any]],
                 in_place: Callable[[], None] | None):
        self.count = len(values)
        self.subclasses = [values[i] for i in parts]
        self.owners, self.names, self.inner = ([link[k] for link in links] for k in range(3))
        self.parts = [part for inner in parts.values() for part in inner]
        self.unchanged_in_place = in_place or _nothing
        indices, start = [], len(values)  # into (*values, *self.parts)
        for i in range(len(values)):
            if i in parts:
                indices.extend(range(start, start + len(parts[i])))
                start += len(parts[i])
            else:
                indices.append(i)
        pick = operator.itemgetter(*indices)
        self.pick = pick if len(indices) > 1 else lambda items: (pick(items),)

    def same_objects(self, values: Sequence[Any], positions: list[int]) -> bool:
        return (
            len(values) == self.count
            and all(map(operator.is_, map(values.__getitem__, positions), self.subclasses))
            and all(map(operator.is_, map(getattr, self.owners, self.names), self.inner))
        )

    def flat(self, values: Sequence[Any]) -> list[Any]:
        return list(self.pick((*values, *self.parts)))


def _nothing() -> None:
    pass


def _inner_tensors(value: Any, links: list[tuple[Any, str, Any]], paths: list[str] | None = None, path: str = "") -> list[Any]:
    """``value``'s inner tensors, recursively, in ``__tensor_flatten__`` order; every
    (owner, attribute, value) met on the way is added to ``links``: the inner tensors, and each
    subclass's other instance attributes (its metadata: one reassigned is a change to check);
    ``paths`` gets each inner tensor's dotted attribute path."""
    if not is_traceable_wrapper_subclass(value):
        if paths is not None:
            paths.append(path)
        return [value]
    parts = []
    names = value.__tensor_flatten__()[0]
    for name in names:
        inner = getattr(value, name)
        links.append((value, name, inner))
        parts.extend(_inner_tensors(inner, links, paths, f"{path}.{name}" if path else name))
    attributes = getattr(value, "__dict__", {})  # none for a subclass with __slots__ only
    links.extend((value, name, attribute) for name, attribute in attributes.items() if name not in names)
    return parts


def _flatten(value: Any) -> tuple[list[Any], Any]:
    """(inner tensors, rebuild) where ``rebuild(inner tensors)`` makes the subclass again."""
    if not is_traceable_wrapper_subclass(value):
        return [value], lambda parts: parts[0]
    names, context = value.__tensor_flatten__()
    pieces = [(name, *_flatten(getattr(value, name))) for name in names]
    cls, size, stride = type(value), value.size(), value.stride()

    def rebuild(parts):
        inner, start = {}, 0
        for name, flat, rebuild_inner in pieces:
            inner[name] = rebuild_inner(parts[start : start + len(flat)])
            start += len(flat)
        return cls.__tensor_unflatten__(inner, context, size, stride)

    return [part for _, flat, _ in pieces for part in flat], rebuild


def _desugar_subclasses(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """``gm`` as a graph of plain aten ops over the subclasses' inner tensors. The subclasses are
    rebuilt inside the trace so their ``__torch_function__`` / ``__torch_dispatch__`` run and are
    recorded; ``torch.func.functionalize`` would hide them (and rejects torchao's autograd.Functions),
    so this trace is not functionalised: the caller's capture of the plain graph is."""
    flat_inputs = [_flatten(value) for value in example_inputs]

    def run(*parts):
        args, start = [], 0
        for flat, rebuild in flat_inputs:
            args.append(rebuild(list(parts[start : start + len(flat)])))
            start += len(flat)
        return fx.Interpreter(gm).run(*args)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_parts = [_to_fake(fake_mode, part) for flat, _ in flat_inputs for part in flat]
    with torch.fx.traceback.preserve_node_meta(), torch.no_grad(), fake_mode:
        return make_fx(run, pre_dispatch=False)(*fake_parts)
