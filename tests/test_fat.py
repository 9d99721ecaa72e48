"""FAT (models/nets/fat.py, models/nets/hypernet.py): contract, invariances, gradients,
materialisation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from models.data.batch import BehaviorBatch
from models.nets.fat import (
    FAT,
    FATConfig,
    FieldAttention,
    NextClickAuxiliary,
    TargetAttentionPool,
    recency_rank,
)
from models.nets.hypernet import BasisBank, BasisHypernetwork
from models.nets.layers import last_slots
from runtime.features import PAD

torch.set_num_threads(1)

SIZES = {"item": 40, "category": 8, "user": 12, "context_device": 3, "context_hour": 5}
ATOL = 1e-6


def tiny(**overrides: Any) -> FATConfig:
    base: dict[str, Any] = dict(
        d=8,
        heads=2,
        layers=2,
        d_ff=16,
        num_bases=4,
        meta_dim=4,
        top_k=2,
        attention_hidden=8,
        tower_hidden=8,
    )
    return FATConfig(**{**base, **overrides})


CONFIGS = {
    "mean": tiny(history_pooling="mean"),
    "target_attention": tiny(history_pooling="target_attention"),
    "mean+recent": tiny(history_pooling="mean", recent_tokens=2),
    "target_attention+recent": tiny(history_pooling="target_attention", recent_tokens=2),
    "double_residual": tiny(residual="double"),
    "target_attention+recency": tiny(history_pooling="target_attention", history_recency=3),
}


def attentions(model: FAT) -> list[FieldAttention]:
    """One per layer, in layer order (modules() follows registration order)."""
    return [m for m in model.modules() if isinstance(m, FieldAttention)]


def banks(model: FAT) -> dict[str, BasisBank]:
    """Every basis bank by its module path, e.g. `field_weights.0.banks.q`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BasisBank)}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model(request: pytest.FixtureRequest) -> FAT:
    torch.manual_seed(0)
    m = FAT(SIZES, CONFIGS[request.param])
    # Spread the pair weights and bases so attention is far from uniform and field weights
    # differ: the invariance tests would hold trivially for a near-constant model.
    with torch.no_grad():
        for attention in attentions(m):
            attention.pair.normal_(0.0, 1.0)
        for bank in banks(m).values():
            bank.bases.normal_(0.0, 0.3)
    return m.eval()


def make_batch(rows: int = 6, length: int = 5, seed: int = 1) -> BehaviorBatch:
    """Histories of lengths 0, 1, ..., padded at the end; row 0 is empty."""
    g = torch.Generator().manual_seed(seed)
    hist_items = torch.randint(2, SIZES["item"], (rows, length), generator=g)
    lengths = torch.arange(rows) % (length + 1)
    hist_items[torch.arange(length)[None, :] >= lengths[:, None]] = PAD
    hist_cats = torch.randint(2, SIZES["category"], (rows, length), generator=g)
    hist_cats[hist_items == PAD] = PAD
    context = torch.stack(
        [torch.randint(0, n, (rows,), generator=g) for k, n in SIZES.items() if "context_" in k],
        dim=1,
    )  # [rows, C], columns in the order of the `context_*` keys
    return BehaviorBatch(
        user=torch.randint(2, SIZES["user"], (rows,), generator=g),
        hist_items=hist_items,
        hist_cats=hist_cats,
        items=torch.randint(2, SIZES["item"], (rows,), generator=g),
        cats=torch.randint(2, SIZES["category"], (rows,), generator=g),
        context=context,
        label=torch.randint(0, 2, (rows,), generator=g).float(),
    )


def rows_of(batch: BehaviorBatch, index: Tensor) -> BehaviorBatch:
    return BehaviorBatch(
        user=batch.user[index],
        hist_items=batch.hist_items[index],
        hist_cats=batch.hist_cats[index],
        items=batch.items[index],
        cats=batch.cats[index],
        context=batch.context[index],
        label=batch.label[index],
    )


def test_shape_finiteness_and_probability_range(model: FAT) -> None:
    batch = make_batch()
    assert int((batch.hist_items[0] != PAD).sum()) == 0  # the empty history is covered
    logits = model(batch)
    assert logits.shape == (len(batch), 1)  # one column per task
    assert torch.isfinite(logits).all()
    probs = torch.sigmoid(logits)
    assert ((probs > 0) & (probs < 1)).all()


