"""Vocabularies and the feature spec: the contract shared by training, export and serving.

This module must stay torch-free (the service imports it). Ids are strings everywhere outside
the model; a `Vocabulary` maps them to dense int64 indices with two reserved slots:

* index 0 (`PAD`) is padding. Histories are left-aligned (oldest first) and padded with 0 at the
  end, so a model derives its history mask as `hist_items != PAD`.
* index 1 (`OOV`) is every id not seen in the training split. Unknown ids never raise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PAD = 0
OOV = 1
_RESERVED = 2
# History items a behaviour model reads when nothing else is said: the setting of the SARN
# paper's Taobao numbers (Table II/III; the authors' code defaults to 30). `ctr train`,
# `ctr simulate` and the benchmarks all take their default from here.
DEFAULT_HISTORY_LEN = 50


class Vocabulary:
    """String id -> int index, fitted on the training split only."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens: list[str] = list(tokens)
        self._index: dict[str, int] = {t: i + _RESERVED for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    @classmethod
    def fit(cls, ids: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Builds a vocabulary in order of decreasing frequency (ties by id, so it is stable)."""
        counts: dict[str, int] = {}
        for token in ids:
            counts[token] = counts.get(token, 0) + 1
        return cls.from_counts(counts, min_count)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 1) -> Vocabulary:
        """`fit` from precomputed id counts (e.g. a vectorised count over millions of ids)."""
        kept = [t for t, c in counts.items() if c >= min_count]
        kept.sort(key=lambda t: (-counts[t], t))
        return cls(kept)

    def __len__(self) -> int:
        """Table size including the PAD and OOV slots: what an embedding needs."""
        return len(self.tokens) + _RESERVED

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def index(self, token: str) -> int:
        return self._index.get(token, OOV)

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        """Maps ids to an int64 array; unknown ids become OOV."""
        get = self._index.get
        return np.fromiter((get(t, OOV) for t in tokens), dtype=np.int64)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"tokens": self.tokens}))

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls(json.loads(path.read_text())["tokens"])


@dataclass
class FeatureSpec:
    """What the model's integer inputs mean; saved beside every checkpoint and ONNX file.

    `history_len`: the history items a behaviour model reads (its newest ones; written once
    into the manifest as `history_len`). `slate_size`: the slate width K of a slate click
    model. Each kind of model sets its own and leaves the other 0. `vocab_files` maps a
    vocabulary name (`item`, `category`, `user`, `context_<name>`) to a file name relative to
    the directory the spec is saved in.
    """

    history_len: int = 0
    slate_size: int = 0
    context_fields: list[str] = field(default_factory=list)
    vocab_files: dict[str, str] = field(default_factory=dict)

    def save(self, directory: Path, vocabs: dict[str, Vocabulary]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.vocab_files = {name: f"vocab_{name}.json" for name in vocabs}
        for name, vocab in vocabs.items():
            vocab.save(directory / self.vocab_files[name])
        (directory / "feature_spec.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(
        cls, directory: Path, slate: bool = False
    ) -> tuple[FeatureSpec, dict[str, Vocabulary]]:
        """`slate`: the spec belongs to a slate model. A spec written before the two lengths had
        their own names holds one `max_len`: the slate width of a slate model, the history
        length of any other."""
        data = json.loads((directory / "feature_spec.json").read_text())
        if "max_len" in data:
            data["slate_size" if slate else "history_len"] = data.pop("max_len")
        spec = cls(**data)
        vocabs = {name: Vocabulary.load(directory / f) for name, f in spec.vocab_files.items()}
        return spec, vocabs


def vocab_sizes(vocabs: dict[str, Vocabulary]) -> dict[str, int]:
    """Embedding table sizes by vocabulary name, as the model constructors take them."""
    return {name: len(v) for name, v in vocabs.items()}
