"""SARN: contract, masking, invariances, losses and trainability on tiny configurations.

The model computes the relation cube G_ij = R_ij·x_i + x_j only implicitly (linearity, custom
backward passes, an expanded serving graph); `sarn_literal.literal_sarn` is the paper/code
formulas written out with a materialised cube, and every optimised path is checked against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from sarn_literal import literal_sarn

from exporters.layouts.sarn import SARNSlateShared
from models.data.batch import BehaviorBatch
from models.nets.layers import AffineNorm
from models.nets.sarn import SARN, SARNConfig
from models.nets.sarn_ops import pairwise_max_pool, pairwise_relu_dot

torch.set_num_threads(1)

N_ITEMS, N_CATS = 30, 8
SIZES = {"item": N_ITEMS, "category": N_CATS, "user": 10, "context_device": 4}
TINY = SARNConfig(
    embedding_dim=4, relation_width=6, attention_hidden=5, hidden_dims=(7, 3), regression_hidden=3
)


def make_model(seed: int = 0, **overrides: Any) -> SARN:
    torch.manual_seed(seed)
    return SARN(SIZES, dataclasses.replace(TINY, **overrides))


def make_batch(lengths: list[int], history_len: int, seed: int = 0) -> BehaviorBatch:
    """Random rows whose history has the given real lengths, PAD (0) at the end."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    real = torch.arange(history_len)[None, :] < torch.tensor(lengths)[:, None]  # [B, L]

    def ids(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(2, high, shape, generator=g)

    return BehaviorBatch(
        user=ids(10, b),
        hist_items=ids(N_ITEMS, b, history_len) * real,
        hist_cats=ids(N_CATS, b, history_len) * real,
        items=ids(N_ITEMS, b),
        cats=ids(N_CATS, b),
        context=ids(4, b, 1),
        label=torch.randint(0, 2, (b,), generator=g).float(),
        neg_hist_items=ids(N_ITEMS, b, history_len) * real,
        neg_hist_cats=ids(N_CATS, b, history_len) * real,
    )


def with_duplicates(batch: BehaviorBatch) -> BehaviorBatch:
    """Slot 1 repeats slot 0 (item and category) wherever both are real: re-clicks tie cells."""
    items, cats = batch.hist_items.clone(), batch.hist_cats.clone()
    both = (items[:, 0] != 0) & (items[:, 1] != 0)
    items[both, 1], cats[both, 1] = items[both, 0], cats[both, 0]
    return dataclasses.replace(batch, hist_items=items, hist_cats=cats)


def select_rows(batch: BehaviorBatch, index: torch.Tensor) -> BehaviorBatch:
    rows: dict[str, Any] = {
        f.name: (v.index_select(0, index) if v is not None else None)
        for f in dataclasses.fields(batch)
        for v in [getattr(batch, f.name)]
    }
    return BehaviorBatch(**rows)


def total_loss(model: SARN, batch: BehaviorBatch) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.forward_train(batch)
    bce = F.binary_cross_entropy_with_logits(out.logits[:, 0], batch.label)
    return bce + sum(out.aux_losses.values(), torch.zeros(())), bce


# ---------------------------------------------------------------------------------------------
# The optimised model against the literal formulas (sarn_literal.py), with the same weights
# ---------------------------------------------------------------------------------------------


def randomized(model: SARN, seed: int) -> SARN:
    """Every parameter random, biases and Dice/AffineNorm included (the init zeroes biases,
    which would hide a dropped bias term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def perm_for(seed: int, length: int) -> torch.Tensor:
    """The permutation forward_train draws after torch.manual_seed(seed) (its only RNG use)."""
    torch.manual_seed(seed)
    return torch.randperm(length)


MIXED = [6, 3, 0, 6, 1, 5, 0, 2]  # full rows, padded rows, empty histories; history_len 6
CONFIGS = {"tiny": TINY, "paper": SARNConfig()}  # paper dims: D = 36, H = 36, MLP_reg 10


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("duplicates", [False, True])
def test_training_outputs_equal_the_literal_formulas(config: SARNConfig, duplicates: bool) -> None:
    model = randomized(SARN(SIZES, config), seed=0).train()
    batch = make_batch(MIXED, history_len=6, seed=4)
    batch = with_duplicates(batch) if duplicates else batch
    expected = literal_sarn(model, batch, perm_for(9, 6))
    torch.manual_seed(9)
    out = model.forward_train(batch)
    assert torch.allclose(out.logits, expected.logits, atol=1e-5, rtol=0)
    assert out.aux_losses["positional"].item() == pytest.approx(expected.positional.item(), 1e-5)
    assert out.aux_losses["auxiliary"].item() == pytest.approx(expected.auxiliary.item(), 1e-5)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("duplicates", [False, True])
def test_gradients_equal_those_of_the_literal_formulas(
    config: SARNConfig, duplicates: bool
) -> None:
    """The custom backward passes (sarn_ops) give autograd's gradients of the literal model,
    also where duplicate history items tie cells of the max-pooling."""
    model = randomized(SARN(SIZES, config), seed=1).train()
    batch = make_batch(MIXED, history_len=6, seed=5)
    batch = with_duplicates(batch) if duplicates else batch

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, list(model.parameters())))

    expected = literal_sarn(model, batch, perm_for(3, 6))
    bce = F.binary_cross_entropy_with_logits(expected.logits[:, 0], batch.label)
    want = grads(bce + expected.positional + expected.auxiliary)
    torch.manual_seed(3)
    got = grads(total_loss(model, batch)[0])
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_eval_scores_equal_the_literal_formulas(config: SARNConfig) -> None:
    """Pairwise forward, the slate layout (eager: gathered state) and the expanded serving
    formulation that the ONNX export uses, against the literal model, in eval mode."""
    model = randomized(SARN(SIZES, config), seed=2)
    batch = with_duplicates(make_batch(MIXED, history_len=6, seed=6))
    model.train()
    model(batch)  # move Dice's running statistics off their initial values
    model.eval()
    users = make_batch([6, 0, 2, 4], history_len=6, seed=8)
    index = torch.tensor([0, 0, 2, 1, 2, 2, 0, 3])  # ragged: 3, 1, 3 and 1 candidates
    g = torch.Generator().manual_seed(3)
    cand_items = torch.randint(2, N_ITEMS, (8,), generator=g)
    cand_cats = torch.randint(2, N_CATS, (8,), generator=g)
    rows = dataclasses.replace(select_rows(users, index), items=cand_items, cats=cand_cats)
    hist = (users.user, users.hist_items, users.hist_cats, users.context)
    slates = (*hist, cand_items, cand_cats, index)
    with torch.no_grad():
        pairwise = literal_sarn(model, batch, torch.arange(6)).logits
        assert torch.allclose(model(batch), pairwise, atol=1e-5, rtol=0)
        expected = literal_sarn(model, rows, torch.arange(6)).logits
        assert torch.allclose(model.forward_slates(*slates), expected, atol=1e-5, rtol=0)
        # the slate-shared serving layout (cube expanded per user, gathered per candidate)
        shared = SARNSlateShared(model)(*slates)[0]  # pCTR [N]
        assert torch.allclose(shared, torch.sigmoid(expected[:, 0]), atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_onnx_export_matches_torch_with_dynamic_shapes(tmp_path: Path) -> None:
    """The TorchScript exporter (opset 17) on `forward_slates` in eval, traced at one shape and
    run by ONNX Runtime at others (dynamic U, L, N), against the literal model."""

    class Graph(torch.nn.Module):
        def __init__(self, model: SARN) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.model.forward_slates(*inputs)[:, 0])

    model = randomized(make_model(), seed=4).train()
    model(make_batch(MIXED, history_len=6))  # non-trivial Dice running statistics
    graph = Graph(model).eval()  # the exporter restores the wrapper's mode, recursively
    names = ["user", "hist_items", "hist_cats", "context", "cand_items", "cand_cats", "index"]

    def inputs(lengths: list[int], history_len: int, index: list[int], seed: int) -> tuple:
        users = make_batch(lengths, history_len=history_len, seed=seed)
        g = torch.Generator().manual_seed(seed)
        n = len(index)
        cand_items = torch.randint(2, N_ITEMS, (n,), generator=g)
        cand_cats = torch.randint(2, N_CATS, (n,), generator=g)
        hist = (users.user, users.hist_items, users.hist_cats, users.context)
        return (*hist, cand_items, cand_cats, torch.tensor(index))

    path = tmp_path / "sarn.onnx"
    dynamic = {name: {0: "N"} for name in ("cand_items", "cand_cats", "index", "scores")}
    dynamic |= {"user": {0: "U"}, "context": {0: "U"}}
    dynamic |= {"hist_items": {0: "U", 1: "L"}, "hist_cats": {0: "U", 1: "L"}}
    traced = inputs([3, 1, 0], 3, [0, 1, 1, 2, 2], 0)  # U = 3, L = 3, N = 5
    with torch.no_grad():
        torch.onnx.export(
            graph,
            traced,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["scores"],
            dynamic_axes=dynamic,
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    declared = {i.name for i in session.get_inputs()}
    cases = [
        ([7, 0, 4, 7], 7, [3, 0, 0, 2, 1, 0, 3, 3, 3], 1),  # bigger U, L and N
        ([5], 5, [0] * 12, 2),  # one user, one full history, many candidates
        ([0], 1, [0], 3),  # an empty history, L = 1, one candidate
    ]
    for lengths, history_len, index, seed in cases:
        feed = inputs(lengths, history_len, index, seed)
        arrays = {k: v.numpy() for k, v in zip(names, feed, strict=True) if k in declared}
        (onnx_scores,) = session.run(None, arrays)
        users = make_batch(lengths, history_len=history_len, seed=seed)
        rows = dataclasses.replace(select_rows(users, feed[-1]), items=feed[4], cats=feed[5])
        with torch.no_grad():
            expected = torch.sigmoid(
                literal_sarn(model, rows, torch.arange(history_len)).logits[:, 0]
            )
            eager = graph(*feed)
        assert onnx_scores.shape == (len(index),)
        assert np.abs(onnx_scores - expected.numpy()).max() <= 1e-5
        assert np.abs(onnx_scores - eager.numpy()).max() <= 1e-5


@pytest.mark.parametrize("op", ["relu_dot", "max_pool"])
def test_custom_backward_passes_pass_gradcheck(op: str) -> None:
    """Analytic vs finite-difference gradients (float64) of the sarn_ops kernels."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    relation = torch.rand(2, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
    if op == "relu_dot":
        args = (relation, leaf(2, 4, 3), leaf(2, 4, 3), leaf(3))
        assert torch.autograd.gradcheck(pairwise_relu_dot, args)
    else:
        weight = torch.rand(2, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(pairwise_max_pool, (weight, relation, leaf(2, 4, 5)))


# ---------------------------------------------------------------------------------------------
# Contract, masking and invariances
# ---------------------------------------------------------------------------------------------


def test_output_shape_finite_and_probability_range() -> None:
    model = make_model()
    batch = make_batch([5, 3, 0, 1, 5, 2], history_len=5)
    for training in (True, False):
        model.train(training)
        logits = model(batch)
        assert logits.shape == (6, 1)  # one column per task
        assert torch.isfinite(logits).all()
        p = torch.sigmoid(logits)
        assert ((p > 0) & (p < 1)).all()


def test_logit_is_softmax_click_column() -> None:
    """σ(l0 − l1) equals softmax([l0, l1])[0], the code's p_click."""
    model = make_model().eval()
    norm = model.head.net[0]
    assert isinstance(norm, AffineNorm)
    z = torch.randn(4, norm.weight.shape[0])
    two = model.head.net(z)
    assert torch.allclose(torch.sigmoid(model.head(z)), two.softmax(-1)[:, 0], atol=1e-6)


def test_relation_matches_formula() -> None:
    """R_ij = cos(ReLU(W_φ x_i), ReLU(W_ψ x_j)), written out with loops."""
    model = make_model()
    x = torch.randn(2, 3, 8)
    x[1, 2] = 0.0  # a padded slot
    relation = model.relational(x)
    w_phi, w_psi = model.relational.phi.weight, model.relational.psi.weight
    for b in range(2):
        for i in range(3):
            for j in range(3):
                a, c = torch.relu(w_phi @ x[b, i]), torch.relu(w_psi @ x[b, j])
                r = (a @ c) / ((a.norm() + 1e-10) * (c.norm() + 1e-10))
                assert torch.allclose(relation[b, i, j], r, atol=1e-6)
    assert torch.equal(relation[1, :, 2], torch.zeros(3))  # padded j: ψ = 0
    assert torch.equal(relation[1, 2, :], torch.zeros(3))  # padded i: φ = 0


@pytest.mark.parametrize("recent", [0, 2])
def test_appending_padding_changes_no_score(recent: int) -> None:
    """Includes full rows (no padding) and an empty row; eval mode."""
    model = randomized(make_model(recent_items=recent), seed=2).eval()
    batch = make_batch([5, 5, 5, 5, 2, 0, 1], history_len=5, seed=3)
    pad = (0, 3)
    longer = dataclasses.replace(
        batch,
        hist_items=F.pad(batch.hist_items, pad),
        hist_cats=F.pad(batch.hist_cats, pad),
    )
    with torch.no_grad():
        assert torch.allclose(model(batch), model(longer), atol=1e-6)


@pytest.mark.parametrize("positional", [False, True])
def test_score_invariant_to_history_permutation(positional: bool) -> None:
    """Permuting slots permutes the cells (i, j) of R and G and the rows of X; the score
    pools them with max/mean, which ignore order. The positional loss only shapes training,
    it is not part of the score, so the invariance holds either way."""
    model = make_model(positional_loss=positional).eval()
    lengths = [5, 4, 3, 1]
    batch = make_batch(lengths, history_len=6, seed=5)
    items, cats = batch.hist_items.clone(), batch.hist_cats.clone()
    g = torch.Generator().manual_seed(1)
    for row, n in enumerate(lengths):
        perm = torch.randperm(n, generator=g)
        items[row, :n], cats[row, :n] = items[row, perm], cats[row, perm]
    assert not torch.equal(items, batch.hist_items)
    permuted = dataclasses.replace(batch, hist_items=items, hist_cats=cats)
    with torch.no_grad():
        assert torch.allclose(model(batch), model(permuted), atol=1e-5)


def test_recent_items_read_the_order_of_the_last_r_items_only() -> None:
    """With R = 2 the last two slots enter z as they are: reordering the older slots (pooled,
    order-free) changes no score, swapping the two newest does."""
    model = randomized(make_model(recent_items=2), seed=4).eval()
    batch = make_batch([6, 5, 4], history_len=6, seed=6)

    def reordered(order: Callable[[int], list[int]]) -> BehaviorBatch:
        items, cats = batch.hist_items.clone(), batch.hist_cats.clone()
        for row, n in enumerate([6, 5, 4]):
            perm = torch.tensor(order(n))
            items[row, :n], cats[row, :n] = items[row, perm], cats[row, perm]
        return dataclasses.replace(batch, hist_items=items, hist_cats=cats)

    older_reversed = reordered(lambda n: [*range(n - 3, -1, -1), n - 2, n - 1])
    newest_swapped = reordered(lambda n: [*range(n - 2), n - 1, n - 2])
    with torch.no_grad():
        score = model(batch)
        assert torch.allclose(score, model(older_reversed), atol=1e-5)
        assert ((score - model(newest_swapped)).abs() > 1e-4).all()


def test_every_parameter_gets_a_gradient() -> None:
    model = make_model().train()
    batch = make_batch([5, 3, 0, 4, 1, 5, 2, 5], history_len=5)
    out = model.forward_train(batch)
    assert set(out.aux_losses) == {"positional", "auxiliary"}
    loss, _ = total_loss(model, batch)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_positional_loss_matches_hand_computed_value() -> None:
    """With MLP_reg predicting 0 the loss is mean over (b,i,j) of m_i·d(i,j)², d² = |j−i|/L.
    One full row of L = 4: Σ_ij |j−i|/4 = 20/4 = 5 over 16 cells; one empty row adds 0."""
    model = make_model(auxiliary_loss=False, positional_weight=1.0)
    assert model.positional is not None
    for p in model.positional.parameters():
        torch.nn.init.zeros_(p)
    batch = make_batch([4, 0], history_len=4)
    loss = model.forward_train(batch).aux_losses["positional"]
    assert loss.item() == pytest.approx(5.0 / 32.0)


def test_training_lowers_the_loss() -> None:
    """Label = target category appears in the history: learnable from the relations."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 7, (64,), generator=g).tolist()
    batch = make_batch(lengths, history_len=6, seed=11)
    label = (batch.hist_cats == batch.cats[:, None]).any(dim=1).float()
    batch = dataclasses.replace(batch, label=label)
    assert 0.2 < label.mean() < 0.8
    model = make_model(seed=2).train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first_total, first_bce = (v.item() for v in total_loss(model, batch))
    for _ in range(40):
        opt.zero_grad()
        loss, _ = total_loss(model, batch)
        loss.backward()
        opt.step()
    last_total, last_bce = (v.item() for v in total_loss(model, batch))
    assert last_total < 0.8 * first_total
    assert last_bce < 0.7 * first_bce


def test_forward_slates_matches_pairwise_rows() -> None:
    model = make_model().eval()
    users = make_batch([4, 0, 2], history_len=4, seed=7)
    g = torch.Generator().manual_seed(3)
    index = torch.tensor([0, 0, 2, 1, 2, 2, 0])  # ragged: 3, 1 and 3 candidates
    cand_items = torch.randint(2, N_ITEMS, (7,), generator=g)
    cand_cats = torch.randint(2, N_CATS, (7,), generator=g)
    with torch.no_grad():
        slates = model.forward_slates(
            users.user,
            users.hist_items,
            users.hist_cats,
            users.context,
            cand_items,
            cand_cats,
            index,
        )
        rows = dataclasses.replace(select_rows(users, index), items=cand_items, cats=cand_cats)
        pairwise = model(rows)
    assert slates.shape == (7, 1)
    assert torch.allclose(slates, pairwise, atol=1e-6)


def test_eval_score_does_not_depend_on_other_rows() -> None:
    model = make_model()
    batch = make_batch([5, 3, 0, 4, 1, 5], history_len=5)
    model.train()
    for _ in range(3):  # move Dice's running statistics away from their initial values
        model(batch)
    model.eval()
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(select_rows(batch, torch.tensor([r]))) for r in range(6)])
        shuffled = model(select_rows(batch, torch.tensor([5, 4, 3, 2, 1, 0]))).flip(0)
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.allclose(together, shuffled, atol=1e-6)


def test_empty_histories_are_finite_in_train_and_eval() -> None:
    model = make_model().train()
    batch = make_batch([0, 0, 0], history_len=4)
    out = model.forward_train(batch)
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(v) for v in out.aux_losses.values())
    total_loss(model, batch)[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    assert torch.isfinite(model(batch)).all()


def test_auxiliary_losses_can_be_switched_off() -> None:
    batch = make_batch([3, 2], history_len=3)
    off = make_model(positional_loss=False, auxiliary_loss=False).train()
    assert off.forward_train(batch).aux_losses == {}
    assert not any(n.startswith(("positional", "auxiliary")) for n, _ in off.named_parameters())
    only_pos = make_model(auxiliary_loss=False).train()
    assert set(only_pos.forward_train(batch).aux_losses) == {"positional"}
    no_negatives = dataclasses.replace(batch, neg_hist_items=None, neg_hist_cats=None)
    assert set(make_model().forward_train(no_negatives).aux_losses) == {"positional"}


def test_no_context_fields() -> None:
    sizes = {k: v for k, v in SIZES.items() if not k.startswith("context_")}
    torch.manual_seed(0)
    model = SARN(sizes, TINY).eval()
    batch = dataclasses.replace(make_batch([3, 0], history_len=3), context=torch.zeros(2, 0).long())
    assert torch.isfinite(model(batch)).all()
