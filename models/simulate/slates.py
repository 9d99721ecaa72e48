"""Slate sessions and their ground truth: the effects only a slate-aware click model can learn.

Every user has `sessions_per_user` sessions of S = `slates_per_session` slates of K =
`slate_size` items, shown after the behaviour stream (the interests are the drifted ones).
All sessions advance in lockstep, slate by slate, and position by position inside a slate.

**Composition** (the logging policy): each slot independently holds, with probability
`slate_exposure_interest`, a random item of the category nearest to one of the user's
interests (drawn by the mixture weights); with `slate_exposure_session`, an item of the
category of an item clicked in an earlier slate of the session (falling back to an interest);
with `slate_exposure_popular`, a popular item; otherwise a uniform one. Slots are drawn
independently of the position, so position effects are not confounded with relevance. A
repeated item within a slate is replaced by a uniform one.

**Click at position k (0-based) of slate t**, c ~ Bernoulli(p) with the TRUE probability

    p_{t,k} = e_{t,k} · σ(α_{t,k})
    e_{t,k} = (1 + k) ** −position_decay · satisfaction ** (clicks at positions < k in slate t)
    α_{t,k} = slate_base_logit + b_u + b_i
              + slate_interest_weight · max_m cos(w_{u,m}, v_i)
              + session_weight · cos(mean of v over items clicked in slates < t, v_i)
              − competition_strength · max_{k' < k} g(cos(v_{k'}, v_i))

with g(c) = clip((c − τ_c) / (1 − τ_c), 0, 1), τ_c = `competition_threshold`; the session
term is 0 before the first click of the session. So: **position bias** (examination falls
with k), **satisfaction** (a click lowers the examination of everything below it),
**session state** (clicks in earlier slates shift the user towards what they clicked; this is
the u_t of the NCM family) and **competition** (a near-duplicate shown higher up makes an item
less attractive). The first two and the last depend on the other items and clicks of the same
slate, which a model that scores items one at a time cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.simulate.config import SimulationConfig
from models.simulate.world import World, normalise


@dataclass
class SlateLog:
    """All sessions, session q belonging to user q // sessions_per_user."""

    items: np.ndarray  # [Q, S, K] int64 item numbers in display order
    clicks: np.ndarray  # [Q, S, K] int64 0/1
    probs: np.ndarray  # [Q, S, K] float64 true click probabilities


def position_bias(config: SimulationConfig) -> np.ndarray:
    """Examination probability of each position before any click: (1 + k) ** −decay, [K]."""
    return (1.0 + np.arange(config.slate_size)) ** -config.position_decay


def simulate_slates(
    world: World, config: SimulationConfig, interests: np.ndarray, rng: np.random.Generator
) -> SlateLog:
    """Runs every session; `interests` [U, M, d] are the users' current interest vectors."""
    q = config.n_users * config.sessions_per_user
    s, k = config.slates_per_session, config.slate_size
    user = np.arange(q) // config.sessions_per_user
    interest_cats = world.nearest_categories(interests)[user]  # [Q, M]
    items = np.zeros((q, s, k), dtype=np.int64)
    clicks = np.zeros((q, s, k), dtype=np.int64)
    probs = np.zeros((q, s, k), dtype=np.float64)
    clicked_sum = np.zeros((q, config.dim), dtype=np.float32)  # sum of clicked item vectors
    for t in range(s):
        items[:, t] = _compose(world, config, rng, user, interest_cats, items[:, :t], clicks[:, :t])
        attract = attractiveness(world, config, user, interests, items[:, t], clicked_sum)
        clicks[:, t], probs[:, t] = _click_slate(config, rng, attract)
        clicked_sum += np.einsum(
            "qk,qkd->qd", clicks[:, t].astype(np.float32), world.item_vec[items[:, t]]
        )
    return SlateLog(items=items, clicks=clicks, probs=probs)


