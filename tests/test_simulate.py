"""`ctr simulate`: determinism, file schemas, the user split, the event log, the slate effects
the NCM models depend on, the conversion truth, and the oracle against independent
recomputations."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, log_loss, roc_auc_score
from typer.testing import CliRunner

from models.data.schema import load_behavior, load_events, load_slates
from models.overrides import with_overrides
from models.simulate import SimulationConfig, simulate_world
from models.simulate.behavior import simulate_behavior, style_commitment, true_logit
from models.simulate.slates import attractiveness
from models.simulate.world import build_world, draw_conversion_bias
from slatectr.cli import app

SMALL = SimulationConfig(
    n_users=240,
    n_items=160,
    n_categories=12,
    seed=3,
    events_per_user=20,
    history_len=12,
    sessions_per_user=2,
    slates_per_session=5,
    slate_size=6,
)
FILES = (
    "behavior/train.parquet",
    "behavior/test.parquet",
    "slates/train.parquet",
    "slates/test.parquet",
    "events.parquet",
    "oracle.json",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    simulate_world(SMALL, out, progress=False)
    return out


@pytest.fixture(scope="module")
def slate_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Many sessions of short slates, for the statistical properties of the click model."""
    out = tmp_path_factory.mktemp("slates")
    config = replace(
        SMALL,
        n_users=1500,
        events_per_user=2,
        sessions_per_user=4,
        slates_per_session=6,
        slate_size=5,
    )
    simulate_world(config, out, progress=False)
    return out


def _frames(out: Path) -> dict[str, pd.DataFrame]:
    return {
        "behavior/train": load_behavior(out / "behavior" / "train.parquet"),
        "behavior/test": load_behavior(out / "behavior" / "test.parquet"),
        "slates/train": load_slates(out / "slates" / "train.parquet"),
        "slates/test": load_slates(out / "slates" / "test.parquet"),
        "events": load_events(out / "events.parquet"),
    }


def _slates(out: Path) -> pd.DataFrame:
    """Both slate splits with their raw extra column click_probs, and a split flag."""
    parts = [
        pd.read_parquet(out / "slates" / f"{s}.parquet").assign(test=s == "test")
        for s in ("train", "test")
    ]
    return pd.concat(parts, ignore_index=True)


# --- determinism --------------------------------------------------------------------------


def test_same_seed_gives_identical_files(world: Path, tmp_path: Path) -> None:
    simulate_world(SMALL, tmp_path, progress=False)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes(), name
    again = _frames(tmp_path)
    for name, frame in _frames(world).items():
        pd.testing.assert_frame_equal(frame, again[name])


def test_another_seed_gives_another_world(world: Path, tmp_path: Path) -> None:
    simulate_world(replace(SMALL, seed=4), tmp_path, progress=False)
    ours, theirs = _frames(world), _frames(tmp_path)
    for name in ("behavior/train", "slates/train", "events"):
        assert not ours[name].equals(theirs[name]), name


# --- schemas and split --------------------------------------------------------------------


def test_files_load_with_the_schema_loaders(world: Path) -> None:
    frames = _frames(world)
    for split in ("behavior/train", "behavior/test"):
        df = frames[split]
        assert list(df.columns) == [
            "user_id",
            "item_id",
            "category_id",
            "hist_item_ids",
            "hist_category_ids",
            "label",
            "conversion",
        ]
        assert set(df["label"]) == {0, 1} and set(df["conversion"]) == {0, 1}
        lengths = df["hist_item_ids"].map(len)
        assert lengths.min() >= SMALL.min_history and lengths.max() == SMALL.history_len
        assert df["user_id"].str.match(r"^u\d+$").all() and df["item_id"].str.match(r"^i\d+$").all()
        assert df["category_id"].str.match(r"^c\d+$").all()
    slates = frames["slates/train"]
    assert (slates["item_ids"].map(len) == SMALL.slate_size).all()
    assert sorted(set(slates["slate_index"])) == list(range(SMALL.slates_per_session))
    assert slates.groupby("session_id")["user_id"].nunique().max() == 1
    assert (frames["events"]["type"] == "click").all()


