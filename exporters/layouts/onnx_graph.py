"""Graph surgery for the serving layouts: a small `onnx.helper` builder, swapping one named
node of an exported graph for a subgraph, and running a one-user graph in a Loop over users.

Why surgery and not tracing: a traced PyTorch module cannot produce an ONNX `Loop` whose body
reads a user's tensors in place (scripted loops are a deprecated path, `torch.cond`/scan
lowering is not up to it). So a serving module marks its per-candidate core with ONE
placeholder node (an `autograd.Function` with a `symbolic`), the exporter writes that graph,
and `replace_node` swaps the node for standard ops. Surgery on one named node is stable across
torch versions; pattern-matching whole exported graphs, whose node names change with the
exporter, would not be.

ONNX Runtime facts the transforms rely on (measured, docs/export.md):
* a Loop body reads outer-scope tensors in place; every Gather/Slice inside a body copies;
* scan outputs are stacked, so every iteration must produce the same shape (equal chunks);
* a Loop with 0 trips cannot know its scan-output shape: force at least one trip, or carry
  the outputs instead of scanning them;
* a subgraph value may not shadow an outer name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CANDIDATE_INPUTS = ("cand_items", "cand_cats", "cand_user_index")
USER_INPUTS = ("user", "hist_items", "hist_cats", "context")
_ids = itertools.count()


class GraphBuilder:
    """Collects the nodes of one graph or Loop body; every value gets a fresh unique name."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(_ids)}"

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | None = None,
        hint: str | None = None,
        **attrs: Any,
    ) -> str:
        """Adds one node; returns its (first) output name."""
        outs = list(outputs) if outputs is not None else [self.fresh(hint or op_type)]
        node = helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs)
        self.nodes.append(node)
        return outs[0]

    def const(self, value: np.ndarray) -> str:
        """A Constant node (legal inside Loop bodies, unlike graph initializers)."""
        out = self.fresh("const")
        self.op("Constant", [], [out], value=numpy_helper.from_array(value, out))
        return out

    def i64(self, *values: int) -> str:
        """A 1-D int64 constant (axes, shapes, pads)."""
        return self.const(np.array(values, dtype=np.int64))

    def scalar(self, value: int) -> str:
        """A 0-D int64 constant."""
        return self.const(np.array(value, dtype=np.int64))

    def dim(self, tensor: str, axis: int) -> str:
        """A 0-D int64: the size of `tensor` along `axis`."""
        return self.op("Gather", [self.op("Shape", [tensor]), self.scalar(axis)], axis=0)


def value_info(name: str, elem: int = TensorProto.FLOAT, rank: int | None = None) -> Any:
    """A graph input/output declaration of unknown dims (rank None: unknown rank)."""
    return helper.make_tensor_value_info(name, elem, None if rank is None else [None] * rank)


def loop_body(
    builder: GraphBuilder,
    counter: str,
    carried: Sequence[Any],
    outputs: Sequence[Any],
) -> onnx.GraphProto:
    """A Loop body graph: inputs (iteration, condition, *carried), outputs (condition, ...).

    The condition is passed through unchanged: these Loops run a fixed trip count."""
    cond_in, cond_out = builder.fresh("cond_in"), builder.fresh("cond_out")
    builder.op("Identity", [cond_in], [cond_out])
    return helper.make_graph(
        builder.nodes,
        builder.prefix,
        [
            value_info(counter, TensorProto.INT64, 0),
            value_info(cond_in, TensorProto.BOOL, 0),
            *carried,
        ],
        [value_info(cond_out, TensorProto.BOOL, 0), *outputs],
    )


def replace_node(
    model: onnx.ModelProto,
    op_type: str,
    build: Callable[[GraphBuilder, list[str], list[str]], None],
) -> onnx.ModelProto:
    """A copy of `model` where its single `op_type` node is replaced by what
    `build(builder, node_inputs, node_outputs)` adds (which must write the node's output
    names). Custom opset imports no longer used are dropped."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    where = [i for i, node in enumerate(graph.node) if node.op_type == op_type]
    if len(where) != 1:
        raise ValueError(f"expected one {op_type} node, found {len(where)}")
    node = graph.node[where[0]]
    builder = GraphBuilder(op_type)
    build(builder, list(node.input), list(node.output))
    nodes = [*graph.node[: where[0]], *builder.nodes, *graph.node[where[0] + 1 :]]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {n.domain for n in graph.node}
    keep = [o for o in out.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def _rename_into(
    body: GraphBuilder, nodes: Sequence[onnx.NodeProto], rename: dict[str, str]
) -> None:
    """Copies `nodes` into `body`, their inputs and outputs renamed by `rename`."""
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for k, name in enumerate(copy.input):
            copy.input[k] = rename.get(name, name)
        for k, name in enumerate(copy.output):
            copy.output[k] = rename.get(name, name)
        body.nodes.append(copy)


def per_user_loop(model: onnx.ModelProto) -> onnx.ModelProto:
    """The CPU form of a graph written for ONE user per call (its user-side tensors [1, ...]
    broadcast against the candidates, never gathered per candidate): a Loop over the users
    that have candidates (`Unique(cand_user_index)`, so no iteration is empty) runs the whole
    graph on user u's inputs ([1, ...] slices) and its candidates, and scatters the scores
    back to candidate order. Any order of `cand_user_index` works; a user without candidates
    costs nothing."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = {i.name for i in g.input}
    users = [n for n in USER_INPUTS if n in names]
    cand = [n for n in CANDIDATE_INPUTS if n in names and n != "cand_user_index"]
    outs = [o.name for o in g.output]
    b = GraphBuilder("users")
    present = b.op("Unique", ["cand_user_index"], sorted=1)  # [U'] users with candidates
    width = b.op("Shape", ["cand_user_index"])  # [1] = N
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    acc0 = [b.op("ConstantOfShape", [width], value=zero) for _ in outs]  # [N] each

    body = GraphBuilder("users/body")
    k = body.fresh("k")
    acc = [body.fresh("acc") for _ in outs]
    u = body.op("Gather", [present, k], axis=0)  # 0-D user index
    mine = body.op(
        "Reshape", [body.op("NonZero", [body.op("Equal", ["cand_user_index", u])]), body.i64(-1)]
    )  # [M ≥ 1]
    rename = {
        n: body.op("Gather", [n, body.op("Unsqueeze", [u, body.i64(0)])], axis=0, hint=n)
        for n in users
    }  # [1, ...]: one slice per user, not per candidate
    rename.update({n: body.op("Gather", [n, mine], axis=0, hint=n) for n in cand})  # [M]
    rename["cand_user_index"] = body.op("Mul", [mine, body.scalar(0)])  # [M] zeros: user 0
    rename.update({o: f"{o}/user" for o in outs})  # no body name may shadow an outer one
    _rename_into(body, list(g.node), rename)
    where = body.op("Unsqueeze", [mine, body.i64(1)])  # [M, 1]
    acc_out = [
        body.op("ScatterND", [a, where, f"{o}/user"]) for a, o in zip(acc, outs, strict=True)
    ]
    graph = loop_body(
        body,
        k,
        [value_info(a, rank=1) for a in acc],
        [value_info(a, rank=1) for a in acc_out],
    )
    trips = b.dim(present, 0)
    b.op("Loop", [trips, "", *acc0], outs, body=graph)
    del g.node[:]
    g.node.extend(b.nodes)
    del g.value_info[:]
    return out
