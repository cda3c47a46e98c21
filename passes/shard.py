"""The shard pass: split activations over one mesh group, with no model code.

1. *Demand*: walking back from every attention's query, find the tensors whose dim flows into
   the attention's sequence dim (or batch dim, for the batch group), by asking the rules which
   input dim would produce the demanded output dim.
2. *Propagate*: walk forward; a demanded tensor that is still replicated is sliced locally (free),
   every op follows its rule (:mod:`para_fx.passes.shard_rules`), inputs are redistributed where a
   rule needs it (all-gather, all-reduce, slice), attentions become context-parallel attention,
   and graph outputs are gathered, so the graph's signature and results are unchanged.

Every gather a rule forces on a sharded value is reported as a fallback with its source line.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from para_fx import collectives
from para_fx.attention import sharded_attention
from para_fx.mesh import MeshInfo
from para_fx.placement import REPLICATE, Partial, Placement, Replicate, Shard, plain
from para_fx.report import AttentionSite, Fallback, Report, module_path, source_line

from .shard_rules import VIEW_OPS, Decision, Group, decide, is_pointwise, replicated, shape, tensor_inputs, val

aten = torch.ops.aten

SEGMENT_OPS = {aten.slice.Tensor, aten.slice_scatter.default}


def _op_dim(node: fx.Node) -> int:
    ndim = len(shape(node))
    dim = node.args[1] if node.target is aten.slice.Tensor else node.args[2] if len(node.args) > 2 else 0
    return dim + ndim if dim < 0 else dim


RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}

ATTENTION_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Which group to split and which attention dim drives it: 2 (sequence) or 0 (batch)."""

    kind: str  # "seq" or "batch"
    group: Group
    info: MeshInfo

    @property
    def attention_dim(self) -> int:
        return 2 if self.kind == "seq" else 0


def attention_args(node: fx.Node) -> dict:
    """The attention call's arguments by name: query, key, value, mask, dropout_p, is_causal, scale."""
    _, kwargs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kwargs["mask"] = kwargs.pop("attn_mask", None) if "attn_mask" in kwargs else kwargs.pop("attn_bias", None)
    return kwargs