def _compose(
    world: World,
    config: SimulationConfig,
    rng: np.random.Generator,
    user: np.ndarray,
    interest_cats: np.ndarray,
    past_items: np.ndarray,
    past_clicks: np.ndarray,
) -> np.ndarray:
    """The K items of the next slate of every session, [Q, K]."""
    q, k = len(user), config.slate_size
    pick = _draw_rows(world.weights[user], rng, k)  # [Q, K] interest per slot
    cats = np.take_along_axis(interest_cats, pick, axis=1)
    session_item = _random_clicked(past_items, past_clicks, rng, k)  # [Q, K], -1 if none
    choice = rng.random((q, k))
    use_session = (choice >= config.slate_exposure_interest) & (session_item >= 0)
    cats = np.where(use_session, world.item_cat[np.maximum(session_item, 0)], cats)
    by_category = world.items_in_categories(cats, rng)
    popular = world.popular_items(q * k, rng).reshape(q, k)
    uniform = rng.integers(0, config.n_items, (q, k))
    cut_cat = config.slate_exposure_interest + config.slate_exposure_session
    cut_pop = cut_cat + config.slate_exposure_popular
    slate = np.where(choice < cut_cat, by_category, np.where(choice < cut_pop, popular, uniform))
    replacement = rng.integers(0, config.n_items, (q, k))
    for pos in range(1, k):  # K is small; a repeat becomes a uniform item (rarely a repeat)
        repeated = (slate[:, :pos] == slate[:, pos : pos + 1]).any(axis=1)
        slate[:, pos] = np.where(repeated, replacement[:, pos], slate[:, pos])
    return slate


def _draw_rows(weights: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n categorical draws per row of the [Q, M] weights, [Q, n]."""
    cdf = np.cumsum(weights, axis=1)
    u = rng.random((weights.shape[0], n, 1)) * cdf[:, None, -1:]
    return np.minimum((u > cdf[:, None, :]).sum(-1), weights.shape[1] - 1)


def _random_clicked(
    past_items: np.ndarray, past_clicks: np.ndarray, rng: np.random.Generator, n: int
) -> np.ndarray:
    """n random items clicked in the earlier slates of each session, [Q, n]; -1 without clicks."""
    q = past_items.shape[0]
    flat_items = past_items.reshape(q, -1)
    flat_clicks = past_clicks.reshape(q, -1)
    count = flat_clicks.sum(1)  # [Q]
    rank = np.floor(rng.random((q, n)) * np.maximum(count, 1)[:, None]).astype(np.int64)
    if flat_items.shape[1] == 0:
        return np.full((q, n), -1, dtype=np.int64)
    # Position of the (rank+1)-th click in each row: first index where the cumsum exceeds rank.
    cum = np.cumsum(flat_clicks, axis=1)  # [Q, T]
    where = (cum[:, None, :] <= rank[:, :, None]).sum(-1)  # [Q, n]
    chosen = np.take_along_axis(flat_items, np.minimum(where, flat_items.shape[1] - 1), axis=1)
    return np.where(count[:, None] > 0, chosen, -1)


def attractiveness(
    world: World,
    config: SimulationConfig,
    user: np.ndarray,
    interests: np.ndarray,
    slate: np.ndarray,
    clicked_sum: np.ndarray,
) -> np.ndarray:
    """α of every slot, [Q, K] float64 (see the module docstring)."""
    vec = world.item_vec[slate]  # [Q, K, d]
    affinity = np.einsum("qkd,qmd->qkm", vec, interests[user]).max(-1)  # [Q, K]
    has_clicks = np.linalg.norm(clicked_sum, axis=1) > 0
    session = np.einsum("qkd,qd->qk", vec, normalise(clicked_sum)) * has_clicks[:, None]
    cos = np.einsum("qkd,qjd->qkj", vec, vec)  # [Q, K, K]
    span = 1.0 - config.competition_threshold
    rival = np.clip((cos - config.competition_threshold) / span, 0.0, 1.0)
    rival *= np.tril(np.ones(cos.shape[1:], dtype=bool), k=-1)  # only items shown higher up
    return (
        config.slate_base_logit
        + world.user_bias[user][:, None]
        + world.item_bias[slate]
        + config.slate_interest_weight * affinity
        + config.session_weight * session
        - config.competition_strength * rival.max(-1)
    ).astype(np.float64)


def _click_slate(
    config: SimulationConfig, rng: np.random.Generator, attract: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Clicks and true probabilities position by position (satisfaction is sequential)."""
    q, k = attract.shape
    exam = position_bias(config)
    clicks = np.zeros((q, k), dtype=np.int64)
    probs = np.zeros((q, k), dtype=np.float64)
    above = np.zeros(q, dtype=np.int64)  # clicks at earlier positions of this slate
    draws = rng.random((q, k))
    for pos in range(k):
        probs[:, pos] = exam[pos] * config.satisfaction**above / (1.0 + np.exp(-attract[:, pos]))
        clicks[:, pos] = draws[:, pos] < probs[:, pos]
        above += clicks[:, pos]
    return clicks, probs