def test_appending_padding_changes_no_score(model: FAT) -> None:
    batch = make_batch()
    padded = rows_of(batch, torch.arange(len(batch)))
    extra = torch.full((len(batch), 4), PAD)
    padded.hist_items = torch.cat([batch.hist_items, extra], dim=1)
    padded.hist_cats = torch.cat([batch.hist_cats, extra], dim=1)
    torch.testing.assert_close(model(padded), model(batch), atol=ATOL, rtol=0)
    # ...while a real history item does change the score (the check above is not vacuous).
    changed = rows_of(batch, torch.arange(len(batch)))
    changed.hist_items = batch.hist_items.clone()
    changed.hist_items[5, 0] = 3 if int(batch.hist_items[5, 0]) != 3 else 4
    assert (model(changed)[5] - model(batch)[5]).abs() > 1e-5


def test_eval_scores_do_not_depend_on_the_rest_of_the_batch(model: FAT) -> None:
    batch = make_batch()
    together = model(batch)
    for r in range(len(batch)):
        alone = model(rows_of(batch, torch.tensor([r])))
        torch.testing.assert_close(alone, together[r : r + 1], atol=ATOL, rtol=0)
    other = make_batch(seed=7)
    mixed = rows_of(batch, torch.tensor([2]))
    for name in ("user", "hist_items", "hist_cats", "items", "cats", "context"):
        setattr(mixed, name, torch.cat([getattr(other, name), getattr(mixed, name)]))
    torch.testing.assert_close(model(mixed)[-1], together[2], atol=ATOL, rtol=0)


def test_forward_slates_with_ragged_users_equals_pairwise_forward(model: FAT) -> None:
    users = make_batch(rows=4)
    cand_user_index = torch.tensor([0, 0, 0, 2, 3, 3])  # user 1 has no candidate
    g = torch.Generator().manual_seed(3)
    cand_items = torch.randint(2, SIZES["item"], (6,), generator=g)
    cand_cats = torch.randint(2, SIZES["category"], (6,), generator=g)
    slates = model.forward_slates(
        users.user,
        users.hist_items,
        users.hist_cats,
        users.context,
        cand_items,
        cand_cats,
        cand_user_index,
    )
    pairwise = rows_of(users, cand_user_index)
    pairwise.items, pairwise.cats = cand_items, cand_cats
    torch.testing.assert_close(slates, model(pairwise), atol=ATOL, rtol=0)


def test_materialized_model_matches_and_runs_no_topk(
    model: FAT, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = make_batch()
    expected = model(batch)
    frozen = model.materialized()
    assert frozen.is_materialized and not model.is_materialized
    assert not frozen.training
    assert not any(isinstance(m, BasisHypernetwork) for m in frozen.modules())

    def no_topk(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the materialised model must not route")

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "topk", no_topk)
        patch.setattr(torch, "topk", no_topk)
        got = frozen(batch)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # The frozen weights are constants: changing the original's bases moves only the original.
    with torch.no_grad():
        for bank in banks(model).values():
            bank.bases.mul_(2.0)
    torch.testing.assert_close(frozen(batch), got, atol=0, rtol=0)
    assert (model(batch) - expected).abs().max() > 1e-4


def test_every_parameter_gets_a_gradient_and_routing_gates_the_bases() -> None:
    """Top-K routing: only bases some field selects (and their router rows) get a gradient.

    Unselected bases and router rows get exactly zero; that is the MoE behaviour the paper
    describes, not a bug, so it is asserted rather than hidden. With 7 fields and K=2 at most
    14 of M=24 bases are selected, so every bank has unselected bases to check.
    """
    torch.manual_seed(0)
    cfg = tiny(num_bases=24, top_k=2, history_pooling="target_attention", recent_tokens=1)
    model = FAT(SIZES, cfg).train()
    batch = make_batch(rows=8)
    loss = nn.functional.binary_cross_entropy_with_logits(model(batch)[:, 0], batch.label)
    loss.backward()

    all_banks = banks(model)
    assert len(all_banks) == 5 * cfg.layers
    for bank in all_banks.values():
        chosen = bank.selected(model.meta)  # [M]
        assert bool(chosen.any()) and not bool(chosen.all())
        assert bank.bases.grad is not None and bank.router.weight.grad is not None
        per_basis = bank.bases.grad.flatten(1).abs().sum(dim=1)  # [M]
        per_row = bank.router.weight.grad.abs().sum(dim=1)  # [M]
        assert (per_basis[chosen] > 0).all() and (per_basis[~chosen] == 0).all()
        assert (per_row[chosen] > 0).all() and (per_row[~chosen] == 0).all()
    bank_params = {f"{name}.{p}" for name in all_banks for p in ("bases", "router.weight")}

    for name, param in model.named_parameters():
        if name in bank_params:
            continue
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_top_k_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="top_k"):
        FAT(SIZES, tiny(top_k=1))


