"""DIN, GRU and Wide&Deep on tiny configurations: the BehaviorModel contract and each model's
defining behaviour."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from models.data.batch import BehaviorBatch
from models.nets.base import BehaviorModel
from models.nets.baselines import (
    DIN,
    GRUCTR,
    DINConfig,
    GRUCTRConfig,
    WideDeep,
    WideDeepConfig,
)

torch.set_num_threads(1)

SIZES = {"item": 40, "category": 8, "user": 12, "context_device": 4, "context_hour": 5}
N_ITEMS, N_CATS = SIZES["item"], SIZES["category"]

TINY: dict[type[BehaviorModel], Any] = {
    DIN: DINConfig(embed_dim=4, context_dim=3, attention_hidden=(8, 4), mlp_hidden=(16, 8)),
    GRUCTR: GRUCTRConfig(embed_dim=4, context_dim=3, mlp_hidden=(16, 8)),
    WideDeep: WideDeepConfig(
        embed_dim=4, user_dim=3, context_dim=3, mlp_hidden=(16, 8), cross_buckets=97
    ),
}
MODELS = list(TINY)


def make_model(cls: type[BehaviorModel], seed: int = 0) -> BehaviorModel:
    torch.manual_seed(seed)
    return cls(SIZES, TINY[cls])


def item_category(items: torch.Tensor) -> torch.Tensor:
    """A fixed item -> category map (PAD stays PAD), so a dataset is self-consistent."""
    return torch.where(items == 0, 0, 2 + items % (N_CATS - 2))


def make_batch(b: int = 6, length: int = 5, seed: int = 0) -> BehaviorBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (b,), generator=g)
    lengths[0] = 0  # an empty history is legal
    lengths[1] = length  # and one full row
    hist = torch.randint(2, N_ITEMS, (b, length), generator=g)
    hist = hist * (torch.arange(length) < lengths[:, None])  # PAD at the end
    items = torch.randint(2, N_ITEMS, (b,), generator=g)
    return BehaviorBatch(
        user=torch.randint(2, SIZES["user"], (b,), generator=g),
        hist_items=hist,
        hist_cats=item_category(hist),
        items=items,
        cats=item_category(items),
        context=torch.stack(
            [torch.randint(2, 4, (b,), generator=g), torch.randint(2, 5, (b,), generator=g)], 1
        ),
        label=torch.randint(0, 2, (b,), generator=g).float(),
    )


def pad_history(batch: BehaviorBatch, extra: int) -> BehaviorBatch:
    pad = torch.zeros(len(batch), extra, dtype=torch.long)
    return BehaviorBatch(
        user=batch.user,
        hist_items=torch.cat([batch.hist_items, pad], 1),
        hist_cats=torch.cat([batch.hist_cats, pad], 1),
        items=batch.items,
        cats=batch.cats,
        context=batch.context,
        label=batch.label,
    )


@pytest.mark.parametrize("cls", MODELS)
def test_logits_have_batch_shape_and_are_finite(cls: type[BehaviorModel]) -> None:
    model = make_model(cls)
    batch = make_batch()
    for mode in (model.train, model.eval):
        mode()
        logits = model(batch)
        assert logits.shape == (len(batch), 1)  # one column per task
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        probs = torch.sigmoid(logits)
        assert ((probs > 0) & (probs < 1)).all()


@pytest.mark.parametrize("cls", MODELS)
def test_appending_padding_does_not_change_scores(cls: type[BehaviorModel]) -> None:
    model = make_model(cls).eval()
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(pad_history(batch, 7)), model(batch))


@pytest.mark.parametrize("cls", MODELS)
def test_a_score_does_not_depend_on_the_rest_of_its_batch_in_eval(cls: type[BehaviorModel]) -> None:
    model = make_model(cls).eval()
    batch = make_batch(b=8)
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(_row(batch, i)) for i in range(len(batch))])
    torch.testing.assert_close(alone, together)


def _row(batch: BehaviorBatch, i: int) -> BehaviorBatch:
    return BehaviorBatch(
        user=batch.user[i : i + 1],
        hist_items=batch.hist_items[i : i + 1],
        hist_cats=batch.hist_cats[i : i + 1],
        items=batch.items[i : i + 1],
        cats=batch.cats[i : i + 1],
        context=batch.context[i : i + 1],
        label=batch.label[i : i + 1],
    )


@pytest.mark.parametrize("cls", MODELS)
def test_every_parameter_gets_a_gradient(cls: type[BehaviorModel]) -> None:
    model = make_model(cls).train()
    batch = make_batch(b=16, seed=3)
    F.binary_cross_entropy_with_logits(model(batch)[:, 0], batch.label).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", MODELS)
def test_short_training_lowers_the_loss_on_a_learnable_rule(cls: type[BehaviorModel]) -> None:
    # Label: the target's category occurs in the history. Every model can express it.
    batch = make_batch(b=64, length=6, seed=5)
    seen = (batch.hist_cats == batch.cats[:, None]).any(dim=1)
    batch.label = seen.float()
    model = make_model(cls).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = F.binary_cross_entropy_with_logits(model(batch)[:, 0], batch.label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("cls", MODELS)
def test_forward_slates_equals_forward_on_pairwise_rows(cls: type[BehaviorModel]) -> None:
    model = make_model(cls).eval()
    users = make_batch(b=3, length=4, seed=7)  # user 0 has an empty history
    cand_user_index = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    cand_items = torch.randint(2, N_ITEMS, (7,), generator=torch.Generator().manual_seed(1))
    cand_cats = item_category(cand_items)
    with torch.no_grad():
        slates = model.forward_slates(
            users.user,
            users.hist_items,
            users.hist_cats,
            users.context,
            cand_items,
            cand_cats,
            cand_user_index,
        )
        pairwise = model(
            BehaviorBatch(
                user=users.user[cand_user_index],
                hist_items=users.hist_items[cand_user_index],
                hist_cats=users.hist_cats[cand_user_index],
                items=cand_items,
                cats=cand_cats,
                context=users.context[cand_user_index],
                label=torch.zeros(7),
            )
        )
    assert slates.shape == (7, 1)
    torch.testing.assert_close(slates, pairwise)


@pytest.mark.parametrize("cls", [DIN, WideDeep])
def test_pooling_models_ignore_history_order(cls: type[BehaviorModel]) -> None:
    model = make_model(cls).eval()
    batch = make_batch(b=4, length=5, seed=11)
    batch.hist_items[:, :] = torch.arange(2, 7)  # full histories, so any permutation is valid
    batch.hist_cats = item_category(batch.hist_items)
    flipped = pad_history(batch, 0)
    flipped.hist_items = batch.hist_items.flip(1)
    flipped.hist_cats = batch.hist_cats.flip(1)
    with torch.no_grad():
        torch.testing.assert_close(model(flipped), model(batch))


def test_gru_is_order_sensitive() -> None:
    model = make_model(GRUCTR).eval()
    batch = make_batch(b=4, length=5, seed=11)
    batch.hist_items[:, :] = torch.arange(2, 7)
    batch.hist_cats = item_category(batch.hist_items)
    flipped = pad_history(batch, 0)
    flipped.hist_items = batch.hist_items.flip(1)
    flipped.hist_cats = batch.hist_cats.flip(1)
    with torch.no_grad():
        assert not torch.allclose(model(flipped), model(batch))


def test_gru_user_state_is_the_state_after_the_last_real_click() -> None:
    model = make_model(GRUCTR).eval()
    batch = make_batch(b=6, length=5, seed=2)
    with torch.no_grad():
        h_last, _ = model.encode_user(batch.user, batch.hist_items, batch.hist_cats, batch.context)
        for row in range(len(batch)):
            n = int((batch.hist_items[row] != 0).sum())
            if n == 0:
                assert torch.count_nonzero(h_last[row]) == 0
                continue
            x = model.embed(batch.hist_items[row, :n], batch.hist_cats[row, :n])[None]
            _, h_n = model.gru(x)  # the GRU run on the unpadded history alone
            torch.testing.assert_close(h_last[row], h_n[0, 0])


def test_din_attention_is_not_normalised() -> None:
    # Without a softmax, repeating the whole history doubles the attention-pooled interest.
    model = make_model(DIN).eval()
    batch = make_batch(b=4, length=3, seed=4)
    with torch.no_grad():
        hist, mask, _ = model.encode_user(
            batch.user, batch.hist_items, batch.hist_cats, batch.context
        )
        t = model.embed(batch.items, batch.cats)
        once = (model.attention(hist, t, mask).unsqueeze(-1) * hist).sum(1)
        hist2, mask2 = torch.cat([hist, hist], 1), torch.cat([mask, mask], 1)
        twice = (model.attention(hist2, t, mask2).unsqueeze(-1) * hist2).sum(1)
    torch.testing.assert_close(twice, 2 * once)


def test_wide_cross_term_counts_each_history_category_occurrence() -> None:
    model = make_model(WideDeep).eval()
    batch = make_batch(b=6, length=5, seed=9)
    with torch.no_grad():
        model.wide_cross.weight.fill_(1.0)  # every (target, history) cross weighs 1
        state = model.encode_user(batch.user, batch.hist_items, batch.hist_cats, batch.context)
        wide = model._wide(batch.items, batch.cats, state[1], state[2])
    lengths = (batch.hist_items != 0).sum(1).float()
    torch.testing.assert_close(wide, lengths)  # item/category weights start at 0