def find_demand(graph: fx.Graph, spec: ShardSpec) -> dict[fx.Node, int]:
    """Tensor -> the dim that, sharded, flows into an attention query's sequence (or batch) dim."""
    demand: dict[fx.Node, int] = {}
    item_demand: dict[fx.Node, dict[int, int]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in ATTENTION_OPS:
            query = attention_args(node)["query"]
            demand.setdefault(query, spec.attention_dim)
    for node in reversed(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is operator.getitem and node in demand:
            item_demand.setdefault(node.args[0], {})[node.args[1]] = demand[node]
            continue
        wanted = {None: demand[node]} if node in demand else item_demand.get(node, {})
        if not wanted or node.target in ATTENTION_OPS:
            continue
        inputs = tensor_inputs(node)
        if node.target in SEGMENT_OPS and None in wanted and _op_dim(node) == wanted[None]:
            # Whether a slice keeps whole shards depends on the layout, known only when propagating.
            for a in inputs[:2]:
                if len(shape(a)) == len(shape(node)):
                    demand.setdefault(a, wanted[None])
            continue
        for a in inputs:
            if a in demand:
                continue
            for dim, size in enumerate(shape(a)):
                if size < spec.group.parts:
                    continue
                if node.target in RESHAPES and None in wanted and size < shape(node)[wanted[None]]:
                    continue  # a factor of the tokens (frames of frames x height x width): split after the merge
                pl = {x: REPLICATE for x in inputs}
                pl[a] = Shard(dim, plain(size))
                decision = decide(node, pl, spec.group)
                if decision.reason is None and _produces(decision.out, wanted):
                    demand[a] = dim
                    break
    return demand


def _produces(out, wanted: dict) -> bool:
    for index, dim in wanted.items():
        p = out if index is None else (out[index] if isinstance(out, list) and index < len(out) else None)
        if isinstance(p, Shard) and p.dim == dim:
            return True
    return False


class _Builder:
    """Builds the sharded graph node by node, tracking each value's placement."""

    def __init__(self, gm: fx.GraphModule, spec: ShardSpec, report: Report):
        self.gm, self.spec, self.report = gm, spec, report
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.pl: dict[fx.Node, Placement | list] = {}
        self.moved: dict[tuple[fx.Node, Placement], fx.Node] = {}
        self.full: dict[fx.Node, fx.Node] = {}  # values this pass sliced: their replicated originals

    # -- redistribution --------------------------------------------------------------------

    def value(self, node: fx.Node, want: Placement, user: fx.Node) -> fx.Node:
        have = self.pl[node]
        if have == want:
            return self.env[node]
        key = (node, want)
        if key not in self.moved:
            self.moved[key] = self._move(node, have, want, user)
            _mark(self.moved[key], para_placement=str(want))
        return self.moved[key]

    def _move(self, node: fx.Node, have: Placement, want: Placement, user: fx.Node) -> fx.Node:
        g, x = self.spec.group, self.env[node]
        if isinstance(have, Shard) and have != want:  # a cheap replicated recomputation beats a gather
            full = self._rematerialize(node, budget=[16])
            if full is not None:
                x, have = full, REPLICATE
        if isinstance(have, Partial):
            x = self._call(collectives.reduce, (x, have.reduce, g.name), user)
            have = REPLICATE
        if isinstance(have, Shard) and have != want:
            x = self._call(collectives.gather, (x, have.dim, have.layout, g.parts, g.name), user)
            have = REPLICATE
        if isinstance(want, Shard):
            x = self._call(collectives.take_local, (x, want.dim, want.layout, g.parts, g.rank), user)
        return self._restride(x, node, user)

    def _restride(self, x: fx.Node, like: fx.Node, user: fx.Node) -> fx.Node:
        """Give an inserted value the memory order of the value it stands for, so the graph's views stay valid."""
        v = val(like)
        if isinstance(v, (tuple, list)):
            v = v[0]
        return self._call(collectives.in_memory_order, (x, memory_order(v)), user)

    def _rematerialize(self, node: fx.Node, budget: list[int]) -> fx.Node | None:
        """The replicated value of ``node`` by re-running a short chain of views and pointwise ops
        from values that are replicated (e.g. a RoPE table sliced to one layout, needed in another)."""
        if node in self.full:
            return self.full[node]
        if isinstance(self.pl[node], Replicate):
            return self.env[node]
        budget[0] -= 1
        if budget[0] < 0 or node.op != "call_function" or not (is_pointwise(node.target) or node.target in VIEW_OPS):
            return None
        full_inputs = {}
        for a in tensor_inputs(node):
            full_inputs[a] = self._rematerialize(a, budget)
            if full_inputs[a] is None:
                return None
        remap = lambda a: full_inputs[a] if a in full_inputs else self._map(a)
        self.full[node] = self._call(node.target, fx.node.map_arg(node.args, remap), node, fx.node.map_arg(node.kwargs, remap))
        return self.full[node]

    def _call(self, fn, args, like: fx.Node, kwargs=None) -> fx.Node:
        new = self.graph.call_function(fn, args, kwargs or {})
        new.meta = {k: v for k, v in like.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack")}
        return new

    # -- nodes -----------------------------------------------------------------------------

    def run(self, demand: dict[fx.Node, int]) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                outs = torch.utils._pytree.tree_map(
                    lambda a: self.value(a, REPLICATE, node) if isinstance(a, fx.Node) and a in self.pl else self._map(a),
                    node.args[0],
                )
                self.graph.output(outs)
                continue
            if node.op in ("placeholder", "get_attr"):
                self.env[node] = self.graph.node_copy(node, lambda a: self.env[a])
                self.pl[node] = REPLICATE
            elif node.target is operator.getitem and isinstance(self.pl.get(node.args[0]), list):
                base, index = node.args
                self.env[node] = self._call(operator.getitem, (self.env[base], index), node)
                self.pl[node] = self.pl[base][index]
            elif node.target in ATTENTION_OPS:
                self._attention(node)
            else:
                self._apply(node, decide(node, self.pl, self.spec.group))
            self._maybe_start(node, demand)
            _mark(self.env[node], para_placement=str(self.pl[node]))
        return fx.GraphModule(self.gm, self.graph)

    def _map(self, a):
        return self.env[a] if isinstance(a, fx.Node) else a

    def _apply(self, node: fx.Node, d: Decision) -> None:
        inputs = {a: self.value(a, want, node) for a, want in d.inputs.items()}
        args = d.args if d.args is not None else node.args
        kwargs = d.kwargs if d.kwargs is not None else node.kwargs
        remap = lambda a: inputs[a] if a in inputs else self._map(a)
        args = fx.node.map_arg(args, remap)
        kwargs = fx.node.map_arg(kwargs, remap)
        self.env[node] = self._call(d.target or node.target, args, node, kwargs)
        self.pl[node] = d.out
        if d.reason is not None:
            self.report.fallbacks.append(Fallback(_op_name(node.target), d.reason, source_line(node), module_path(node)))

    def _maybe_start(self, node: fx.Node, demand: dict[fx.Node, int]) -> None:
        """Shard a demanded tensor as soon as it exists: slicing a replicated value is free."""
        if node not in demand or not isinstance(self.pl.get(node), Replicate):
            return
        dim = demand[node]
        size = shape(node)[dim]
        if size < self.spec.group.parts:
            return
        want = Shard(dim, plain(size))
        self.full[node] = self.env[node]
        self.env[node] = self.value(node, want, node)
        self.pl[node] = want

    # -- attention -------------------------------------------------------------------------

    def _attention(self, node: fx.Node) -> None:
        a = attention_args(node)
        q, k, v, mask = a["query"], a["key"], a["value"], a["mask"]
        n_out = len(val(node)) if isinstance(val(node), (tuple, list)) else None
        pq, pk, pv = self.pl[q], self.pl[k], self.pl[v]
        dim = self.spec.attention_dim
        unsupported = self._unsupported_attention(node, a)
        site = dict(module=module_path(node), global_query_len=shape(q)[2], placements=f"q={pq} k={pk} v={pv}")
        if not (isinstance(pq, Shard) and pq.dim == dim) or unsupported:
            if unsupported and any(isinstance(p, Shard) for p in (pq, pk, pv)):
                self.report.fallbacks.append(Fallback(_op_name(node.target), unsupported, source_line(node), module_path(node)))
            self._apply(node, replicated(node))
            if self.spec.kind == "seq":
                self.report.attention_sites.append(AttentionSite(strategy="replicated", local_query_len=shape(q)[2], **site))
            return
        out_pl = Shard(dim, pq.layout)
        outs = [out_pl, out_pl] + [REPLICATE] * ((n_out or 2) - 2)
        if self.spec.kind == "batch":
            inputs = {q: pq, k: pq, v: pq}
            if mask is not None:
                inputs[mask] = pq if shape(mask)[0] == shape(q)[0] else REPLICATE
            self._apply(node, Decision(inputs, outs if n_out else out_pl))
            return
        local_len = self.spec.group.local(pq.layout)
        if isinstance(pk, Shard) and pk.dim == 2 and pv == pk:
            self._context_parallel(node, a, pq, pk, out_pl, n_out)
            info = self.spec.info
            strategy = "ulysses" if info.ring == 1 else "ring" if info.ulysses == 1 else "hybrid"
        else:  # key/value replicated (cross-attention to text): local attention, no communication
            inputs = {q: pq, k: REPLICATE, v: REPLICATE}
            if mask is not None:
                inputs[mask] = Shard(2, pq.layout) if shape(mask)[2] > 1 else REPLICATE
            self._apply(node, Decision(inputs, outs if n_out else out_pl))
            strategy = "local"
        self.report.attention_sites.append(AttentionSite(strategy=strategy, local_query_len=local_len, **site))

    def _unsupported_attention(self, node: fx.Node, a: dict) -> str | None:
        if a.get("dropout_p", 0.0) or a.get("is_causal", False):
            return "causal or dropout attention is not context-parallel"
        if a.get("enable_gqa", False) or shape(a["key"])[1] != shape(a["query"])[1]:
            return "grouped-query attention is not context-parallel"
        mask = a["mask"]
        if mask is not None and (len(shape(mask)) != 4 or shape(mask)[1] not in (1, shape(a["query"])[1])):
            return f"attention mask of shape {shape(mask)} is not supported"
        for user in node.users:
            if user.target is operator.getitem and user.args[1] != 0 and user.users:
                return "the attention's log-sum-exp is used"
        return None

    def _context_parallel(self, node, a, pq: Shard, pk: Shard, out_pl: Shard, n_out) -> None:
        q, k, v, mask = a["query"], a["key"], a["value"], a["mask"]
        inputs = {q: pq, k: pk, v: pk}
        if mask is not None:
            inputs[mask] = REPLICATE
        args = [self.value(x, want, node) for x, want in inputs.items()]
        if mask is None:
            args.append(None)
        scale = a.get("scale") or shape(q)[-1] ** -0.5
        out = self._call(
            sharded_attention_node,
            tuple(args),
            node,
            dict(info=dataclasses.astuple(self.spec.info), q_layout=pq.layout, kv_layout=pk.layout, scale=scale),
        )
        _mark(out, para_site=len(self.report.attention_sites))  # the site this call is about to be reported as
        out = self._restride(out, node, node)
        if n_out:  # the attention op returns a tuple; only its output (item 0) is used
            self.env[node] = self._call(_as_tuple, (out, n_out), node)
            self.pl[node] = [out_pl] + [REPLICATE] * (n_out - 1)
        else:
            self.env[node] = out
            self.pl[node] = out_pl


def _mark(node: fx.Node, **entries: object) -> None:
    """Note on a node, for the reports, in the meta that re-tracing keeps (``custom``)."""
    node.meta["custom"] = {**(node.meta.get("custom") or {}), **entries}


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dims from outermost to innermost in memory."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride()[d], -d)))


def sharded_attention_node(q, k, v, bias, *, info, q_layout, kv_layout, scale):
    """The graph's call into :func:`sharded_attention` (mesh info travels as a plain tuple)."""
    return sharded_attention(q, k, v, MeshInfo(*info), q_layout=q_layout, kv_layout=kv_layout, bias=bias, scale=scale)


def _as_tuple(out, n):
    return (out,) + (None,) * (n - 1)


def _op_name(target) -> str:
    return getattr(target, "__name__", str(target)) if not isinstance(target, torch._ops.OpOverload) else str(target)


def shard(gm: fx.GraphModule, spec: ShardSpec, report: Report) -> fx.GraphModule:
    """Split ``gm``'s activations over ``spec.group``; results on every rank are unchanged."""
    demand = find_demand(gm.graph, spec)
    return _Builder(gm, spec, report).run(demand)
