"""Scoring requests that the parity check runs through both ONNX Runtime and PyTorch (torch-free).

Two sources, both in raw string ids so the check goes through the service's own encoder:

* real requests from a run's data file: behaviour rows that share a user, history and context
  become one slate (a positive and its sampled negative, usually); slate sessions become their
  last slate behind the clicks of the earlier ones;
* edge cases (issue 4): empty history, a history of one, the maximum length and beyond it,
  one candidate, many candidates, users with different slate sizes in one batch, unknown ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from runtime.features import FeatureSpec, Vocabulary
from runtime.feeds import ScoringRequest

Cases = dict[str, list[ScoringRequest]]
Pair = tuple[str, str]
UNKNOWN = "\x00unknown"  # never a vocabulary token: ids are non-empty printable strings


def _column(frame: pd.DataFrame, name: str) -> list[Any]:
    return list(frame[name].tolist())


def _pairs(items: Sequence[Any], cats: Sequence[Any]) -> list[Pair]:
    return [(str(i), str(c)) for i, c in zip(items, cats, strict=True)]


def behavior_requests(
    frame: pd.DataFrame, context_fields: Sequence[str]
) -> tuple[list[ScoringRequest], np.ndarray]:
    """Rows with equal (user, history, context) -> one request whose candidates are their
    targets, in order of first appearance -> (requests, labels in candidate order: [N]
    clicks, or [N, 2] (click, click ∧ conversion) when the frame has conversions)."""
    contexts = zip(*(_column(frame, f"context_{n}") for n in context_fields), strict=True)
    has_conversions = "conversion" in frame.columns
    rows = zip(
        _column(frame, "user_id"),
        _column(frame, "hist_item_ids"),
        _column(frame, "hist_category_ids"),
        _column(frame, "item_id"),
        _column(frame, "category_id"),
        _column(frame, "label"),
        _column(frame, "conversion") if has_conversions else [None] * len(frame),
        contexts if context_fields else ([()] * len(frame)),
        strict=True,
    )
    groups: dict[tuple[Any, ...], tuple[list[Pair], list[tuple[float, ...]]]] = {}
    for user, hist_items, hist_cats, item, cat, label, conversion, values in rows:
        context = tuple(zip(context_fields, map(str, values), strict=True))
        key = (str(user), tuple(_pairs(hist_items, hist_cats)), context)
        candidates, labels = groups.setdefault(key, ([], []))
        candidates.append((str(item), str(cat)))
        click = float(label)
        labels.append((click,) if conversion is None else (click, click * float(conversion)))
    requests = [
        ScoringRequest(user, list(history), candidates, dict(context))
        for (user, history, context), (candidates, _) in groups.items()
    ]
    flat = np.asarray(
        [label for _, labels_of in groups.values() for label in labels_of], dtype=np.float64
    ).reshape(-1, 2 if has_conversions else 1)
    return requests, flat if has_conversions else flat[:, 0]


def slate_requests(frame: pd.DataFrame) -> tuple[list[ScoringRequest], np.ndarray]:
    """Each session's last slate behind the items clicked in its earlier slates -> (requests,
    clicks [N] of the last slates, in candidate order)."""
    frame = frame.sort_values(["user_id", "session_id", "slate_index"], kind="stable")
    requests: list[ScoringRequest] = []
    labels: list[float] = []
    for (user, _), session in frame.groupby(["user_id", "session_id"], sort=False):
        items, cats = _column(session, "item_ids"), _column(session, "category_ids")
        clicks = _column(session, "clicks")
        history = [
            pair
            for t in range(len(items) - 1)
            for pair, click in zip(_pairs(items[t], cats[t]), clicks[t], strict=True)
            if click > 0
        ]
        requests.append(ScoringRequest(str(user), history, _pairs(items[-1], cats[-1])))
        labels.extend(float(c > 0) for c in clicks[-1])
    return requests, np.asarray(labels, dtype=np.float64)


class _Sampler:
    """Random known (item, category) pairs from the vocabularies, seeded."""

    def __init__(self, vocabs: Mapping[str, Vocabulary], seed: int) -> None:
        self.items = vocabs["item"].tokens or [UNKNOWN]
        self.cats = vocabs["category"].tokens or [UNKNOWN]
        self.rng = np.random.default_rng(seed)

    def pairs(self, n: int) -> list[Pair]:
        items = self.rng.integers(0, len(self.items), n)
        cats = self.rng.integers(0, len(self.cats), n)
        return [(self.items[i], self.cats[c]) for i, c in zip(items, cats, strict=True)]


def _context(spec: FeatureSpec, vocabs: Mapping[str, Vocabulary], pick: int) -> dict[str, str]:
    out = {}
    for name in spec.context_fields:
        tokens = vocabs[f"context_{name}"].tokens
        out[name] = tokens[pick % len(tokens)] if tokens else UNKNOWN
    return out


def edge_cases(
    spec: FeatureSpec,
    vocabs: Mapping[str, Vocabulary],
    history_len: int,
    max_slate: int,
    seed: int = 0,
) -> Cases:
    """The issue's edge cases; `max_slate` is the widest slate (K for slate models)."""
    s = _Sampler(vocabs, seed)
    users = vocabs["user"].tokens if "user" in vocabs and vocabs["user"].tokens else ["u"]

    def req(n_hist: int, n_cand: int, user: int = 0) -> ScoringRequest:
        return ScoringRequest(
            users[user % len(users)], s.pairs(n_hist), s.pairs(n_cand), _context(spec, vocabs, user)
        )

    unknown = [
        ScoringRequest(
            UNKNOWN,
            [(UNKNOWN, UNKNOWN), *s.pairs(3)],
            [(UNKNOWN, UNKNOWN), *s.pairs(2)],
            {name: UNKNOWN for name in spec.context_fields},
        ),
        ScoringRequest(users[0], s.pairs(4), [(UNKNOWN, s.cats[0]), (s.items[0], UNKNOWN)], {}),
        req(2, 3, user=1),
    ]
    many = max(300, 2 * max_slate + 3)
    return {
        "empty_history": [req(0, 5), req(0, 1, user=1)],
        "history_of_one": [req(1, 5), req(1, 2, user=1)],
        "max_length": [req(history_len, 5), req(history_len, 3, user=1)],
        "longer_than_max": [req(3 * history_len + 1, 4)],
        "one_candidate": [req(5, 1)],
        "full_slate": [req(5, max_slate)],
        "many_candidates": [req(history_len, many)],
        "mixed_slate_sizes": [
            req(n_hist, n_cand, user=i)
            for i, (n_hist, n_cand) in enumerate(
                [(0, 1), (1, 12), (7, 3), (history_len, 40), (3, 7)]
            )
        ],
        "unknown_ids": unknown,
    }


def real_cases(requests: list[ScoringRequest], batch: int = 64, max_batches: int = 4) -> Cases:
    """Consecutive batches of real requests (the first `batch × max_batches`)."""
    return {
        f"real_{i}": requests[start : start + batch]
        for i, start in enumerate(range(0, min(len(requests), batch * max_batches), batch))
    }