def test_an_item_has_one_category_everywhere(world: Path) -> None:
    frames = _frames(world)
    pairs = [frames["events"][["item_id", "category_id"]]]
    for split in ("behavior/train", "behavior/test"):
        df = frames[split]
        pairs.append(df[["item_id", "category_id"]])
        pairs.append(
            pd.DataFrame(
                {
                    "item_id": df["hist_item_ids"].explode(),
                    "category_id": df["hist_category_ids"].explode(),
                }
            )
        )
    for split in ("slates/train", "slates/test"):
        df = frames[split]
        pairs.append(
            pd.DataFrame(
                {"item_id": df["item_ids"].explode(), "category_id": df["category_ids"].explode()}
            )
        )
    mapping = pd.concat(pairs).drop_duplicates()
    assert not mapping["item_id"].duplicated().any()


def test_train_and_test_users_are_disjoint_and_shared_by_both_tasks(world: Path) -> None:
    frames = _frames(world)
    train, test = set(frames["behavior/train"]["user_id"]), set(frames["behavior/test"]["user_id"])
    assert not train & test
    assert len(test) == round(SMALL.test_fraction * SMALL.n_users)
    assert set(frames["slates/test"]["user_id"]) == test
    assert set(frames["slates/train"]["user_id"]) == train


# --- the event log ------------------------------------------------------------------------


def test_events_are_the_clicks_in_time_order(world: Path) -> None:
    events = load_events(world / "events.parquet")
    assert events["event_id"].is_unique
    assert (events.groupby("user_id")["ts"].diff().dropna() > 0).all()
    assert (events.groupby("user_id").size() == SMALL.events_per_user).all()
    raw = pd.concat(
        [pd.read_parquet(world / "behavior" / f"{s}.parquet") for s in ("train", "test")],
        ignore_index=True,
    )
    by_user = {u: g for u, g in events.groupby("user_id")}
    for row in raw.sample(400, random_state=0).itertuples():
        user_events = by_user[row.user_id]
        before = user_events[user_events["ts"] < row.ts]
        # The history is the last history_len clicks before the impression, oldest first.
        assert list(row.hist_item_ids) == list(before["item_id"].iloc[-SMALL.history_len :])
        clicked_now = user_events[user_events["ts"] == row.ts]
        assert len(clicked_now) == row.label
        if row.label:
            assert clicked_now["item_id"].iloc[0] == row.item_id


def test_every_click_after_the_first_is_a_positive_sample(world: Path) -> None:
    events = load_events(world / "events.parquet")
    raw = pd.concat(
        [pd.read_parquet(world / "behavior" / f"{s}.parquet") for s in ("train", "test")],
        ignore_index=True,
    )
    positives = raw[raw["label"] == 1][["user_id", "item_id", "ts"]]
    later = events[events.groupby("user_id").cumcount() >= SMALL.min_history]
    merged = later.merge(positives, on=["user_id", "item_id", "ts"], how="outer", indicator=True)
    assert (merged["_merge"] == "both").all()


# --- slate effects ------------------------------------------------------------------------


def test_click_rate_falls_with_the_position(slate_world: Path) -> None:
    clicks = np.stack(_slates(slate_world)["clicks"].to_numpy())  # [slates, K]
    rate = clicks.mean(axis=0)
    assert np.all(np.diff(rate) < 0), rate


def test_a_click_lowers_the_click_rate_just_below_it(slate_world: Path) -> None:
    clicks = np.stack(_slates(slate_world)["clicks"].to_numpy())
    # Compared at the same position, since position alone already changes the rate.
    for k in range(1, clicks.shape[1]):
        after_click = clicks[clicks[:, k - 1] == 1, k].mean()
        after_none = clicks[clicks[:, k - 1] == 0, k].mean()
        assert after_click < after_none, (k, after_click, after_none)


