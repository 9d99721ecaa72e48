"""The behaviour stream and its ground truth: one impression per user per step, in lockstep.

At every step each user who still needs clicks (fewer than `events_per_user` clicks and fewer
than `max_impressions_per_user` impressions) goes through:

1. **Drift and interest switching.** Every interest vector takes a random-walk step,
   w ← normalise(w + drift_rate · ε). With probability 1 − `interest_stickiness` the active
   interest z is redrawn from the user's mixture weights, so a history interleaves runs of
   unrelated interests (the situation the SARN paper argues for).
2. **Exposure** (the logging policy, not the truth): with probability `exposure_interest` a
   random item of the category nearest to the active interest, with `exposure_history` a random
   item of the category of one of the last `history_len` clicks, with `exposure_popular` an
   item drawn by popularity, otherwise a uniformly random item.
3. **Click**, label ~ Bernoulli(p) with the TRUE probability p = σ(ℓ),

       ℓ(u, h, i) = base_logit + b_u + b_i
                    + interest_weight  · cos(w_{u,z}, v_i)              (active interest)
                    + attention_weight · Σ_j a_j s_j                     (attention)
                    + pair_strength    · asinh(Σ_{j<l} x_j x_l r_jl)     (pairs)

   where h = the user's last `history_len` clicks (exactly the sample's history), j runs over
   them, v are unit content vectors and y styles (`models.simulate.world`), and
   * s_j = cos(v_{h_j}, v_i) is the target similarity and age_j the number of clicks since
     h_j (0 for the latest);
   * a = softmax_j(attention_sharpness · s_j − age_j / recency_scale): a target-aware
     attention in which recent clicks weigh more (interest drift);
   * x_j = g(s_j) · exp(−age_j / recency_scale) is how much h_j supports the target, with
     g(c) = clip((c − τ) / (1 − τ), 0, 1), τ = `relation_threshold`;
   * r_jl = 1 if h_j and h_l share a style, else −1 / (n_styles − 1) (so r averages 0 over
     random pairs; with n_styles = 1 every pair is related).

   The pair term is the relational part. Pairs of history items that both support the target
   raise the click probability when they share a style (a user who keeps clicking this kind
   of item in one brand or price tier is a committed buyer) and lower it when they do not (a
   browser comparing styles). Given how many history items support the target, its expected
   value is ~0: it is carried by the relation *between* two history items, not by either item
   against the target. A target-blind mean of the history cannot see it, a per-item attention
   has to reconstruct it from its pooled vector (a sum of squares of per-style masses), and a
   relation network over history pairs gated by the target sees it directly. `pair_strength`
   is the knob for how much relations matter. The active-interest term is latent: a model can
   only infer z from the recent sub-sequence of the same interest, so it rewards recency
   awareness and keeps the oracle above every model.
4. A click appends the item to the history and becomes an event (ts strictly increasing).
5. **Conversion**, only on a click: conversion ~ Bernoulli(q) with the TRUE probability
   q = P(conversion | click) = σ(ℓ_cvr),

       ℓ_cvr(u, h, i) = cvr_base_logit + c_u + c_i
                        + cvr_interest_weight · cos(w_{u,z}, v_i)             (active interest)
                        + cvr_style_weight    · (m(h, y_i) − 1 / n_styles)    (style commitment)

   with u, h, i, z, v, y as in step 3 (h is the history *before* the click) and
   * c_i = cvr_item_bias_std · (ρ · b̃_i + √(1 − ρ²) · η_i), where b̃ is the click bias b
     standardised over items, η_i ~ N(0, 1) and ρ = `cvr_item_bias_corr`: an item that gets
     clicked tends to sell, but not always (clickbait does not);
   * c_u = cvr_user_bias_std · ζ_u, ζ_u ~ N(0, 1), independent of b_u;
   * m(h, y) = Σ_j ω_j [y_{h_j} = y] / Σ_j ω_j, ω_j = exp(−age_j / cvr_recency_scale): the
     recency-weighted share of the history in the target's style. 1 / n_styles is its mean
     when the history's styles are unrelated to the target's, so the term averages ~0; it is
     0 without history. A user who keeps clicking one style is a committed buyer of it.

   Decision: ℓ_cvr shares signal with ℓ (b_i through ρ; the same latent active-interest match
   with its own weight; the latent item style, which the click pair term also depends on, so
   item embeddings learnt from the plentiful clicks carry it) and has its own part (η_i, c_u,
   and the target-vs-history style match, which the click truth never looks at). A shared
   representation therefore helps the scarce conversion task (the ESMM argument), while a
   click model alone is not a conversion model. q is computed on every impression (what it
   would be had the user clicked); conversion = 1 only where label = 1. The biases c and the
   conversion draws (made once the click stream has run) come from their own random stream,
   so no conversion knob changes any click, history or click probability.

Samples are the impressions of users with at least `min_history` earlier clicks. The same rows
carry the true probabilities p and q, which is what the oracle is computed from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.simulate.config import SimulationConfig
from models.simulate.world import ConversionBias, World, draw_conversion_bias, noise, normalise


@dataclass
class BehaviorLog:
    """All impressions that became samples, plus every user's click sequence."""

    user: np.ndarray  # [S] int64 user number
    item: np.ndarray  # [S] int64 target item number
    label: np.ndarray  # [S] int64 0/1
    prob: np.ndarray  # [S] float64 true click probability
    conversion_prob: np.ndarray  # [S] float64 true P(conversion | click), on every row
    conversion: np.ndarray  # [S] int64 0/1, 0 wherever label is 0
    n_hist: np.ndarray  # [S] int64 clicks before the impression (history = last min(n, L))
    ts: np.ndarray  # [S] int64 unix seconds of the impression
    clicks: np.ndarray  # [U, E] int64 clicked items in order (-1 past n_clicks)
    click_ts: np.ndarray  # [U, E] int64 unix seconds of each click
    n_clicks: np.ndarray  # [U] int64
    interests: np.ndarray  # [U, M, d] float32 interest vectors after the last step


