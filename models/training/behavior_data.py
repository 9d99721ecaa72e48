"""The behaviour task's data, prepared once per run and opened by every rank.

Preparing (rank 0; the other ranks wait at a barrier):

1. one counting pass over the training files (`models.data.vocab`) -> the vocabularies, with
   `min_count`; the feature spec and vocabularies are written to the run directory at once, so
   a resumed run and every rank use exactly these;
2. one encoding pass per split -> `RUN/shards/{train,valid}/` (`models.data.stream.shards`),
   the training pass also counting the item frequencies that negative sampling draws from;
3. `RUN/shards/ready.json`, written last, records what the shards were made from: the files
   (path, size, modification time) and the options that shape them. A run that finds it for
   the same files and options (a resumed run, every rank but 0) skips both passes.

A conversion-only model (`tasks=("cvr",)`) sees only the clicked rows, vocabularies included:
an id that only ever appears in a non-clicked impression is unknown to it, as it is to any CVR
model trained on clicks. `discard` removes the shards once the run is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from models.data.dataset import ItemFrequencies
from models.data.encode import BehaviorArrays, Encoder
from models.data.schema import Chunk, DataError, sample_files
from models.data.stream.shards import Shards, open_shards, write_shards
from models.data.stream.source import SampleSource
from models.data.vocab import VocabularyCounter
from models.nets.multitask import CVR, needs_conversions, selection_labels
from models.training.distributed.ranks import Ranks
from models.training.loop import TrainConfig
from runtime.features import FeatureSpec, Vocabulary

SHARDS = "shards"
READY = "ready.json"
FREQUENCIES = "item_frequencies.npz"
_VERSION = 1  # bump when the shard layout or the encoding changes


@dataclass
class BehaviorData:
    spec: FeatureSpec
    vocabs: dict[str, Vocabulary]
    train: Shards
    valid: Shards
    frequencies: ItemFrequencies  # of the training rows, for `NegativeSampler`


def prepare_behavior_data(
    run_dir: Path,
    train_path: Path,
    valid_path: Path,
    config: TrainConfig,
    tasks: Sequence[str],
    ranks: Ranks,
    progress: bool = True,
) -> BehaviorData:
    """Prepares (rank 0) or opens (everyone) the run's data; see the module docstring."""
    fingerprint = data_fingerprint(train_path, valid_path, config, tasks)
    if ranks.leader and _open(run_dir, fingerprint) is None:
        _prepare(run_dir, train_path, valid_path, config, tasks, fingerprint, progress)
    ranks.barrier()
    data = _open(run_dir, fingerprint)
    if data is None:  # only when the run directory is not on storage every rank sees
        raise RuntimeError(f"rank {ranks.rank} cannot find the data rank 0 prepared in {run_dir}")
    return data


def data_fingerprint(
    train_path: Path, valid_path: Path, config: TrainConfig, tasks: Sequence[str]
) -> dict[str, Any]:
    """What a run's prepared data depend on (JSON): the files as they are now, and options."""
    return {
        "version": _VERSION,
        "train": _files_of(train_path),
        "valid": _files_of(valid_path),
        "history_len": config.history_len,
        "min_count": config.min_count,
        "tasks": list(tasks),
    }


def discard(run_dir: Path) -> None:
    """Removes the run's shards (a complete run needs them no more)."""
    shutil.rmtree(run_dir / SHARDS, ignore_errors=True)


def stream_arrays(
    path: Path, spec: FeatureSpec, vocabs: dict[str, Vocabulary], tasks: Sequence[str]
) -> Iterator[BehaviorArrays]:
    """A behaviour file (or directory) encoded chunk by chunk with a trained run's spec and
    vocabularies; only the rows a model with `tasks` sees. DataError when there are none."""
    source = _source(path, tasks, spec.context_fields)
    encoder = Encoder(vocabs, spec.history_len, spec.context_fields)
    return _encoded(_nonempty(source.chunks(), source), encoder)


def check_selectable(
    label: np.ndarray, conversion: np.ndarray | None, tasks: Sequence[str], path: Path
) -> None:
    """Early stopping ranks epochs by validation AUC: a target with one class would leave it
    undefined in every epoch and the first epoch kept blindly, so such a file is refused."""
    for column, labels in selection_labels(label, conversion, tasks).items():
        if np.unique(labels).size < 2:
            message = (
                "validation needs both classes (early stopping ranks epochs by AUC); "
                f"every row has {int(labels[0])}"
            )
            raise DataError(path, message, column=column)


