"""The serving contract of the slate click models (NCM family), torch-free.

A slate model scores sessions `[B, S, K]` (MODELS.md §4.3); a scoring request is one user's
stored history plus the slate to predict. The loader turns the request into a session so that
the service stays model-agnostic:

* The history (its last `history_len` items, oldest first) becomes earlier slates whose every
  item is clicked (`hist_clicks = 1`): the stored behaviour is what the user clicked. It is
  cut into slates of K counted from the most recent item, so the last history slate holds the
  K most recent items and only the oldest slate may be partial; empty slates go first.
* The request's candidates are the last slate, `S − 1`, in display order, with no clicks;
  positions past the candidates are padding (`mask = False`). Every model only lets slate t
  see clicks of slates < t, so the answer is P(click) at each shown position of slate S − 1.
* K (`slate_size`, the longest training slate) and S (`slates` = history slates + 1) are
  static in the exported graph; only B is dynamic. A request with more than K candidates is
  scored as consecutive slates of K, each on its own row behind the same history (positions
  restart at 0 on each row); the service may instead refuse such requests (the manifest says K).
* `noise` (uniform(0, 1)) feeds NCM's sampling readouts and is ignored otherwise; the default
  `soft` readout is deterministic.
* Slate models have no user or context vocabulary: `user_id` and `context` are not used.

Graph inputs: items, cats [B, S, K] int64, mask [B, S, K] bool, hist_clicks [B, S, K] float32,
noise [B, S, K] float32. Output: scores [B, K] float32, probabilities of slate S − 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.features import PAD, FeatureSpec, Vocabulary
from runtime.feeds import ScoringRequest, encode_pairs

SLATE_INPUTS = ("items", "cats", "mask", "hist_clicks", "noise")


@dataclass(frozen=True)
class SlateContract:
    """The static shape of a slate model's serving graph (recorded in the manifest)."""

    slate_size: int  # K
    history_slates: int  # S − 1

    @property
    def slates(self) -> int:
        return self.history_slates + 1

    @property
    def history_len(self) -> int:
        return self.slate_size * self.history_slates

    @classmethod
    def for_history(cls, slate_size: int, history_len: int) -> SlateContract:
        """The smallest contract whose history slates hold `history_len` items."""
        return cls(slate_size, max(1, math.ceil(history_len / slate_size)))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> SlateContract:
        slate = manifest["slate"]
        return cls(int(slate["slate_size"]), int(slate["history_slates"]))

    def to_manifest(self) -> dict[str, Any]:
        return {
            "slate_size": self.slate_size,
            "history_slates": self.history_slates,
            "slates": self.slates,
            "history_clicks": 1.0,
            "target_slate": self.slates - 1,
            "contract": "docs/export.md#slate-models",
        }


def _rows(requests: Sequence[ScoringRequest], k: int) -> list[tuple[int, int, int]]:
    """(request index, first candidate, candidate count) per graph row."""
    rows = []
    for index, request in enumerate(requests):
        for start in range(0, len(request.candidates), k):
            rows.append((index, start, min(k, len(request.candidates) - start)))
    return rows


def _history_block(
    history: Sequence[tuple[str, str]], vocabs: Mapping[str, Vocabulary], c: SlateContract
) -> tuple[np.ndarray, np.ndarray]:
    """History -> items, cats [S−1, K]: chunks of K counted from the most recent item, so the
    last history slate is the K most recent items and only the oldest chunk may be partial;
    each chunk is in time order from position 0, PAD after it."""
    kept = list(history)[-c.history_len :] if c.history_len > 0 else []
    shape = (c.history_slates, c.slate_size)
    items, cats = np.full(shape, PAD, dtype=np.int64), np.full(shape, PAD, dtype=np.int64)
    n, k = len(kept), c.slate_size
    if n:
        age = n - 1 - np.arange(n)  # 0 = most recent
        chunk = age // k  # 0 = the last history slate
        first = np.maximum(0, n - (chunk + 1) * k)  # oldest item of each item's chunk
        rows, cols = c.history_slates - 1 - chunk, np.arange(n) - first
        items[rows, cols], cats[rows, cols] = encode_pairs(kept, vocabs)
    return items, cats


def encode_slates(
    requests: Sequence[ScoringRequest],
    spec: FeatureSpec,
    vocabs: Mapping[str, Vocabulary],
    history_len: int,
    contract: SlateContract,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Requests -> the slate graph's feeds (see the module docstring). `spec`, `history_len`:
    unused beyond the contract (kept for the loader's uniform call)."""
    del spec, history_len
    c = contract
    rows = _rows(requests, c.slate_size)
    shape = (len(rows), c.slates, c.slate_size)
    items = np.zeros(shape, dtype=np.int64)  # [B, S, K]
    cats = np.zeros(shape, dtype=np.int64)  # [B, S, K]
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for row, (index, start, count) in enumerate(rows):
        if index not in cache:
            cache[index] = _history_block(requests[index].known_history, vocabs, c)
        items[row, :-1], cats[row, :-1] = cache[index]
        slate = requests[index].candidates[start : start + count]
        items[row, -1, :count], cats[row, -1, :count] = encode_pairs(slate, vocabs)
    mask = np.zeros(shape, dtype=bool)
    mask[:, :-1] = items[:, :-1] != PAD
    counts = np.array([count for _, _, count in rows], dtype=np.int64)
    mask[:, -1] = np.arange(c.slate_size)[None, :] < counts[:, None]
    rng = np.random.default_rng(seed)
    return {
        "items": items,
        "cats": cats,
        "mask": mask,
        "hist_clicks": _clicks(mask),  # [B, S, K]
        "noise": rng.random(shape, dtype=np.float32),
    }


def _clicks(mask: np.ndarray) -> np.ndarray:
    """Every shown history item is a click; the target slate has none."""
    clicks = mask.astype(np.float32)  # [B, S, K]
    clicks[:, -1] = 0.0
    return clicks


def flatten_slate_scores(scores: np.ndarray, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """scores [B, K] of the target slates -> [N], candidates in request order."""
    return np.ascontiguousarray(scores[feeds["mask"][:, -1, :]], dtype=np.float32)