def test_a_near_duplicate_above_makes_an_item_less_attractive() -> None:
    config = replace(SMALL, n_items=60)
    world = build_world(config, np.random.default_rng(0))
    target = 7
    cos = world.item_vec @ world.item_vec[target]
    twin = int(np.argsort(cos)[-2])  # the most similar other item
    stranger = int(np.argmin(cos))
    assert cos[twin] > config.competition_threshold > cos[stranger]
    slates = np.array([[twin, target], [stranger, target], [twin, stranger]])
    user = np.zeros(3, dtype=np.int64)
    no_clicks = np.zeros((3, config.dim), dtype=np.float32)
    alpha = attractiveness(world, config, user, world.interests, slates, no_clicks)
    assert alpha[0, 1] < alpha[1, 1] - 0.5
    # Only items shown higher up compete: what is below the first item does not matter.
    assert alpha[0, 0] == alpha[2, 0]


# --- truth and oracle ---------------------------------------------------------------------


def _naive_history_logit(
    hist_vecs: np.ndarray, hist_styles: np.ndarray, target: np.ndarray, config: SimulationConfig
) -> float:
    """The history terms of the module docstring, written out with loops (oldest first)."""
    n = len(hist_vecs)
    if n == 0:
        return 0.0
    s = [float(v @ target) for v in hist_vecs]
    age = [n - 1 - j for j in range(n)]
    a = [
        math.exp(config.attention_sharpness * s[j] - age[j] / config.recency_scale)
        for j in range(n)
    ]
    attention = sum(a[j] * s[j] for j in range(n)) / sum(a)
    tau = config.relation_threshold

    def x(j: int) -> float:
        support = min(max((s[j] - tau) / (1 - tau), 0.0), 1.0)
        return support * math.exp(-age[j] / config.recency_scale)

    pairs = 0.0
    for j in range(n):
        for m in range(j + 1, n):
            r = 1.0 if hist_styles[j] == hist_styles[m] else -1.0 / (config.n_styles - 1)
            pairs += x(j) * x(m) * r
    return config.attention_weight * attention + config.pair_strength * math.asinh(pairs)


@pytest.mark.parametrize("n_clicks", [0, 1, 5, 12, 31])  # 12 fills the ring, 31 wraps it
def test_history_truth_matches_a_naive_implementation(n_clicks: int) -> None:
    config = replace(SMALL, n_styles=3)
    size = config.history_len
    rng = np.random.default_rng(n_clicks)
    world = build_world(config, rng)
    clicked = rng.integers(0, config.n_items, n_clicks)
    ring = np.zeros((1, size, config.dim), dtype=np.float32)
    styles = np.full(size, -1)
    for q, item in enumerate(clicked):  # click q lives in slot q % L
        ring[0, q % size], styles[q % size] = world.item_vec[item], world.item_style[item]
    same = styles[:, None] == styles[None, :]
    relation = np.where(same, 1.0, -1.0 / (config.n_styles - 1)).astype(np.float32)
    np.fill_diagonal(relation, 0.0)
    hist = clicked[-size:]
    for target in (int(clicked[-1]) if n_clicks else 0, 3, 50):
        got = true_logit(
            ring, relation[None], np.array([n_clicks]), world.item_vec[[target]], config
        )[0]
        want = _naive_history_logit(
            world.item_vec[hist], world.item_style[hist], world.item_vec[target], config
        )
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_behavior_oracle_matches_sklearn_on_the_stored_probabilities(world: Path) -> None:
    oracle = json.loads((world / "oracle.json").read_text())["behavior"]
    test = pd.read_parquet(world / "behavior" / "test.parquet")
    assert oracle["n"] == len(test)
    assert oracle["auc"] == pytest.approx(roc_auc_score(test["label"], test["click_prob"]))
    assert oracle["logloss"] == pytest.approx(log_loss(test["label"], test["click_prob"]))
    assert oracle["auc"] > 0.7