def _prepare(
    run_dir: Path,
    train_path: Path,
    valid_path: Path,
    config: TrainConfig,
    tasks: Sequence[str],
    fingerprint: dict[str, Any],
    progress: bool,
) -> None:
    root = run_dir / SHARDS
    (root / READY).unlink(missing_ok=True)
    train = _source(train_path, tasks)
    counter = VocabularyCounter(train.context_fields)
    for chunk in _nonempty(_bar(train, "count ids", progress), train):
        counter.add(chunk.columns)
    vocabs = counter.vocabularies(config.min_count)
    spec = FeatureSpec(history_len=config.history_len, context_fields=list(train.context_fields))
    spec.save(run_dir, vocabs)
    encoder = Encoder(vocabs, spec.history_len, spec.context_fields)
    frequencies = ItemFrequencies()
    train_parts = _counted(_encoded(_bar(train, "encode train", progress), encoder), frequencies)
    _write(root / "train", train_parts, train, spec, fingerprint)
    np.savez(root / FREQUENCIES, counts=frequencies.counts, category=frequencies.category)
    valid = _source(valid_path, tasks, spec.context_fields)
    valid_parts = _encoded(_nonempty(_bar(valid, "encode valid", progress), valid), encoder)
    shards = _write(root / "valid", valid_parts, valid, spec, fingerprint)
    conversion = shards.column("conversion") if shards.conversion else None
    check_selectable(shards.column("label"), conversion, tasks, valid_path)
    temporary = root / f"{READY}.tmp"
    temporary.write_text(json.dumps({"fingerprint": fingerprint}, indent=2) + "\n")
    os.replace(temporary, root / READY)


def _open(run_dir: Path, fingerprint: dict[str, Any]) -> BehaviorData | None:
    root = run_dir / SHARDS
    try:
        ready = json.loads((root / READY).read_text())
    except (OSError, ValueError):
        return None
    train, valid = (
        open_shards(root / "train", fingerprint),
        open_shards(root / "valid", fingerprint),
    )
    if ready.get("fingerprint") != fingerprint or train is None or valid is None:
        return None
    spec, vocabs = FeatureSpec.load(run_dir)
    frequencies = ItemFrequencies()
    with np.load(root / FREQUENCIES, allow_pickle=False) as saved:
        frequencies.counts, frequencies.category = saved["counts"], saved["category"]
    return BehaviorData(spec, vocabs, train, valid, frequencies)


def _source(path: Path, tasks: Sequence[str], fields: Sequence[str] | None = None) -> SampleSource:
    return SampleSource.open(
        path,
        context_fields=fields,
        conversions=needs_conversions(tasks),
        clicked_only=tuple(tasks) == (CVR,),
    )


def _write(
    directory: Path,
    parts: Iterable[BehaviorArrays],
    source: SampleSource,
    spec: FeatureSpec,
    fingerprint: dict[str, Any],
) -> Shards:
    return write_shards(
        directory,
        parts,
        history_len=spec.history_len,
        context_width=len(spec.context_fields),
        conversion=source.conversions,
        fingerprint=fingerprint,
    )


def _encoded(chunks: Iterable[Chunk], encoder: Encoder) -> Iterator[BehaviorArrays]:
    for chunk in chunks:
        yield encoder.encode(chunk.columns)


def _counted(parts: Iterable[BehaviorArrays], into: ItemFrequencies) -> Iterator[BehaviorArrays]:
    for part in parts:
        into.add(part)
        yield part


def _nonempty(chunks: Iterable[Chunk], source: SampleSource) -> Iterator[Chunk]:
    """The chunks; DataError after the last one when none had a row."""
    rows = 0
    for chunk in chunks:
        rows += len(chunk)
        yield chunk
    if rows == 0:
        if source.clicked_only:
            raise DataError(source.path, "a conversion model needs clicked rows; there are none")
        raise DataError(source.path, "no rows")


def _bar(source: SampleSource, what: str, progress: bool) -> Iterator[Chunk]:
    """The source's chunks under a progress bar counting rows (Parquet totals are known)."""
    parquet = [f for f in source.files if f.suffix.lower() in (".parquet", ".pq")]
    total = None
    if len(parquet) == len(source.files) and not source.clicked_only:
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in parquet)
    bar = tqdm(total=total, desc=what, unit="row", disable=not progress, file=sys.stderr)
    with bar:
        for chunk in source.chunks():
            yield chunk
            bar.update(len(chunk))


def _files_of(path: Path) -> list[list[Any]]:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in sample_files(path)]