def test_short_training_lowers_the_loss() -> None:
    """Rule: click iff the target's category occurs in the history (needs history x target)."""
    torch.manual_seed(0)
    batch = make_batch(rows=256, length=6, seed=11)
    in_history = (batch.hist_cats == batch.cats[:, None]).any(dim=1)
    batch.label = in_history.float()
    model = FAT(SIZES, tiny(history_pooling="target_attention"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            value = nn.functional.binary_cross_entropy_with_logits(model(batch)[:, 0], batch.label)
        model.train()
        return float(value)

    before = loss_now()
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch)[:, 0], batch.label)
        loss.backward()
        optimizer.step()
    after = loss_now()
    assert after < 0.7 * before, (before, after)


def _attention_inputs(model: FAT, batch: BehaviorBatch) -> list[tuple[Tensor, ...]]:
    """What each layer's FieldAttention received on a forward pass of `batch`."""
    seen: list[tuple[Tensor, ...]] = []
    hooks = [
        attention.register_forward_pre_hook(lambda _m, args: seen.append(args))
        for attention in attentions(model)
    ]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    return seen


def test_pair_modulation_zero_makes_attention_uniform(model: FAT) -> None:
    batch = make_batch()
    fields = len(model.field_names)
    logits_modulated = model(batch)
    layers = attentions(model)
    for attention, (h, wq, wk, _) in zip(layers, _attention_inputs(model, batch), strict=True):
        assert (attention.probs(h, wq, wk) - 1 / fields).abs().max() > 1e-2
    with torch.no_grad():
        for attention in layers:
            attention.pair.zero_()
    for attention, (h, wq, wk, wv) in zip(layers, _attention_inputs(model, batch), strict=True):
        probs = attention.probs(h, wq, wk)  # [B, H, F, F]
        torch.testing.assert_close(probs, torch.full_like(probs, 1 / fields), atol=ATOL, rtol=0)
        # The forward path agrees: every field's output is the mean of the values.
        out = attention(h, wq, wk, wv)  # [B, F, d]
        values = torch.matmul(h.transpose(0, 1), wv).transpose(0, 1)  # [B, F, d]
        expected = values.mean(dim=1, keepdim=True).expand_as(out)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (model(batch) - logits_modulated).abs().max() > 1e-4


def test_target_attention_pool_weights_real_slots_only() -> None:
    torch.manual_seed(0)
    pool = TargetAttentionPool(d=4, hidden=8)
    hist = torch.randn(3, 5, 4)
    mask = torch.tensor([[0.0] * 5, [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = pool(torch.randn(3, 4), hist, mask)
    torch.testing.assert_close(out[0], torch.zeros(4))  # empty history: zero, not NaN
    torch.testing.assert_close(out[1], hist[1, 0])  # a single real slot takes all the weight
    # With three real slots the result is a convex combination of exactly those slots.
    solution = torch.linalg.lstsq(hist[2, :3].T, out[2].unsqueeze(-1)).solution.squeeze(-1)
    assert (solution > 0).all() and abs(float(solution.sum()) - 1) < 1e-4


def test_last_slots_are_the_last_real_items_oldest_first() -> None:
    hist = torch.arange(5.0)[None, :, None].expand(3, 5, 8)  # slot s holds the value s
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0.0] * 5])
    recent = last_slots(hist, mask, 2)[..., 0]  # [3, R]
    expected = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])  # missing slots are zero
    torch.testing.assert_close(recent, expected)
    hist = hist + 10  # distinguish slot 0 (value 10) from a missing slot (0)
    torch.testing.assert_close(last_slots(hist, mask, 2)[1, :, 0], torch.tensor([0.0, 10.0]))