def test_slate_oracle_matches_sklearn_on_the_last_fifth_of_test_sessions(world: Path) -> None:
    oracle = json.loads((world / "oracle.json").read_text())["slates"]
    slates = _slates(world)
    first_evaluated = math.floor(0.8 * SMALL.slates_per_session)
    evaluated = slates[slates["test"] & (slates["slate_index"] >= first_evaluated)]
    y = np.concatenate(evaluated["clicks"].to_numpy())
    p = np.concatenate(evaluated["click_probs"].to_numpy())
    assert oracle["n"] == len(y) == evaluated.shape[0] * SMALL.slate_size
    assert oracle["auc"] == pytest.approx(roc_auc_score(y, p))
    train = slates[~slates["test"]]
    train_y = np.concatenate(train["clicks"].to_numpy())
    train_p = np.concatenate(train["click_probs"].to_numpy())
    grid = np.arange(1, 100) / 100
    best = grid[np.argmax([f1_score(train_y, train_p >= t) for t in grid])]
    assert oracle["threshold"] == pytest.approx(best)
    assert oracle["f1"] == pytest.approx(f1_score(y, p >= best))
    assert oracle["accuracy"] == pytest.approx(np.mean((p >= best) == y))
    assert oracle["auc"] > 0.5


def test_true_probabilities_beat_item_popularity(world: Path) -> None:
    train = load_behavior(world / "behavior" / "train.parquet")
    test = pd.read_parquet(world / "behavior" / "test.parquet")
    clicks_per_item = train.groupby("item_id")["label"].sum()
    popularity = test["item_id"].map(clicks_per_item).fillna(0.0)
    pop_auc = roc_auc_score(test["label"], popularity)
    oracle_auc = roc_auc_score(test["label"], test["click_prob"])
    assert oracle_auc > pop_auc + 0.05, (oracle_auc, pop_auc)


# --- conversions ------------------------------------------------------------------------


def _behavior(out: Path) -> pd.DataFrame:
    """Both behaviour splits with their raw extra columns, and a split flag."""
    parts = [
        pd.read_parquet(out / "behavior" / f"{s}.parquet").assign(test=s == "test")
        for s in ("train", "test")
    ]
    return pd.concat(parts, ignore_index=True)


def test_conversions_only_happen_on_clicks(world: Path) -> None:
    raw = _behavior(world)
    assert raw["conversion"].dtype == np.int64 and raw["conversion_prob"].dtype == np.float64
    assert set(raw["conversion"]) == {0, 1}
    assert (raw["conversion"] <= raw["label"]).all()
    # q is written on every row (P(conversion | click) had the user clicked), not only clicks.
    assert raw["conversion_prob"].between(0.0, 1.0, inclusive="neither").all()


def test_conversion_rate_among_clicks_matches_the_true_probabilities(world: Path) -> None:
    clicked = _behavior(world).query("label == 1")
    q = clicked["conversion_prob"].to_numpy()
    # The count of conversions is a sum of independent Bernoulli(q_r): its standard error is
    # sqrt(Σ q(1 − q)); 4 of them is a false alarm once in ~16000 runs.
    se = math.sqrt(float(np.sum(q * (1 - q)))) / len(q)
    assert abs(clicked["conversion"].mean() - q.mean()) < 4 * se, (
        clicked["conversion"].mean(),
        q.mean(),
        se,
    )
    assert 0.05 < q.mean() < 0.3


def test_behavior_oracle_conversion_metrics_match_sklearn(world: Path) -> None:
    oracle = json.loads((world / "oracle.json").read_text())["behavior"]
    test = pd.read_parquet(world / "behavior" / "test.parquet")
    ctcvr = test["click_prob"] * test["conversion_prob"]
    assert oracle["ctcvr_auc"] == pytest.approx(roc_auc_score(test["conversion"], ctcvr))
    assert oracle["ctcvr_logloss"] == pytest.approx(log_loss(test["conversion"], ctcvr))
    clicked = test[test["label"] == 1]
    assert oracle["cvr_auc"] == pytest.approx(
        roc_auc_score(clicked["conversion"], clicked["conversion_prob"])
    )
    assert oracle["cvr"] == pytest.approx(clicked["conversion"].mean())
    assert oracle["ctcvr"] == pytest.approx(test["conversion"].mean())
    assert oracle["n_clicks"] == len(clicked)
    assert oracle["n_conversions"] == test["conversion"].sum()
    assert 0.55 < oracle["cvr_auc"] < 0.95


