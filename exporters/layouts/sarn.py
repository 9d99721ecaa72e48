"""SARN's serving layouts: the per-candidate gate and max-pool run over each user's tensors in
cache, never over a per-candidate copy of them (DESIGN.md, "Slate-shared user side").

Notation: U users, N candidates, L history slots, D = 36 (item ⊕ category), H = 36 (gate
hidden), m_i the history mask, u(n) candidate n's user. Per user: x [L, D] (masked), the
relation R_ij = φ(x_i)·ψ(x_j) [L, L] and P = W1_G x [L, H]; per candidate q_n = W1_t t_n + b1.
The only per-(candidate, i, j) work is

    a_nij = σ(w2 · ReLU(R_ij P_i + P_j + q_n) + b2)
    u_n   = max(0, max_ij a_nij · m_i · (R_ij x_i + x_j))                             [D]

`SARNServing` computes everything else with the model's own modules and routes only this core
through one placeholder node, `slatectr::SarnAttentivePool(x, R, P, m, q, w2, b2,
cand_user_index) -> u [N, D]`, which eager torch evaluates with the model's own kernels
(`sarn_ops`), so the module is checked against the model. The node then becomes:

* `cpu-fused`: kept; the C kernel (runtime/ortops/src/sarn_pool_impl.h) puts 16 candidates of
  one user in the SIMD lanes and builds each history row's [L, H] and [L, D] cells once for
  them, in L1. Nothing of size L² is ever stored.
* `cpu-loop` (`build_loop`, standard ONNX): a Loop over users, and inside it a Loop over chunks
  of that user's candidates whose [c, H, L²] intermediates stay in L2; the bodies read the
  user's A = R P + P and masked cube Gm (channels first, [H|D, L²]) in place.
* `batched` (`build_batched`, standard ONNX, no control flow: the GPU layout): A and Gm
  gathered per candidate and every candidate's planes computed at once.

Both standard forms use Σ_k w2_k ReLU(a_k + q_k) = w2·max(a, −q) + w2·q, which saves one
full-size pass. `SARNSlateShared` is the graph exported before these layouts (each user's
cube and gate pre-activations expanded, then gathered per candidate): the reference layout of
`ctr bench export`.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import Tensor

from exporters.layouts.onnx_graph import GraphBuilder, loop_body, replace_node, value_info
from exporters.layouts.placeholder import placeholder
from exporters.onnx_export import SlateInputs, SlateScoringGraph
from models.nets.sarn import SARN
from models.nets.sarn_ops import pairwise_channels_first, pairwise_max_pool, pairwise_relu_dot

OP = "SarnAttentivePool"
# Inner chunk of the Loop layout: c = clamp(CELLS // L², 1, 8) candidates, so one pass over
# [c, H, L²] floats stays near 1.4 MB whatever L is (computed in the graph from L).
CELLS = 10_000
MAX_CHUNK = 8


def reference_pool(
    x: Tensor,
    rel: Tensor,
    proj: Tensor,
    mask: Tensor,
    q: Tensor,
    w2: Tensor,
    b2: Tensor,
    idx: Tensor,
) -> Tensor:
    """The placeholder's meaning, with the model's own kernels on per-candidate copies."""
    r, p, xm, m = (t.index_select(0, idx) for t in (rel, proj, x, mask))
    logit = pairwise_relu_dot(r, p, p + q[:, None, :], w2) + b2  # [N, L, L]
    weight = torch.sigmoid(logit) * m[:, :, None]  # [N, L, L] a_ij·m_i
    return pairwise_max_pool(weight, r, xm).clamp_min(0.0)  # [N, D]


_sarn_pool = placeholder(OP, reference_pool, like=4)  # [N, D] float, like q


class SARNServing(SlateScoringGraph):
    """A trained SARN (weights shared, not copied) with its per-candidate core as one node."""

    model: SARN

    def logits(self, x: SlateInputs) -> Tensor:
        m, idx = self.model, x.cand_user_index
        s = m.encode_user(x.user, x.hist_items, x.hist_cats, x.context)
        t = m._embed(x.cand_items, x.cand_cats)  # [N, D]
        gate = m.gate
        q = F.linear(t, gate.hidden.weight[:, : gate.dim], gate.hidden.bias)  # [N, H]
        pool_args = (s.x, s.relation, s.gate_proj, s.mask, q, gate.out.weight[0], gate.out.bias)
        u = _sarn_pool(*pool_args, idx)  # [N, D]
        return m.output_for(s, idx, t, u)


class SARNSlateShared(SlateScoringGraph):
    """The reference layout: each user's cube G and gate pre-activations W1_G G + b1 expanded
    once, channels first, and gathered per candidate ([N, H + D, L, L] per call)."""

    model: SARN

    def logits(self, x: SlateInputs) -> Tensor:
        m, idx = self.model, x.cand_user_index
        s = m.encode_user(x.user, x.hist_items, x.hist_cats, x.context)
        cube = pairwise_channels_first(s.relation, s.x, s.x)  # [U, D, L, L]
        gate_pre = m.gate.user_part(s.relation, s.gate_proj)  # [U, H, L, L]
        t = m._embed(x.cand_items, x.cand_cats)  # [N, D]
        gate = m.gate.from_user_part(gate_pre.index_select(0, idx), t)  # [N, L, L]
        mask = s.mask.index_select(0, idx)  # [N, L]
        weight = (gate * mask[:, :, None]).unsqueeze(1)  # [N, 1, L, L] a_ij·m_i
        cells = weight * cube.index_select(0, idx)  # [N, D, L, L]
        u = cells.amax(dim=(2, 3)).clamp_min(0.0)  # [N, D]
        return m.output_for(s, idx, t, u)


# ------------------------------------------------------------------ standard-ONNX forms
def _user_planes(b: GraphBuilder, x: str, rel: str, proj: str, mask: str) -> tuple[str, str]:
    """Per user, channels first: A[u,k,ij] = R_ij P_ik + P_jk [U, H, L²] and the masked
    cube Gm[u,d,ij] = m_i (R_ij x_id + x_jd) [U, D, L²]."""
    rel4 = b.op("Unsqueeze", [rel, b.i64(1)])  # [U, 1, L, L]

    def planes(v: str) -> str:  # [U, L, K] -> R_ij v_ik + v_jk [U, K, L, L]
        vt = b.op("Transpose", [v], perm=[0, 2, 1])  # [U, K, L]
        source = b.op("Unsqueeze", [vt, b.i64(3)])  # [U, K, L, 1]
        return b.op("Add", [b.op("Mul", [rel4, source]), b.op("Unsqueeze", [vt, b.i64(2)])])

    a = planes(proj)  # [U, H, L, L]
    gm = b.op("Mul", [planes(x), b.op("Unsqueeze", [mask, b.i64(1, 3)])])  # [U, D, L, L]
    flat = b.i64(0, 0, -1)
    return b.op("Reshape", [a, flat]), b.op("Reshape", [gm, flat])


def _candidate_terms(b: GraphBuilder, q: str, w2: str, b2: str) -> tuple[str, str]:
    """−q [N, H, 1] and the logit offset s = w2·q + b2 [N, 1, 1] (the ReLU identity)."""
    neg_q = b.op("Neg", [b.op("Unsqueeze", [q, b.i64(2)])])  # [N, H, 1]
    s = b.op("Add", [b.op("MatMul", [q, w2]), b2])  # [N]
    return neg_q, b.op("Unsqueeze", [s, b.i64(1, 2)])  # [N, 1, 1]


def _gate_pool(b: GraphBuilder, a: str, gm: str, neg_q: str, s: str, w2row: str) -> str:
    """a [.., H, L²], gm [.., D, L²], −q [c, H, 1], s [c, 1, 1] -> pooled cells [c, D]."""
    hidden = b.op("Max", [a, neg_q])  # [c, H, L²] = ReLU(a + q) − q
    logit = b.op("Add", [b.op("MatMul", [w2row, hidden]), s])  # [c, 1, L²]
    cells = b.op("Mul", [gm, b.op("Sigmoid", [logit])])  # [c, D, L²]
    return b.op("ReduceMax", [cells], axes=[2], keepdims=0)  # [c, D]


def build_batched(b: GraphBuilder, ins: list[str], outs: list[str]) -> None:
    """GPU layout: every candidate at once over its user's gathered planes [N, H|D, L²]. No
    control flow at all (no If, no Loop): CUDA graphs refuse it, and the fp16 converter
    misplaces the Casts of If branches."""
    x, rel, proj, mask, q, w2, b2, idx = ins
    a, gm = _user_planes(b, x, rel, proj, mask)
    neg_q, s = _candidate_terms(b, q, w2, b2)
    w2row = b.op("Unsqueeze", [w2, b.i64(0)])  # [1, H]
    a_n = b.op("Gather", [a, idx], axis=0)  # [N, H, L²]
    gm_n = b.op("Gather", [gm, idx], axis=0)  # [N, D, L²]
    b.op("Relu", [_gate_pool(b, a_n, gm_n, neg_q, s, w2row)], outs)  # [N, D]


def _chunk_size(b: GraphBuilder, x: str) -> str:
    """c = clamp(CELLS // L², 1, MAX_CHUNK), a 0-D int64 computed from L at run time."""
    length = b.dim(x, 1)
    cells = b.op("Div", [b.scalar(CELLS), b.op("Mul", [length, length])])
    return b.op("Max", [b.op("Min", [cells, b.scalar(MAX_CHUNK)]), b.scalar(1)])


def build_loop(b: GraphBuilder, ins: list[str], outs: list[str]) -> None:
    """CPU layout: a Loop over users; per user, its candidates (NonZero(idx == u)) in chunks
    of c, an inner Loop reading that user's A and Gm in place. Results return to candidate
    order by ScatterND, so any order of cand_user_index and users without candidates work."""
    x, rel, proj, mask, q, w2, b2, idx = ins
    a, gm = _user_planes(b, x, rel, proj, mask)
    neg_q, s = _candidate_terms(b, q, w2, b2)
    w2row = b.op("Unsqueeze", [w2, b.i64(0)])  # [1, H]
    c = _chunk_size(b, x)
    width = b.op(
        "Concat", [b.op("Shape", [idx]), b.op("Unsqueeze", [b.dim(x, 2), b.i64(0)])], axis=0
    )
    zeros = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    acc0 = b.op("ConstantOfShape", [width], value=zeros)  # [N, D]

    ub = GraphBuilder(f"{OP}/user")  # ---- outer body: user u
    u, acc = ub.fresh("u"), ub.fresh("acc")
    mine = ub.op("Reshape", [ub.op("NonZero", [ub.op("Equal", [idx, u])]), ub.i64(-1)])  # [M]
    a_u = ub.op("Gather", [a, u], axis=0)  # [H, L²] (one copy per user, not per candidate)
    gm_u = ub.op("Gather", [gm, u], axis=0)  # [D, L²]
    count = ub.dim(mine, 0)  # M, 0 for a user without candidates
    one = ub.scalar(1)
    trips = ub.op("Max", [ub.op("Div", [ub.op("Sub", [ub.op("Add", [count, c]), one]), c]), one])
    pad = ub.op("Unsqueeze", [ub.op("Sub", [ub.op("Mul", [trips, c]), count]), ub.i64(0)])
    pads = ub.op("Concat", [ub.i64(0, 0, 0), pad, ub.i64(0, 0)], axis=0)
    q_u = ub.op("Pad", [ub.op("Gather", [neg_q, mine], axis=0), pads])  # [T·c, H, 1]
    s_u = ub.op("Pad", [ub.op("Gather", [s, mine], axis=0), pads])  # [T·c, 1, 1]

    cb = GraphBuilder(f"{OP}/chunk")  # ---- inner body: chunk k of user u's candidates
    k = cb.fresh("k")
    c1 = cb.op("Unsqueeze", [c, cb.i64(0)])
    start = cb.op("Mul", [cb.op("Unsqueeze", [k, cb.i64(0)]), c1])
    stop = cb.op("Add", [start, c1])
    q_c = cb.op("Slice", [q_u, start, stop, cb.i64(0)])  # [c, H, 1]
    s_c = cb.op("Slice", [s_u, start, stop, cb.i64(0)])  # [c, 1, 1]
    pooled = _gate_pool(cb, a_u, gm_u, q_c, s_c, w2row)  # [c, D]
    chunk_body = loop_body(cb, k, [], [value_info(pooled, rank=2)])

    stacked = ub.op("Loop", [trips, ""], body=chunk_body)  # [T, c, D]
    d = ub.op("Unsqueeze", [ub.dim(x, 2), ub.i64(0)])
    flat = ub.op("Reshape", [stacked, ub.op("Concat", [ub.i64(-1), d], axis=0)])  # [T·c, D]
    mine_u = ub.op("Slice", [flat, ub.i64(0), ub.op("Unsqueeze", [count, ub.i64(0)]), ub.i64(0)])
    acc_out = ub.op("ScatterND", [acc, ub.op("Unsqueeze", [mine, ub.i64(1)]), mine_u])
    user_body = loop_body(ub, u, [value_info(acc, rank=2)], [value_info(acc_out, rank=2)])

    final = b.op("Loop", [b.dim(x, 0), "", acc0], body=user_body)  # [N, D]
    b.op("Relu", [final], outs)


def standard_form(placeholder: onnx.ModelProto, build: Any) -> onnx.ModelProto:
    """The placeholder graph with its custom node replaced by `build_loop`/`build_batched`."""
    model = replace_node(placeholder, OP, build)
    onnx.checker.check_model(model, full_check=True)
    return model


__all__ = ["SARNServing", "SARNSlateShared", "build_batched", "build_loop", "standard_form"]