def test_recency_rank_counts_the_real_items_after_each_slot() -> None:
    mask = torch.tensor([[1.0, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0.0] * 5])
    expected = torch.tensor([[2, 2, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])  # capped at 2
    torch.testing.assert_close(recency_rank(mask, 3), expected)


def test_history_recency_lets_target_attention_tell_the_order() -> None:
    # The same items in another order pool to the same token without it, to different ones
    # with it (once the recency rows differ: they start at zero, i.e. as the order-free model).
    torch.manual_seed(0)
    sizes = {"user": 5, "item": 9, "category": 4}
    items, cats = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3]])
    flipped = (items.flip(1), cats.flip(1))
    for recency, same in ((0, True), (3, False)):
        model = FAT(sizes, tiny(history_pooling="target_attention", history_recency=recency))
        if model.recency_embedding is not None:
            torch.nn.init.normal_(model.recency_embedding.weight)
        model.eval()
        user, context, target = torch.tensor([0]), torch.zeros(1, 0).long(), torch.tensor([4])
        with torch.no_grad():
            logits = [
                model.score_candidates(model.encode_user(user, *h, context), target, target % 4)
                for h in ((items, cats), flipped)
            ]
        assert torch.allclose(logits[0], logits[1]) is same


def test_next_click_auxiliary_scores_each_slot_against_the_mean_before_it() -> None:
    torch.manual_seed(0)
    aux = NextClickAuxiliary(d=4, hidden=8)
    hist, negatives = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1.0, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    terms = []  # slot by slot: the slots with a real slot before them
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                state = hist[b, :t][mask[b, :t] > 0].mean(dim=0)
                clicked = aux.score(torch.cat([state, hist[b, t]]))
                other = aux.score(torch.cat([state, negatives[b, t]]))
                terms.append(
                    -torch.log(torch.sigmoid(clicked)) - torch.log(1 - torch.sigmoid(other))
                )
    with torch.no_grad():
        torch.testing.assert_close(aux(hist, negatives, mask), torch.stack(terms).mean())
        negatives[:, 0], negatives[0, 4], negatives[1, 1:] = 9.0, 9.0, 9.0  # slots not scored
        torch.testing.assert_close(aux(hist, negatives, mask), torch.stack(terms).mean())


def test_fat_asks_for_negative_histories_only_with_its_auxiliary_loss() -> None:
    assert not FAT.samples_negatives(tiny())
    assert FAT.samples_negatives(tiny(auxiliary_weight=1.0))


def test_basis_bank_composes_the_top_k_bases() -> None:
    torch.manual_seed(0)
    bank = BasisBank((3, 2), num_bases=5, meta_dim=4, top_k=2, std=1.0)
    meta = torch.randn(6, 4)
    got = bank(meta)  # [6, 3, 2]
    for f in range(6):
        scores = (bank.router.weight @ meta[f]).tolist()  # [M]
        best = sorted(range(5), key=lambda m: -scores[m])[:2]
        z = torch.tensor([scores[m] for m in best]).exp()
        alpha = z / z.sum()
        expected = alpha[0] * bank.bases[best[0]] + alpha[1] * bank.bases[best[1]]
        torch.testing.assert_close(got[f], expected.detach(), atol=1e-6, rtol=0)


def test_dropout_acts_in_training_only_and_zero_dropout_adds_no_module() -> None:
    torch.manual_seed(0)
    model = FAT(SIZES, tiny(dropout=0.5))
    batch = make_batch()
    model.train()
    assert not torch.equal(model(batch), model(batch))  # a fresh mask per call
    model.eval()
    torch.testing.assert_close(model(batch), model(batch), atol=0, rtol=0)
    plain = FAT(SIZES, tiny())
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())


@pytest.mark.parametrize("pooling", ["mean", "target_attention"])
def test_without_the_user_token_the_user_id_changes_no_score(pooling: str) -> None:
    sizes = {"item": 40, "category": 8, "user": 12}  # no context: the user side can be empty
    torch.manual_seed(0)
    model = FAT(sizes, tiny(history_pooling=pooling, user_token=False)).eval()
    assert "user" not in model.field_names
    batch = make_batch()
    batch.context = batch.context[:, :0]
    other = rows_of(batch, torch.arange(len(batch)))
    other.user = (batch.user + 1) % sizes["user"]
    torch.testing.assert_close(model(other), model(batch), atol=0, rtol=0)
    with_user = FAT(sizes, tiny(history_pooling=pooling)).eval()
    assert not torch.allclose(with_user(other), with_user(batch))  # the check is not vacuous