def test_conversion_knobs_change_nothing_but_the_conversions(world: Path, tmp_path: Path) -> None:
    config = replace(SMALL, cvr_base_logit=-1.0, cvr_style_weight=0.0, cvr_item_bias_corr=-0.3)
    simulate_world(config, tmp_path, progress=False)
    for name in ("slates/train.parquet", "slates/test.parquet", "events.parquet"):
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes(), name
    ours, theirs = _behavior(world), _behavior(tmp_path)
    click_columns = [
        "user_id",
        "item_id",
        "category_id",
        "hist_item_ids",
        "hist_category_ids",
        "label",
        "click_prob",
        "ts",
    ]
    pd.testing.assert_frame_equal(ours[click_columns], theirs[click_columns])
    assert not np.allclose(ours["conversion_prob"], theirs["conversion_prob"])
    assert not ours["conversion"].equals(theirs["conversion"])


def test_the_conversion_stream_leaves_the_earlier_streams_as_they_were() -> None:
    """The invariance above rests on this SeedSequence property: spawning a fourth child for
    the conversions does not change the first three (world, behaviour, slates)."""
    three = np.random.SeedSequence(SMALL.seed).spawn(3)
    four = np.random.SeedSequence(SMALL.seed).spawn(4)
    for old, new in zip(three, four[:3], strict=True):
        assert np.array_equal(old.generate_state(8), new.generate_state(8))


def test_item_conversion_bias_is_correlated_with_the_click_bias() -> None:
    config = replace(SMALL, n_items=20_000, cvr_item_bias_corr=0.5, cvr_item_bias_std=0.6)
    world = build_world(config, np.random.default_rng(0))
    bias = draw_conversion_bias(world, config, np.random.default_rng(1))
    # Sampling error of a correlation near 0.5 over 20000 items is (1 − ρ²)/√n ≈ 0.005.
    assert np.corrcoef(bias.item, world.item_bias)[0, 1] == pytest.approx(0.5, abs=0.03)
    assert bias.item.std() == pytest.approx(0.6, rel=0.05)
    assert bias.user.std() == pytest.approx(config.cvr_user_bias_std, rel=0.3)  # 240 users
    independent = draw_conversion_bias(
        world, replace(config, cvr_item_bias_corr=0.0), np.random.default_rng(1)
    )
    assert abs(np.corrcoef(independent.item, world.item_bias)[0, 1]) < 0.03


def test_style_commitment_matches_a_hand_computation() -> None:
    config = replace(SMALL, n_styles=4, cvr_recency_scale=2.0)
    # L = 3; clicks 0..3 had styles 2, 1, 0, 2, click q in slot q % 3, so after 4 clicks the
    # ring holds [click 3, click 1, click 2] with ages 0, 2, 1; after 2 clicks [2, 1, empty].
    full, partial = [2, 1, 0], [2, 1, -1]
    ring = np.array([full, full, partial, partial, [-1, -1, -1]])
    n = np.array([4, 4, 2, 2, 0])
    target = np.array([2, 3, 1, 0, 2])
    e = math.exp
    want = [
        1 / (1 + e(-1 / 2) + e(-2 / 2)) - 1 / 4,  # only click 3 (age 0) has style 2
        -1 / 4,  # no click has style 3
        1 / (1 + e(-1 / 2)) - 1 / 4,  # click 1 is the latest (age 0) of two
        -1 / 4,
        0.0,  # no history, no term
    ]
    got = style_commitment(ring, n, target, config)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_the_history_style_term_raises_the_conversion_oracle() -> None:
    """The committed-buyer term is signal, not noise: removing it lowers the AUC of q against
    the conversions of clicked rows (same worlds, same uniforms: only q differs)."""
    config = replace(SMALL, n_users=600)

    def cvr_auc(style_weight: float) -> float:
        cfg = replace(config, cvr_style_weight=style_weight)
        world_rng, behavior_rng, _, conversion_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4)
        )
        log = simulate_behavior(build_world(cfg, world_rng), cfg, behavior_rng, conversion_rng)
        clicked = log.label == 1
        return float(roc_auc_score(log.conversion[clicked], log.conversion_prob[clicked]))

    with_term, without = cvr_auc(SimulationConfig().cvr_style_weight), cvr_auc(0.0)
    assert with_term > without + 0.03, (with_term, without)


