"""Vocabularies, encoding, batching and negative sampling of behaviour samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.data.batch import BehaviorBatch
from models.data.dataset import (
    BehaviorArrays,
    NegativeSampler,
    encode_behavior,
    fit_vocabularies,
    iterate_batches,
)
from models.data.schema import load_behavior, write_table
from runtime.features import OOV, PAD

torch.set_num_threads(1)


def _frame(hists: list[list[str]], label: list[int] | None = None) -> pd.DataFrame:
    n = len(hists)
    return pd.DataFrame(
        {
            "user_id": [f"u{i % 3}" for i in range(n)],
            "item_id": [f"t{i}" for i in range(n)],
            "category_id": ["ct"] * n,
            "hist_item_ids": hists,
            "hist_category_ids": [[f"c{h}" for h in hist] for hist in hists],
            "label": label if label is not None else [i % 2 for i in range(n)],
        }
    )


# ------------------------------------------------------------------------- vocabularies


def test_vocabularies_fit_on_train_only(tiny_behavior: pd.DataFrame) -> None:
    vocabs = fit_vocabularies(tiny_behavior, ["device"])
    assert set(vocabs) == {"item", "category", "user", "context_device"}
    # Items: 4 targets (i3, 123, i1, i9) plus history-only items i2, i4..i8 -> 10 distinct.
    assert len(vocabs["item"]) == 10 + 2
    assert "i8" in vocabs["item"]  # seen only in a history
    # Ordered by frequency (i1: row 2's target and in two histories), ties by id.
    assert vocabs["item"].tokens == ["i1", "123", "i2", "i3", "i4", "i5", "i6", "i7", "i8", "i9"]
    assert len(vocabs["user"]) == 3 + 2
    assert len(vocabs["context_device"]) == 3 + 2  # ios, "", web

    valid = tiny_behavior.copy()
    valid["item_id"] = ["new", "i3", "i1", "other"]
    valid["hist_item_ids"] = [["i1", "zzz"], [], ["i4"], []]
    valid["hist_category_ids"] = [["c1", "c9"], [], ["c2"], []]
    valid["context_device"] = ["tv", "ios", "", "web"]
    arrays = encode_behavior(valid, vocabs, history_len=3, context_fields=["device"])
    assert arrays.items.tolist() == [
        OOV,
        vocabs["item"].index("i3"),
        vocabs["item"].index("i1"),
        OOV,
    ]
    assert arrays.hist_items[0].tolist() == [vocabs["item"].index("i1"), OOV, PAD]
    assert arrays.hist_cats[0, 1] == OOV
    assert arrays.context[:, 0].tolist()[0] == OOV


def test_pad_is_reserved_for_padding(tiny_behavior: pd.DataFrame) -> None:
    vocabs = fit_vocabularies(tiny_behavior, ["device"])
    for vocab in vocabs.values():
        assert PAD not in vocab.encode(vocab.tokens)
        assert OOV not in vocab.encode(vocab.tokens)
    arrays = encode_behavior(tiny_behavior, vocabs, history_len=6, context_fields=["device"])
    real = arrays.hist_items != PAD
    assert real.sum(axis=1).tolist() == [2, 0, 5, 1]  # the list lengths, so no id maps to PAD


# ------------------------------------------------------------------------- encoding


def test_encode_layout_oldest_first_padded_at_end(tiny_behavior: pd.DataFrame) -> None:
    vocabs = fit_vocabularies(tiny_behavior, ["device"])
    arrays = encode_behavior(tiny_behavior, vocabs, history_len=4, context_fields=["device"])
    item, cat = vocabs["item"].index, vocabs["category"].index
    assert arrays.hist_items.dtype == np.int64 and arrays.hist_items.shape == (4, 4)
    assert arrays.hist_items[0].tolist() == [item("i1"), item("i2"), PAD, PAD]
    assert arrays.hist_items[1].tolist() == [PAD] * 4
    assert arrays.hist_cats[0].tolist() == [cat("c1"), cat("c2"), PAD, PAD]
    assert arrays.label.dtype == np.float32 and arrays.label.tolist() == [1, 0, 1, 0]
    assert arrays.conversion is not None and arrays.conversion.tolist() == [1, 0, 0, 0]
    assert arrays.context[:, 0].tolist() == [
        vocabs["context_device"].index(v) for v in ["ios", "", "web", "ios"]
    ]
    assert len(arrays) == 4


def test_truncation_keeps_the_last_max_len_items(tiny_behavior: pd.DataFrame) -> None:
    vocabs = fit_vocabularies(tiny_behavior, [])
    arrays = encode_behavior(tiny_behavior, vocabs, history_len=3, context_fields=[])
    item, cat = vocabs["item"].index, vocabs["category"].index
    # Row 2's history is i4..i8 (categories c2 c2 c3 c1 c1): the 3 most recent stay, in order.
    assert arrays.hist_items[2].tolist() == [item("i6"), item("i7"), item("i8")]
    assert arrays.hist_cats[2].tolist() == [cat("c3"), cat("c1"), cat("c1")]
    assert arrays.hist_items[0].tolist() == [item("i1"), item("i2"), PAD]
    assert arrays.context.shape == (4, 0)


def test_missing_context_column_is_an_error(tiny_behavior: pd.DataFrame) -> None:
    vocabs = fit_vocabularies(tiny_behavior, ["device"])
    with pytest.raises(ValueError, match="context_device"):
        encode_behavior(tiny_behavior.drop(columns="context_device"), vocabs, 4, ["device"])


def test_parquet_and_csv_give_identical_batches(
    tmp_path: Path, tiny_behavior: pd.DataFrame
) -> None:
    batches = []
    for suffix in ("parquet", "csv"):
        write_table(tiny_behavior, tmp_path / f"train.{suffix}")
        frame = load_behavior(tmp_path / f"train.{suffix}")
        arrays = encode_behavior(frame, fit_vocabularies(frame, ["device"]), 5, ["device"])
        batches.append(list(iterate_batches(arrays, 3, shuffle=True, seed=4)))
    for a, b in zip(*batches, strict=True):
        for name in (
            "user",
            "hist_items",
            "hist_cats",
            "items",
            "cats",
            "context",
            "label",
            "conversion",
        ):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


# ------------------------------------------------------------------------- batching


def _arrays(hists: list[list[str]], history_len: int = 6) -> BehaviorArrays:
    frame = _frame(hists)
    return encode_behavior(frame, fit_vocabularies(frame, []), history_len, [])


def test_trim_never_drops_a_real_history_item() -> None:
    hists = [["a"], [], ["a", "b", "c", "d"], ["b", "c"], [], []]
    arrays = _arrays(hists)
    widths = []
    for batch in iterate_batches(arrays, 2, shuffle=False, seed=0):
        assert isinstance(batch, BehaviorBatch)
        widths.append(batch.hist_items.shape[1])
        assert batch.hist_cats.shape == batch.hist_items.shape
    assert widths == [1, 4, 1]  # longest history per batch; an all-empty batch keeps 1 column
    trimmed = [b.hist_items for b in iterate_batches(arrays, 2, shuffle=False, seed=0)]
    real_counts = [int((t != PAD).sum()) for t in trimmed]
    assert real_counts == [1, 6, 0]
    full = next(iterate_batches(arrays, 6, shuffle=False, seed=0, trim=False))
    assert full.hist_items.shape == (6, 6)
    assert torch.equal(full.hist_items[2:4, :4], trimmed[1])


def test_batches_have_expected_types_and_cover_every_row_once() -> None:
    arrays = _arrays([["a"]] * 7)
    batches = list(iterate_batches(arrays, 3, shuffle=True, seed=1))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert batches[0].label.dtype == torch.float32 and batches[0].items.dtype == torch.int64
    seen = torch.cat([b.items for b in batches]).tolist()
    assert sorted(seen) == sorted(arrays.items.tolist())
    assert batches[0].neg_hist_items is None and batches[0].conversion is None


def test_shuffle_order_depends_on_seed_only() -> None:
    arrays = _arrays([[str(i)] for i in range(40)])

    def order(seed: int) -> list[int]:
        return torch.cat(
            [b.items for b in iterate_batches(arrays, 8, shuffle=True, seed=seed)]
        ).tolist()

    assert order(3) == order(3)
    assert order(3) != order(4)
    plain = torch.cat([b.items for b in iterate_batches(arrays, 8, shuffle=False, seed=9)])
    assert plain.tolist() == arrays.items.tolist()


# ------------------------------------------------------------------------- negative sampler


def test_negative_sampler_never_returns_the_positive() -> None:
    # Item "a" fills most slots, so a draw of "a" against an "a" slot is frequent.
    hists = [["a", "a", "b"], ["a", "a", "a", "c"], ["b"], []] * 5
    arrays = _arrays(hists)
    sampler = NegativeSampler(arrays, seed=0)
    for batch in iterate_batches(arrays, 4, shuffle=True, seed=0, sampler=sampler):
        assert batch.neg_hist_items is not None and batch.neg_hist_cats is not None
        hist, neg = batch.hist_items, batch.neg_hist_items
        assert neg.shape == hist.shape
        real = hist != PAD
        assert torch.all(neg[real] != hist[real])
        assert torch.all(neg[~real] == PAD) and torch.all(batch.neg_hist_cats[~real] == PAD)
        assert torch.all(neg[real] > OOV)


def test_negative_categories_come_from_training_data() -> None:
    frame = _frame([["a", "b"], ["c"], ["a"]], label=[1, 1, 0])
    vocabs = fit_vocabularies(frame, [])
    arrays = encode_behavior(frame, vocabs, 3, [])
    items, cats = NegativeSampler(arrays, seed=2).sample(np.tile(arrays.hist_items, (50, 1)))
    category_of = {vocabs["item"].index(i): vocabs["category"].index(f"c{i}") for i in "abc"}
    category_of.update(
        {
            vocabs["item"].index("t0"): vocabs["category"].index("ct"),
            vocabs["item"].index("t1"): vocabs["category"].index("ct"),
        }
    )
    for item, cat in zip(items.ravel().tolist(), cats.ravel().tolist(), strict=True):
        if item != PAD:
            assert category_of[item] == cat
    # t2 is the target of a label-0 row, not an interaction: it is never drawn.
    assert vocabs["item"].index("t2") not in set(items.ravel().tolist())


def test_negative_sampler_is_frequency_weighted_and_seeded() -> None:
    # Occurrences: "a" 8 times in histories, "b" once; targets t0..t7 have labels 0,1,0,1,...
    frame = _frame([["a"], ["a"], ["a"], ["a"], ["a"], ["a"], ["a"], ["a", "b"]])
    arrays = encode_behavior(frame, fit_vocabularies(frame, []), 2, [])
    item_a = int(arrays.hist_items[0, 0])
    probe = np.full((2000, 1), int(arrays.items[0]))  # a label-0 target: never in the pool
    draws = NegativeSampler(arrays, seed=5).sample(probe)[0].ravel()
    # Pool weights: a 8, b 1, positives t1 t3 t5 t7 one each -> P(a) = 8/13.
    assert abs(float((draws == item_a).mean()) - 8 / 13) < 0.05
    again = NegativeSampler(arrays, seed=5).sample(probe)[0].ravel()
    assert np.array_equal(draws, again)


def test_negative_sampler_needs_two_items() -> None:
    frame = _frame([["a"], ["a"]], label=[0, 0])
    arrays = encode_behavior(frame, fit_vocabularies(frame, []), 2, [])
    with pytest.raises(ValueError, match="2 distinct items"):
        NegativeSampler(arrays)
