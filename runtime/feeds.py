"""Raw string requests -> ONNX Runtime feeds (torch-free; the service imports it via the loader).

The same functions build the parity harness's inputs, so the exported graph is checked on
exactly the arrays the service will send.

Behaviour models (slate-shared ragged layout, one row per user, one entry per candidate):
    user [U], hist_items [U, L], hist_cats [U, L], context [U, C],
    cand_items [N], cand_cats [N], cand_user_index [N]   (int64; N = sum of slate sizes)
Histories keep the last `history_len` items, oldest first, PAD-padded at the end; L is the
longest kept history of the batch and at least 1, so an all-empty batch is still a valid
tensor (a row of PAD is what the models see for an empty history in training too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from runtime.features import OOV, PAD, FeatureSpec, Vocabulary

ITEM_VOCAB = "item"
CATEGORY_VOCAB = "category"
USER_VOCAB = "user"
BEHAVIOR_INPUTS = (
    "user",
    "hist_items",
    "hist_cats",
    "context",
    "cand_items",
    "cand_cats",
    "cand_user_index",
)
# Output names: graph outputs, manifest "outputs", loader columns and /v1/score body keys.
SCORES = "scores"  # pCTR, P(click | impression): every model's first output
CONVERSION_SCORES = "conversion_scores"  # pCVR, P(conversion | click, impression)
CTCVR_SCORES = "ctcvr_scores"  # pCTCVR = pCTR x pCVR, P(click and conversion | impression)


# Where a request's history came from: sent with it, read from the store, or (the store failed)
# none at all. The service sets it; it goes into the response and a metric.
HistorySource = Literal["inline", "redis", "fallback"]


@dataclass(frozen=True)
class ScoringRequest:
    """One user's slate, in raw string ids: the one request type from the HTTP route (which
    builds it once) through routing, batching and shadowing to the feeds built here.

    The service reads a user's stored history when the client sent none (`history` None) and
    passes on a copy with the history filled in and `history_source` set; the encoders read a
    missing history as an empty one.
    """

    user_id: str
    history: Sequence[tuple[str, str]] | None  # (item_id, category_id), oldest first
    candidates: Sequence[tuple[str, str]]  # (item_id, category_id), in slate/display order
    context: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    model: str | None = None  # a model the client pinned; None: routing decides
    deadline: float = math.inf  # time.monotonic() seconds
    history_source: HistorySource = "inline"

    @property
    def known_history(self) -> Sequence[tuple[str, str]]:
        """The history to encode: empty when none was sent or read."""
        return self.history if self.history is not None else ()


def _vocab(vocabs: Mapping[str, Vocabulary], name: str) -> Vocabulary:
    try:
        return vocabs[name]
    except KeyError:
        raise KeyError(f"the model directory has no {name!r} vocabulary") from None


def encode_pairs(
    pairs: Sequence[tuple[str, str]], vocabs: Mapping[str, Vocabulary]
) -> tuple[np.ndarray, np.ndarray]:
    """(item_id, category_id) pairs -> item indices [n], category indices [n]; unknown -> OOV."""
    items = _vocab(vocabs, ITEM_VOCAB).encode(p[0] for p in pairs)
    cats = _vocab(vocabs, CATEGORY_VOCAB).encode(p[1] for p in pairs)
    return items, cats


def encode_histories(
    histories: Sequence[Sequence[tuple[str, str]]],
    vocabs: Mapping[str, Vocabulary],
    history_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged histories -> hist_items [U, L], hist_cats [U, L], PAD-padded at the end."""
    kept = [list(h)[-history_len:] if history_len > 0 else [] for h in histories]
    lengths = np.fromiter((len(h) for h in kept), dtype=np.int64, count=len(kept))
    width = max(1, int(lengths.max(initial=0)))
    # One vocabulary pass over all histories, then a single scatter into the padded arrays.
    flat_items, flat_cats = encode_pairs([p for h in kept for p in h], vocabs)
    rows = np.repeat(np.arange(len(kept), dtype=np.int64), lengths)
    cols = np.arange(len(flat_items), dtype=np.int64) - np.repeat(
        np.cumsum(lengths) - lengths, lengths
    )
    hist_items = np.full((len(kept), width), PAD, dtype=np.int64)  # [U, L]
    hist_cats = np.full((len(kept), width), PAD, dtype=np.int64)  # [U, L]
    hist_items[rows, cols] = flat_items
    hist_cats[rows, cols] = flat_cats
    return hist_items, hist_cats


def encode_context(
    contexts: Sequence[Mapping[str, str]], spec: FeatureSpec, vocabs: Mapping[str, Vocabulary]
) -> np.ndarray:
    """Context dicts -> [U, C] in `spec.context_fields` order; absent or unknown -> OOV.

    An absent field maps to OOV, like a value never seen in training: the model has a trained
    embedding for "unknown" but none that means "not sent", and PAD rows are never trained.
    """
    out = np.empty((len(contexts), len(spec.context_fields)), dtype=np.int64)  # [U, C]
    for col, name in enumerate(spec.context_fields):
        vocab = _vocab(vocabs, f"context_{name}")
        out[:, col] = [vocab.index(ctx[name]) if name in ctx else OOV for ctx in contexts]
    return out


def encode_users(
    requests: Sequence[ScoringRequest], vocabs: Mapping[str, Vocabulary]
) -> np.ndarray:
    """User ids -> [U]; a model trained without a user vocabulary sees OOV for everyone."""
    if USER_VOCAB not in vocabs:
        return np.full(len(requests), OOV, dtype=np.int64)
    return vocabs[USER_VOCAB].encode(r.user_id for r in requests)


def encode_behavior(
    requests: Sequence[ScoringRequest],
    spec: FeatureSpec,
    vocabs: Mapping[str, Vocabulary],
    history_len: int,
) -> dict[str, np.ndarray]:
    """The slate-shared ragged feeds of the behaviour models (see the module docstring)."""
    hist_items, hist_cats = encode_histories(
        [r.known_history for r in requests], vocabs, history_len
    )
    sizes = np.fromiter((len(r.candidates) for r in requests), dtype=np.int64, count=len(requests))
    cand_items, cand_cats = encode_pairs([c for r in requests for c in r.candidates], vocabs)
    return {
        "user": encode_users(requests, vocabs),  # [U]
        "hist_items": hist_items,  # [U, L]
        "hist_cats": hist_cats,  # [U, L]
        "context": encode_context([r.context for r in requests], spec, vocabs),  # [U, C]
        "cand_items": cand_items,  # [N]
        "cand_cats": cand_cats,  # [N]
        "cand_user_index": np.repeat(np.arange(len(requests), dtype=np.int64), sizes),  # [N]
    }


def slate_sizes(requests: Sequence[ScoringRequest]) -> list[int]:
    return [len(r.candidates) for r in requests]