# --- config and command line --------------------------------------------------------------


def test_overrides_are_typed_by_the_field_and_unknown_names_fail() -> None:
    config = with_overrides(SMALL, ["slate_size=7", "satisfaction = 0.25", "pair-strength=1"])
    assert (config.slate_size, config.satisfaction, config.pair_strength) == (7, 0.25, 1.0)
    assert isinstance(config.pair_strength, float)
    with pytest.raises(ValueError, match="no_such_knob"):
        with_overrides(SMALL, ["no_such_knob=1"])
    with pytest.raises(ValueError, match="slate_size"):
        with_overrides(SMALL, ["slate_size=seven"])


def test_invalid_configs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_categories"):
        simulate_world(replace(SMALL, n_items=5), tmp_path, progress=False)
    with pytest.raises(ValueError, match="exposure"):
        simulate_world(replace(SMALL, exposure_interest=0.9), tmp_path, progress=False)
    with pytest.raises(ValueError, match="cvr_item_bias_corr"):
        simulate_world(replace(SMALL, cvr_item_bias_corr=1.5), tmp_path, progress=False)
    with pytest.raises(ValueError, match="cvr_recency_scale"):
        simulate_world(replace(SMALL, cvr_recency_scale=0.0), tmp_path, progress=False)
    with pytest.raises(ValueError, match="cvr_item_bias_std"):
        simulate_world(replace(SMALL, cvr_item_bias_std=-0.1), tmp_path, progress=False)


def test_cli_writes_a_world_and_prints_the_oracle(tmp_path: Path) -> None:
    out = tmp_path / "w"
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--out",
            str(out),
            "--users",
            "60",
            "--items",
            "50",
            "--seed",
            "1",
            "--events-per-user",
            "8",
            "--set",
            "n_categories=6",
            "--set",
            "slate_size=4",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == json.loads((out / "oracle.json").read_text())
    assert printed["config"]["slate_size"] == 4 and printed["config"]["n_users"] == 60
    assert all((out / name).exists() for name in FILES)
    assert (load_slates(out / "slates" / "test.parquet")["item_ids"].map(len) == 4).all()
    bad = CliRunner().invoke(app, ["simulate", "--out", str(out), "--set", "nope=1"])
    assert bad.exit_code != 0


def test_a_world_in_parts_is_a_directory_per_split_repeatable_and_alike_the_whole(
    tmp_path: Path, world: Path
) -> None:
    parted = replace(SMALL, parts=3)
    simulate_world(parted, tmp_path / "a", progress=False)
    simulate_world(parted, tmp_path / "b", progress=False)
    for split in ("behavior/train", "behavior/test", "slates/train", "slates/test", "events"):
        files = sorted((tmp_path / "a" / split).glob("*.parquet"))
        assert [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(3)]
        for file in files:  # the same config gives the same bytes
            assert file.read_bytes() == (tmp_path / "b" / split / file.name).read_bytes()
    events = load_events(tmp_path / "a" / "events")
    assert events["event_id"].is_unique and events["user_id"].nunique() == SMALL.n_users
    train = load_behavior(tmp_path / "a" / "behavior" / "train")
    test = load_behavior(tmp_path / "a" / "behavior" / "test")
    assert not set(train["user_id"]) & set(test["user_id"])  # the world's one user split
    whole = json.loads((world / "oracle.json").read_text())["behavior"]
    oracle = json.loads((tmp_path / "a" / "oracle.json").read_text())
    assert oracle["behavior"]["n"] == len(test) and oracle["config"]["parts"] == 3
    # Other draws of the same truth: the statistics agree, the rows do not.
    assert oracle["behavior"]["ctr"] == pytest.approx(whole["ctr"], abs=0.05)
    assert oracle["behavior"]["auc"] == pytest.approx(whole["auc"], abs=0.05)
    assert len(load_slates(tmp_path / "a" / "slates" / "test")) > 0
