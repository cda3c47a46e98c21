"""The shard pass: split activations over one mesh group, with no model code. Three steps, one
data structure (:class:`Plan`) between them:

1. *Plan* (:func:`plan`): walking back from every attention's query, find the tensors whose dim
   flows into the attention's sequence dim (or batch dim, for the batch group) by asking the rules
   which input dim would produce the demanded output dim; then walk forward: a demanded tensor that
   is still replicated is split where it appears (free), every op gets a :class:`Decision` from its
   rule (:mod:`para_fx.passes.shard_rules`), every attention a site with its strategy.
2. *Localize* (:mod:`para_fx.passes.localize`): size and offset arguments rewritten to this rank's.
3. *Emit* (:func:`emit`): build the graph: inputs moved to the placements the plan asks for
   (:mod:`para_fx.passes.redistribute`), attentions made context-parallel, graph outputs gathered,
   so the graph's signature and results are unchanged.

Fallbacks and attention sites are reported from the plan, each with the model's source line.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from para_fx.runtime.attention import flex_block_mask_heads, flex_to_heads, flex_to_sequence, sharded_attention
from para_fx.core.mesh import MeshInfo
from para_fx.core.placement import REPLICATE, Partial, Placement, Replicate, Shard, global_size, plain
from para_fx.inspect.report import AttentionSite, Fallback, Report, module_path, source_line

from .localize import localize
from .redistribute import Redistributor, mark, same_rows, whole_chain
from .shard_rules import (
    FLEX_ATTENTION, FLEX_INDEX, Call, Decision, Group, decide, family, flex_args, flex_block_mask_tensors, flex_reads,
    replicated, reshape_placement, shape, tensor_inputs, val,
)

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Which group to split and which attention dim drives it: 2 (sequence) or 0 (batch)."""

    kind: str  # "seq" or "batch"
    group: Group
    info: MeshInfo
    ring_kv: str = "pass"  # how Ring brings keys/values: "pass" or "gather" (runtime/attention.py)
    ring_transport: str = "nccl"  # what carries them: "nccl" or "copy_engine" (runtime/attention.py)

    @property
    def attention_dim(self) -> int:
        return 2 if self.kind == "seq" else 0


@dataclasses.dataclass
class Site:
    """An attention as the plan runs it."""

    strategy: str  # "ulysses", "ring", "hybrid" (context-parallel), "local", "replicated", "batch"
    local_query_len: int
    global_query_len: int
    placements: str


@dataclasses.dataclass
class Plan:
    """What the pass does to each node, decided before any node is built."""

    decisions: dict[fx.Node, Decision] = dataclasses.field(default_factory=dict)
    placements: dict[fx.Node, Placement | list] = dataclasses.field(default_factory=dict)  # each value, once planned
    starts: dict[fx.Node, Shard] = dataclasses.field(default_factory=dict)  # demanded values split where they appear
    sites: dict[fx.Node, Site] = dataclasses.field(default_factory=dict)


def attention_args(node: fx.Node) -> dict:
    """The attention call's arguments by name: query, key, value, mask, dropout_p, is_causal, scale
    (and, for flex attention, its own: :func:`flex_args`)."""
    if node.target is FLEX_ATTENTION:
        return {**flex_args(node), "mask": None, "dropout_p": 0.0, "is_causal": False}
    _, kwargs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kwargs["mask"] = kwargs.pop("attn_mask", None) if "attn_mask" in kwargs else kwargs.pop("attn_bias", None)
    return kwargs


# --- plan --------------------------------------------------------------------------------------