@dataclass
class _State:
    interests: np.ndarray  # [U, M, d] drifting interest vectors
    active: np.ndarray  # [U] active interest index
    ring: np.ndarray  # [U, L, d] vectors of the last L clicks; click q lives in slot q % L
    ring_style: np.ndarray  # [U, L] their styles
    relation: np.ndarray  # [U, L, L] r between slots (1 same style, else -1/(n_styles-1)), diag 0
    n_clicks: np.ndarray  # [U]
    n_imps: np.ndarray  # [U]
    ts: np.ndarray  # [U] time of the last impression
    clicks: np.ndarray  # [U, E]
    click_ts: np.ndarray  # [U, E]


def simulate_behavior(
    world: World,
    config: SimulationConfig,
    rng: np.random.Generator,
    conversion_rng: np.random.Generator,
    on_clicks: Callable[[int], None] = lambda n: None,
    cvr_bias: ConversionBias | None = None,
) -> BehaviorLog:
    """Runs the stream until every user is done; `on_clicks(n)` reports progress.

    `rng` drives the clicks, `conversion_rng` only the conversion truth (its biases, then one
    uniform per sample), so the click data are the same whatever the conversion knobs.
    `cvr_bias`: biases drawn already (a world in parts draws them once for all its users).
    """
    if cvr_bias is None:
        cvr_bias = draw_conversion_bias(world, config, conversion_rng)
    state = _initial_state(world, config, rng)
    records: list[tuple[np.ndarray, ...]] = []
    every = np.arange(config.n_users)
    while True:
        live = (state.n_clicks < config.events_per_user) & (
            state.n_imps < config.max_impressions_per_user
        )
        if not live.any():
            break
        users = every if live.all() else np.flatnonzero(live)
        record, n_new = _step(state, world, cvr_bias, config, rng, users)
        records.append(record)
        on_clicks(n_new)
    return _collect(records, state, conversion_rng)


def relation_strength(cos: np.ndarray, threshold: float) -> np.ndarray:
    """g(c) = clip((c − τ) / (1 − τ), 0, 1): 0 for unrelated items, 1 for identical ones."""
    return np.clip((cos - threshold) / (1.0 - threshold), 0.0, 1.0).astype(np.float32)


def true_logit(
    ring: np.ndarray,
    relation: np.ndarray,
    n: np.ndarray,
    target: np.ndarray,
    config: SimulationConfig,
) -> np.ndarray:
    """The history part of ℓ: attention_weight · attention + pair_strength · pairs.

    ring [A, L, d] and relation [A, L, L] are ring buffers (click q in slot q % L), n [A] is the
    number of clicks so far and target [A, d] the target vectors. Returns [A] float64.
    """
    size = ring.shape[1]
    s = np.einsum("ald,ad->al", ring, target)  # [A, L] target similarity per slot (float32)
    slots = np.arange(size)
    valid = slots[None, :] < n[:, None]  # [A, L]
    age = (n[:, None] - 1 - slots[None, :]) % size  # [A, L] clicks since that slot's click
    recency = (age * np.float32(-1.0 / config.recency_scale)).astype(np.float32)
    attn = np.where(valid, np.float32(config.attention_sharpness) * s + recency, -np.inf)
    top = np.max(attn, axis=1, keepdims=True)  # -inf for a user without history
    attn -= np.where(np.isfinite(top), top, 0.0)  # stable softmax
    weights = np.exp(attn)  # [A, L], 0 where invalid
    attention = (weights * s).sum(1) / np.maximum(weights.sum(1), 1e-30)  # [A], 0 if no history
    support = relation_strength(s, config.relation_threshold) * np.exp(recency) * valid
    pairs = 0.5 * (np.einsum("alm,am->al", relation, support) * support).sum(1)  # [A]
    return config.attention_weight * attention + config.pair_strength * np.arcsinh(pairs)


def style_commitment(
    ring_style: np.ndarray, n: np.ndarray, style: np.ndarray, config: SimulationConfig
) -> np.ndarray:
    """m(h, y) − 1 / n_styles of the conversion truth, [A] float64 (0 without history).

    ring_style [A, L] holds the styles of the last L clicks (click q in slot q % L), n [A] is
    the number of clicks so far and style [A] the target styles.
    """
    size = ring_style.shape[1]
    table, total = _recency_weights(size, config.cvr_recency_scale)
    key = np.where(n < size, n, size + n % size)
    same = np.where(ring_style == style[:, None], table[key], 0.0)  # [A, L]
    share = same.sum(1) / np.maximum(total[key], 1e-300)
    return np.where(n > 0, share - 1.0 / config.n_styles, 0.0)


@functools.lru_cache(maxsize=8)
def _recency_weights(size: int, recency_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """ω of every ring slot, [2L, L], and their sums, [2L], by key = n if n < L else L + n % L.

    The weights only depend on n through that key, so a table lookup replaces computing ages
    and exponentials for every user at every step (halves the cost of the term).
    """
    key = np.arange(2 * size)
    slots = np.arange(size)
    age = (key[:, None] - 1 - slots[None, :]) % size  # for key >= L, n ≡ key (mod L)
    valid = slots[None, :] < key[:, None]  # every slot once the ring is full (key >= L)
    table = np.exp(-age / recency_scale) * valid
    table.setflags(write=False)  # shared by every call through the cache
    return table, table.sum(1)


def conversion_logit(
    bias_u: np.ndarray,
    bias_i: np.ndarray,
    match: np.ndarray,
    commitment: np.ndarray,
    config: SimulationConfig,
) -> np.ndarray:
    """ℓ_cvr from c_u, c_i, cos(w_{u,z}, v_i) and `style_commitment`, [A] float64."""
    return (
        config.cvr_base_logit
        + bias_u.astype(np.float64)
        + bias_i.astype(np.float64)
        + config.cvr_interest_weight * match.astype(np.float64)
        + config.cvr_style_weight * commitment
    )


def _initial_state(world: World, config: SimulationConfig, rng: np.random.Generator) -> _State:
    u, size, e = config.n_users, config.history_len, config.events_per_user
    return _State(
        interests=world.interests.copy(),
        active=_draw_interest(world.weights, rng),
        ring=np.zeros((u, size, config.dim), dtype=np.float32),
        ring_style=np.full((u, size), -1, dtype=np.int64),
        relation=np.zeros((u, size, size), dtype=np.float32),
        n_clicks=np.zeros(u, dtype=np.int64),
        n_imps=np.zeros(u, dtype=np.int64),
        # Users start at different times within a week, so timestamps interleave across users.
        ts=config.start_ts + rng.integers(0, 7 * 86400, u),
        clicks=np.full((u, e), -1, dtype=np.int64),
        click_ts=np.zeros((u, e), dtype=np.int64),
    )


def _draw_interest(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of the [A, M] mixture weights."""
    cdf = np.cumsum(weights, axis=1)
    drawn = (rng.random((weights.shape[0], 1)) * cdf[:, -1:] > cdf).sum(1)
    return np.minimum(drawn, weights.shape[1] - 1)


def _step(
    st: _State,
    world: World,
    cvr_bias: ConversionBias,
    config: SimulationConfig,
    rng: np.random.Generator,
    users: np.ndarray,
) -> tuple[tuple[np.ndarray, ...], int]:
    """One impression for each of `users`; returns the sample record and the number of clicks."""
    a = len(users)
    # A slice when every user is live: the big per-user state is then read as views, not copied.
    rows: np.ndarray | slice = slice(None) if a == config.n_users else users
    interests = normalise(
        st.interests[rows]
        + config.drift_rate * noise(rng, (a, config.interests_per_user, config.dim))
    )
    st.interests[rows] = interests
    switch = rng.random(a) >= config.interest_stickiness
    active = np.where(switch, _draw_interest(world.weights[rows], rng), st.active[rows])
    st.active[rows] = active
    active_vec = interests[np.arange(a), active]  # [A, d]
    n = st.n_clicks[rows].copy()  # a view under a slice, and clicks update it below
    item = _expose(st, world, config, rng, users, active_vec)
    target = world.item_vec[item]  # [A, d]
    match = (active_vec * target).sum(1)  # cos(w_{u,z}, v_i), float32
    logit = (
        config.base_logit
        + world.user_bias[rows]
        + world.item_bias[item]
        + config.interest_weight * match
        + true_logit(st.ring[rows], st.relation[rows], n, target, config)
    )
    prob = 1.0 / (1.0 + np.exp(-logit))
    commitment = style_commitment(st.ring_style[rows], n, world.item_style[item], config)
    cvr_logit = conversion_logit(
        cvr_bias.user[rows], cvr_bias.item[item], match, commitment, config
    )
    cvr_prob = 1.0 / (1.0 + np.exp(-cvr_logit))
    label = rng.random(a) < prob
    ts = st.ts[rows] + 1 + np.floor(rng.exponential(config.mean_gap_s, a)).astype(np.int64)
    st.ts[rows] = ts
    st.n_imps[rows] += 1
    keep = n >= config.min_history
    record = (
        users[keep],
        item[keep],
        label[keep].astype(np.int64),
        prob[keep],
        n[keep],
        ts[keep],
        cvr_prob[keep],
    )
    _append_clicks(st, world, config, users[label], item[label], ts[label])
    return record, int(label.sum())


def _expose(
    st: _State,
    world: World,
    config: SimulationConfig,
    rng: np.random.Generator,
    users: np.ndarray,
    active_vec: np.ndarray,
) -> np.ndarray:
    """The logging policy's item for each user (see step 2 of the module docstring)."""
    a = len(users)
    n = st.n_clicks[users]
    window = np.minimum(n, config.history_len)
    back = np.floor(rng.random(a) * np.maximum(window, 1)).astype(np.int64)
    past = st.clicks[users, np.maximum(n - 1 - back, 0)]  # [A], -1 when there is no click
    interest_cat = world.nearest_categories(active_vec)
    choice = rng.random(a)
    use_history = (choice >= config.exposure_interest) & (n > 0)
    cats = np.where(use_history, world.item_cat[np.maximum(past, 0)], interest_cat)
    by_category = world.items_in_categories(cats, rng)
    popular = world.popular_items(a, rng)
    uniform = rng.integers(0, config.n_items, a)
    cut_cat = config.exposure_interest + config.exposure_history
    cut_pop = cut_cat + config.exposure_popular
    return np.where(choice < cut_cat, by_category, np.where(choice < cut_pop, popular, uniform))


def _append_clicks(
    st: _State,
    world: World,
    config: SimulationConfig,
    users: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
) -> None:
    """Puts each click in its ring slot and refreshes that slot's row/column of relations."""
    size = config.history_len
    n = st.n_clicks[users]
    slot = n % size
    style = world.item_style[item]  # [C]
    st.ring[users, slot] = world.item_vec[item]
    st.ring_style[users, slot] = style
    same = st.ring_style[users] == style[:, None]  # [C, L]; empty slots hold style -1
    rel = np.where(same, 1.0, -1.0 / max(config.n_styles - 1, 1)).astype(np.float32)
    rel[np.arange(len(users)), slot] = 0.0
    st.relation[users, slot, :] = rel
    st.relation[users, :, slot] = rel
    st.clicks[users, n] = item
    st.click_ts[users, n] = ts
    st.n_clicks[users] = n + 1


def _collect(
    records: list[tuple[np.ndarray, ...]], st: _State, conversion_rng: np.random.Generator
) -> BehaviorLog:
    """Concatenates the per-step records, orders them by user, then time, and draws the
    conversions (one uniform per sample in that order, so they do not depend on the steps)."""
    cols = [np.concatenate([r[i] for r in records]) for i in range(7)]
    order = np.argsort(cols[0], kind="stable")  # steps were appended in time order
    user, item, label, prob, n_hist, ts, cvr_prob = (c[order] for c in cols)
    converted = (conversion_rng.random(len(label)) < cvr_prob) & (label == 1)
    return BehaviorLog(
        user=user,
        item=item,
        label=label,
        prob=prob,
        conversion_prob=cvr_prob,
        conversion=converted.astype(np.int64),
        n_hist=n_hist,
        ts=ts,
        clicks=st.clicks,
        click_ts=st.click_ts,
        n_clicks=st.n_clicks,
        interests=st.interests,
    )