def find_demand(graph: fx.Graph, spec: ShardSpec) -> dict[fx.Node, Shard]:
    """Tensor -> the split of it that flows into an attention query's sequence (or batch) dim."""
    demand: dict[fx.Node, Shard] = {}
    item_demand: dict[fx.Node, dict[int, Shard]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and family(node.target) == "attention":
            query = attention_args(node)["query"]
            demand.setdefault(query, Shard(spec.attention_dim, plain(shape(query)[spec.attention_dim])))
    for node in reversed(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is operator.getitem and node in demand:
            item_demand.setdefault(node.args[0], {})[node.args[1]] = demand[node]
            continue
        wanted = {None: demand[node]} if node in demand else item_demand.get(node, {})
        kind = family(node.target)
        if not wanted or kind == "attention" or node.target is aten.select_scatter.default:
            # a row written into a buffer: the result is split where it appears, not the buffer
            # before it, whose other writes (a slice of embeddings overwritten) may cut that split
            continue
        inputs = tensor_inputs(node)
        if kind in ("slice", "scatter") and None in wanted and _segment_dim(node) == wanted[None].dim:
            # Whether a slice keeps whole shards depends on the layout, known only when propagating.
            dim = wanted[None].dim
            for a in inputs[:2]:
                if len(shape(a)) == len(shape(node)):
                    demand.setdefault(a, Shard(dim, plain(shape(a)[dim])))
            continue
        for a in inputs:
            if a in demand and not _is_plain(demand[a]):
                continue
            for candidate in _candidates(node, a, wanted, spec.group.parts):
                trial = {x: REPLICATE for x in inputs}
                trial[a] = candidate
                decision = decide(node, trial, spec.group)
                if decision.reason is None and _produces(decision.out, wanted):
                    _refine(demand, a, candidate)
                    break
    return demand


def _refine(demand: dict[fx.Node, Shard], a: fx.Node, candidate: Shard) -> None:
    """Demand ``candidate`` of ``a``. A plain demand takes any layout of its dim, so the segmented
    layout one user needs (tokens regrouped by frame, each frame split) serves every user."""
    if a not in demand or (candidate.dim == demand[a].dim and _is_plain(demand[a]) and not _is_plain(candidate)):
        demand[a] = candidate


def _candidates(node: fx.Node, a: fx.Node, wanted: dict, parts: int):
    """Splits of input ``a`` to try, best first. A wanted segmented layout is carried back as it
    is: a sequence split inside a flattened ``[B*S, C]`` is ``((S, 1),) * B``, which a plain split
    of ``B*S`` (a batch half) would not give back after the reshape to ``[B, S, ...]``."""
    kind = family(node.target)
    if kind == "reshape" and None in wanted:
        back = reshape_placement(wanted[None], shape(node), shape(a))
        if back is not None and min(count for count, _ in back.layout) >= parts:
            yield back
    for dim, size in enumerate(shape(a)):
        if size < parts:
            continue
        if kind == "reshape" and None in wanted and size < shape(node)[wanted[None].dim]:
            continue  # a factor of the tokens (frames of frames x height x width): split after the merge
        for want in wanted.values():
            if not _is_plain(want) and global_size(want.layout) == size:
                yield Shard(dim, want.layout)
        yield Shard(dim, plain(size))


def _is_plain(p: Shard) -> bool:
    return p.layout == plain(global_size(p.layout))


def _segment_dim(node: fx.Node) -> int:
    return Call(node).dim("dim", len(shape(node)))


def _produces(out, wanted: dict) -> bool:
    """Whether ``out`` is split as wanted: on the wanted dim, and in the wanted layout where that
    is segmented (a plain split of a flattened ``[B*S]`` is a batch split, not a sequence split)."""
    for index, want in wanted.items():
        p = out if index is None else (out[index] if isinstance(out, list) and index < len(out) else None)
        if isinstance(p, Shard) and p.dim == want.dim and (_is_plain(want) or p.layout == want.layout):
            return True
    return False


def plan(gm: fx.GraphModule, spec: ShardSpec) -> Plan:
    """Every node's decision and placement, and every attention's site, for ``spec``'s group."""
    demand = find_demand(gm.graph, spec)
    p = Plan()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            p.placements[node] = REPLICATE
        elif node.op == "output":
            continue
        elif node.target is operator.getitem and isinstance(p.placements.get(node.args[0]), list):
            p.placements[node] = p.placements[node.args[0]][node.args[1]]
        else:
            if node.target is FLEX_ATTENTION:
                decision = _plan_flex(gm, node, p, spec)
            elif family(node.target) == "attention":
                decision = _plan_attention(node, p, spec)
            else:
                decision = _decide(node, p, spec)
            p.decisions[node] = decision
            p.placements[node] = decision.out
        if node in demand and isinstance(p.placements[node], Replicate) and shape(node)[demand[node].dim] >= spec.group.parts:
            p.starts[node] = p.placements[node] = demand[node]
    return p


def _decide(node: fx.Node, p: Plan, spec: ShardSpec) -> Decision:
    """``node``'s decision. A split input whose whole value is at hand anyway (split where it
    appears, or a short chain of cheap ops from such values, which the emitter re-runs whole:
    :func:`whole_chain`) is seen as replicated where that spares a fallback or a gather: a slice
    that cuts its shards reads the whole value, a fresh buffer follows the layout of what is
    written into it."""
    decision = decide(node, p.placements, spec.group)
    if _cost(decision, p, spec.group, ()) == (False, 0):
        return decision
    at_hand = [a for a in tensor_inputs(node)
               if isinstance(p.placements[a], Shard) and whole_chain(a, p.placements, p.starts.__contains__) is not None]
    cost = _cost(decision, p, spec.group, at_hand)
    if not at_hand or cost == (False, 0):
        return decision
    whole = decide(node, {**p.placements, **{a: REPLICATE for a in at_hand}}, spec.group)
    return whole if _cost(whole, p, spec.group, at_hand) < cost else decision


def _cost(decision: Decision, p: Plan, group: Group, at_hand) -> tuple[bool, int]:
    """Whether ``decision`` falls back, and how many of its inputs it gathers or reduces (a split
    input whose whole is ``at_hand`` moves for free, as does a replicated one)."""
    moved = 0
    for a, want in decision.inputs.items():
        have = p.placements[a]
        if isinstance(have, Partial) and want != have:
            moved += 1
        elif isinstance(have, Shard) and want != have and a not in at_hand and not same_rows(have, want, group.parts):
            moved += 1
    return decision.reason is not None, moved


def _plan_attention(node: fx.Node, p: Plan, spec: ShardSpec) -> Decision:
    a = attention_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["mask"]
    pq, pk, pv = (p.placements[x] for x in (q, k, v))
    n_out = len(val(node)) if isinstance(val(node), (tuple, list)) else None
    dim = spec.attention_dim
    site = dict(global_query_len=shape(q)[2], placements=f"q={pq} k={pk} v={pv}")
    unsupported = unsupported_attention(node, a)
    if not (isinstance(pq, Shard) and pq.dim == dim) or unsupported:
        sharded = any(isinstance(x, Shard) for x in (pq, pk, pv))
        reason = unsupported if unsupported and sharded else None
        if spec.kind == "seq":
            p.sites[node] = Site("replicated", shape(q)[2], **site)
        return replicated(Call(node), reason)
    out_pl = Shard(dim, pq.layout)
    out = [out_pl, out_pl] + [REPLICATE] * ((n_out or 2) - 2) if n_out else out_pl
    if spec.kind == "batch":
        inputs = {q: pq, k: pq, v: pq}
        if mask is not None:
            inputs[mask] = pq if shape(mask)[0] == shape(q)[0] else REPLICATE
        return Decision(inputs, out)
    local_len = spec.group.local(pq.layout)
    sharded_kv = isinstance(pk, Shard) and pk.dim == 2 and pv == pk
    if sharded_kv or a["is_causal"]:
        # a causal mask is by global positions, which only the context-parallel attention knows:
        # replicated keys/values are sliced (free) rather than attended locally
        info = spec.info
        strategy = "ulysses" if info.ring == 1 else "ring" if info.ulysses == 1 else "hybrid"
        kv_pl = pk if sharded_kv else Shard(2, plain(shape(k)[2]))
        inputs = {q: pq, k: kv_pl, v: kv_pl}
        if mask is not None:
            inputs[mask] = REPLICATE
    else:  # key/value replicated (cross-attention to text): local attention, no communication
        strategy = "local"
        inputs = {q: pq, k: REPLICATE, v: REPLICATE}
        if mask is not None:
            inputs[mask] = Shard(2, pq.layout) if shape(mask)[2] > 1 else REPLICATE
    p.sites[node] = Site(strategy, local_len, **site)
    return Decision(inputs, out)


def unsupported_attention(node: fx.Node, a: dict) -> str | None:
    """Why an attention cannot be split, or None. Causal and grouped-query attention can be (see
    :func:`para_fx.runtime.attention.sharded_attention`)."""
    if a.get("dropout_p", 0.0):
        return "dropout attention is not context-parallel"
    mask = a["mask"]
    if mask is not None and (len(shape(mask)) != 4 or shape(mask)[1] not in (1, shape(a["query"])[1])):
        return f"attention mask of shape {shape(mask)} is not supported"
    for user in node.users:
        if user.target is operator.getitem and user.args[1] != 0 and user.users:
            return "the attention's log-sum-exp is used"
    return None


def _plan_flex(gm: fx.GraphModule, node: fx.Node, p: Plan, spec: ShardSpec) -> Decision:
    """Flex attention runs Ulysses: each rank attends whole sequences (in global order) with its
    heads, so any block mask and score_mod hold unchanged, given the model's head index where they
    read it. Replicated keys/values are sliced (free), as mods may read key positions."""
    a = attention_args(node)
    q, k, v = a["query"], a["key"], a["value"]
    pq, pk, pv = (p.placements[x] for x in (q, k, v))
    dim = spec.attention_dim
    site = dict(global_query_len=shape(q)[2], placements=f"q={pq} k={pk} v={pv}")
    refusal = None if not (isinstance(pq, Shard) and pq.dim == dim) else unsupported_flex(gm, node, a, spec)
    if not (isinstance(pq, Shard) and pq.dim == dim) or refusal:
        if spec.kind == "seq":
            p.sites[node] = Site("replicated", shape(q)[2], **site)
        return replicated(Call(node), refusal)
    out = [Shard(dim, pq.layout)] + [REPLICATE] * (len(val(node)) - 1)
    others = {x: REPLICATE for x in tensor_inputs(node) if x not in (q, k, v)}  # block mask, the mods' buffers
    if spec.kind == "batch":
        return Decision({**others, q: pq, k: pq, v: pq}, out)
    kv_pl = pk if isinstance(pk, Shard) and pk.dim == 2 and pv == pk else Shard(2, plain(shape(k)[2]))
    p.sites[node] = Site("ulysses", spec.group.local(pq.layout), **site)
    return Decision({**others, q: pq, k: kv_pl, v: kv_pl}, out)


def unsupported_flex(gm: fx.GraphModule, node: fx.Node, a: dict, spec: ShardSpec) -> str | None:
    """Why a flex attention with split queries cannot run Ulysses on this group, or None. Refused,
    never approximated: Ring (flex attention has no log-sum-exp merge here), a mod para cannot read,
    heads that do not split evenly where the mods or the block mask tell heads apart, and in the
    batch group a per-sample block mask or a mod that reads the sample index."""
    for user in node.users:
        if user.target is operator.getitem and user.args[1] != 0 and user.users:
            return "the attention's log-sum-exp is used"
    mods = {which: getattr(gm, a[which].target) if isinstance(a[which], fx.Node) else a[which]
            for which in ("score_mod", "mask_mod")}
    if any(flex_reads(mod, which, "h") is None for which, mod in mods.items()):
        return "flex attention's score_mod or mask_mod is not a graph"
    block_mask = flex_block_mask_tensors(a)
    reads = {index: any(flex_reads(mod, which, index) for which, mod in mods.items()) for index in ("b", "h")}
    q, k = a["query"], a["key"]
    if spec.kind == "batch":
        if reads["b"] or any(shape(t)[0] > 1 for t in block_mask):
            return "flex attention whose mask or score_mod tells samples apart is not split over the batch"
        if shape(k)[0] != shape(q)[0]:
            return "flex attention with keys broadcast over the batch is not split over the batch"
        return None
    info = flex_info(spec.info)
    heads = shape(q)[1]
    # padded heads would have head indices that the mods and the block mask do not know
    if (reads["h"] or any(shape(t)[1] > 1 for t in block_mask)) and heads % info.ulysses:
        return (f"flex attention that tells heads apart needs its {heads} heads divisible by the "
                f"{info.ulysses} ranks of the sequence")
    return None


def flex_info(info: MeshInfo) -> MeshInfo:
    """The mesh as flex attention runs on it: Ulysses over the whole sequence group (the ring's and
    Ulysses' ranks together). It has no Ring schedule here (no log-sum-exp merge of block masks),
    and Ulysses is exact for any block mask and score_mod."""
    return dataclasses.replace(info, ring=1, ulysses=info.seq, ring_rank=0, ulysses_rank=info.seq_rank,
                               ulysses_group=info.seq_group)


def report_plan(gm: fx.GraphModule, p: Plan, report: Report) -> dict[fx.Node, int]:
    """Fallbacks and attention sites from the plan, in graph order; each site's index in the report."""
    indices = {}
    for node in gm.graph.nodes:
        decision = p.decisions.get(node)
        if decision is not None and decision.reason is not None:
            report.fallbacks.append(Fallback(_op_name(node.target), decision.reason, source_line(node), module_path(node)))
        site = p.sites.get(node)
        if site is not None:
            indices[node] = len(report.attention_sites)
            report.attention_sites.append(AttentionSite(
                module=module_path(node), strategy=site.strategy, local_query_len=site.local_query_len,
                global_query_len=site.global_query_len, placements=site.placements,
            ))
    if not p.sites:
        note = _unsplit_attention_note(gm)
        if note:
            report.notes.append(note)
    return indices


def _unsplit_attention_note(gm: fx.GraphModule) -> str | None:
    """Why nothing is split in a graph that computes attention as matmuls and a softmax in a form
    that passes/attention_patterns.py does not rewrite: the split starts at attention ops."""
    if any(family(node.target) == "attention" for node in gm.graph.nodes):
        return None
    softmax = next((node for node in gm.graph.nodes if family(node.target) == "softmax"), None)
    if softmax is None:
        return None
    return (
        f"nothing split: no attention op in this graph, but a softmax at {source_line(softmax)}. An attention "
        "computed as matmuls and a softmax is split only in the forms para rewrites as one attention op "
        "(softmax(q @ k^T * scale + bias, masked_fill of hidden keys) @ v; not with dropout, a tensor scale "
        "or a bias added before the scale); the tokens stay whole on every rank"
    )


# --- emit --------------------------------------------------------------------------------------


class _Emitter:
    """Builds the sharded graph from a plan; decides nothing."""

    def __init__(self, gm: fx.GraphModule, spec: ShardSpec, p: Plan, site_index: dict[fx.Node, int]):
        self.gm, self.spec, self.plan, self.site_index = gm, spec, p, site_index
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.placements: dict[fx.Node, Placement | list] = {}  # of the emitted values, as far as built
        self.moves = Redistributor(spec.group, self.env, self.placements, self._call)

    def _call(self, fn, args, like: fx.Node, kwargs=None) -> fx.Node:
        new = self.graph.call_function(fn, args, kwargs or {})
        new.meta = {k: v for k, v in like.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack")}
        return new

    def run(self) -> fx.GraphModule:
        p = self.plan
        for node in self.gm.graph.nodes:
            if node.op == "output":
                outs = torch.utils._pytree.tree_map(
                    lambda a: self.moves.value(a, REPLICATE, node) if isinstance(a, fx.Node) and a in self.placements
                    else self.env.get(a, a) if isinstance(a, fx.Node) else a,
                    node.args[0],
                )
                self.graph.output(outs)
                continue
            if node.op in ("placeholder", "get_attr"):
                self.env[node] = self.graph.node_copy(node, lambda a: self.env[a])
                self.placements[node] = REPLICATE
            elif node not in p.decisions:  # an item of a multi-output op
                self.env[node] = self._call(operator.getitem, (self.env[node.args[0]], node.args[1]), node)
                self.placements[node] = self.placements[node.args[0]][node.args[1]]
            elif p.sites.get(node) is not None and p.sites[node].strategy in ("ulysses", "ring", "hybrid"):
                self._context_parallel(node, p.decisions[node])
            else:
                self._op(node, p.decisions[node])
            if node in p.starts:  # demanded: split where it appears
                self.moves.full[node] = self.env[node]
                self.env[node] = self.moves.value(node, p.starts[node], node)
                self.placements[node] = p.starts[node]
            mark(self.env[node], para_placement=str(self.placements[node]))
        return fx.GraphModule(self.gm, self.graph)

    def _inputs(self, node: fx.Node, d: Decision) -> dict[fx.Node, fx.Node]:
        return {a: self.moves.value(a, want, node) for a, want in d.inputs.items()}

    def _op(self, node: fx.Node, d: Decision) -> None:
        inputs = self._inputs(node, d)
        target, args, kwargs = localize(node, d, self.spec.group)
        remap = lambda a: inputs[a] if a in inputs else self.env[a]
        args, kwargs = fx.node.map_arg((args, kwargs), remap)
        self.env[node] = self._call(target, args, node, kwargs)
        self.placements[node] = d.out

    def _context_parallel(self, node: fx.Node, d: Decision) -> None:
        if node.target is FLEX_ATTENTION:
            return self._flex_ulysses(node, d)
        a = attention_args(node)
        q, k, mask = a["query"], a["key"], a["mask"]
        inputs = self._inputs(node, d)
        args = [inputs[a["query"]], inputs[a["key"]], inputs[a["value"]], inputs[mask] if mask is not None else None]
        scale = a.get("scale") or shape(q)[-1] ** -0.5
        out = self._call(
            sharded_attention_node,
            tuple(args),
            node,
            dict(info=dataclasses.astuple(self.spec.info), q_layout=d.inputs[q].layout, kv_layout=d.inputs[k].layout,
                 scale=scale, causal=a["is_causal"], ring_kv=self.spec.ring_kv,
                 ring_transport=self.spec.ring_transport),
        )
        mark(out, para_site=self.site_index[node])
        out = self.moves.restride(out, node, node)
        n_out = len(val(node)) if isinstance(val(node), (tuple, list)) else None
        # an attention op that returns a tuple: only its output (item 0) is used
        self.env[node] = self._call(_as_tuple, (out, n_out), node) if n_out else out
        self.placements[node] = d.out

    def _flex_ulysses(self, node: fx.Node, d: Decision) -> None:
        """Sequence to heads, the same flex attention on this rank's heads, heads to sequence. Its
        per-head block mask tensors keep this rank's heads; a mod that reads the head index is given
        the model's (this rank's first head added)."""
        a = attention_args(node)
        q, k, v = a["query"], a["key"], a["value"]
        inputs = self._inputs(node, d)
        whole = flex_info(self.spec.info)
        info = dataclasses.astuple(whole)
        heads = shape(q)[1]
        count = -(-heads // whole.ulysses)
        first = whole.ulysses_rank * count
        layouts = dict(q_layout=d.inputs[q].layout, kv_layout=d.inputs[k].layout)
        moved = self._call(flex_to_heads_node, (inputs[q], inputs[k], inputs[v]), node, dict(info=info, **layouts))
        mark(moved, para_site=self.site_index[node])
        local = [self._call(operator.getitem, (moved, i), node) for i in range(3)]

        def mask_item(x):
            if not (isinstance(x, fx.Node) and x in inputs):
                return self.env[x] if isinstance(x, fx.Node) else x
            return self._call(flex_block_mask_heads, (inputs[x], first, count), node) if shape(x)[1] > 1 else inputs[x]

        block_mask = (*(mask_item(x) for x in a["block_mask"][:-1]), self._mod(a["mask_mod"], "mask_mod", first))
        buffers = [tuple(inputs.get(b, self.env.get(b, b)) if isinstance(b, fx.Node) else b for b in a[name])
                   for name in ("score_mod_other_buffers", "mask_mod_other_buffers")]
        score_mod = self._mod(a["score_mod"], "score_mod", first)
        args = (*local, score_mod, block_mask, a["scale"], a["kernel_options"], *buffers)
        out = self._call(operator.getitem, (self._call(FLEX_ATTENTION, args, node), 0), node)
        out = self._call(flex_to_sequence_node, (out,), node, dict(info=info, q_layout=layouts["q_layout"], heads=heads))
        mark(out, para_site=self.site_index[node])
        out = self.moves.restride(out, node, node)
        self.env[node] = self._call(_as_tuple, (out, len(val(node))), node)
        self.placements[node] = d.out

    def _mod(self, mod: fx.Node, which: str, first: int) -> fx.Node:
        """``mod`` (a get_attr of score_mod or mask_mod) as this rank runs it: reading head ``h + first``."""
        graph_module = getattr(self.gm, mod.target)
        if not first or not flex_reads(graph_module, which, "h"):
            return self.env[mod]
        name = f"{mod.target}_from_head{first}"
        if not hasattr(self.gm, name):
            self.gm.add_submodule(name, with_head_offset(graph_module, FLEX_INDEX[which]["h"], first))
        return self.graph.get_attr(name)


def with_head_offset(mod: fx.GraphModule, position: int, offset: int) -> fx.GraphModule:
    """A copy of ``mod`` that adds ``offset`` to its ``position``-th argument (the head index)
    before any use: a Ulysses rank runs its heads as 0, 1, ..., the mods index the model's."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(mod.graph, {}))
    placeholders = list(graph.find_nodes(op="placeholder"))
    h = placeholders[position]
    with graph.inserting_after(placeholders[-1]):
        shifted = graph.call_function(aten.add.Tensor, (h, offset))
    shifted.meta = dict(h.meta)
    h.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not shifted)
    return fx.GraphModule(mod, graph)


def sharded_attention_node(q, k, v, bias, *, info, q_layout, kv_layout, scale, causal, ring_kv, ring_transport):
    """The graph's call into :func:`sharded_attention` (mesh info travels as a plain tuple)."""
    return sharded_attention(
        q, k, v, MeshInfo(*info), q_layout=q_layout, kv_layout=kv_layout, bias=bias, scale=scale, causal=causal,
        ring_kv=ring_kv, ring_transport=ring_transport,
    )


def flex_to_heads_node(q, k, v, *, info, q_layout, kv_layout):
    """The graph's call into :func:`flex_to_heads` (mesh info travels as a plain tuple)."""
    return flex_to_heads(q, k, v, MeshInfo(*info), q_layout=q_layout, kv_layout=kv_layout)


def flex_to_sequence_node(out, *, info, q_layout, heads):
    """The graph's call into :func:`flex_to_sequence`."""
    return flex_to_sequence(out, MeshInfo(*info), q_layout=q_layout, heads=heads)


def _as_tuple(out, n):
    return (out,) + (None,) * (n - 1)


def _op_name(target) -> str:
    return getattr(target, "__name__", str(target)) if not isinstance(target, torch._ops.OpOverload) else str(target)


def emit(gm: fx.GraphModule, spec: ShardSpec, p: Plan, site_index: dict[fx.Node, int]) -> fx.GraphModule:
    return _Emitter(gm, spec, p, site_index).run()


def shard(gm: fx.GraphModule, spec: ShardSpec, report: Report) -> fx.GraphModule:
    """Split ``gm``'s activations over ``spec.group``; results on every rank are unchanged."""
    p = plan(gm, spec)
    return emit(gm, spec, p, report_plan(gm, p, report))
