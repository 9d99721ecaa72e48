"""The static part of the world: categories, items, users and the train/test user split.

* Category centres are random unit vectors in R^dim.
* Item i has a category (every category gets at least one item), a unit content vector
  v_i = normalise(centre[cat_i] + item_spread · ε), a style y_i drawn uniformly from
  `n_styles` styles independently of the category, an exposure popularity (Zipf over a random
  ranking) and a logit bias b_i that is correlated with log popularity.
* User u has `interests_per_user` interests anchored at distinct random categories,
  w_{u,m} = normalise(centre[k_m] + interest_spread · ε), Dirichlet mixture weights over them,
  and a logit bias b_u. Here ε ~ N(0, I/dim), so ‖ε‖ ≈ 1 and the spreads are noise norms.
* The conversion biases c_i (correlated with b_i) and c_u are a separate `ConversionBias`,
  drawn from the conversion stream, not from the world's: see `models.simulate.behavior`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from models.simulate.config import SimulationConfig


@dataclass
class World:
    """Arrays indexed by dense item, category and user numbers (ids are made later)."""

    centers: np.ndarray  # [C, d] float32 unit category centres
    item_cat: np.ndarray  # [N] int64 category of each item
    item_vec: np.ndarray  # [N, d] float32 unit item vectors
    item_pop: np.ndarray  # [N] float64 exposure probabilities (sum 1)
    item_bias: np.ndarray  # [N] float32 logit bias
    item_style: np.ndarray  # [N] int64 style of each item (brand, price tier, look)
    cat_order: np.ndarray  # [N] item numbers sorted by category
    cat_start: np.ndarray  # [C + 1] start of each category's block in cat_order
    interests: np.ndarray  # [U, M, d] float32 unit interest vectors at time 0
    weights: np.ndarray  # [U, M] float64 mixture weights (rows sum to 1)
    user_bias: np.ndarray  # [U] float32 logit bias
    is_test: np.ndarray  # [U] bool, the test users

    def items_in_categories(self, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly drawn item of each category in `cats` (any shape)."""
        start = self.cat_start[cats]
        count = self.cat_start[cats + 1] - start
        offset = np.floor(rng.random(cats.shape) * count).astype(np.int64)
        return self.cat_order[start + offset]

    def popular_items(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n items drawn with probability proportional to their exposure popularity."""
        cdf = np.cumsum(self.item_pop)
        drawn = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
        return np.minimum(drawn, len(cdf) - 1)

    def for_users(self, users: np.ndarray) -> World:
        """The same items, only `users` (renumbered 0..len(users)-1): a part of the world."""
        return replace(
            self,
            interests=self.interests[users],
            weights=self.weights[users],
            user_bias=self.user_bias[users],
            is_test=self.is_test[users],
        )

    def nearest_categories(self, vecs: np.ndarray) -> np.ndarray:
        """Category whose centre is closest (cosine) to each vector of [..., d]."""
        return np.argmax(np.einsum("...d,cd->...c", vecs, self.centers), axis=-1)


@dataclass
class ConversionBias:
    """The conversion truth's logit biases (see step 5 of `models.simulate.behavior`)."""

    item: np.ndarray  # [N] float64 c_i
    user: np.ndarray  # [U] float64 c_u

    def for_users(self, users: np.ndarray) -> ConversionBias:
        return ConversionBias(item=self.item, user=self.user[users])


def draw_conversion_bias(
    world: World, config: SimulationConfig, rng: np.random.Generator
) -> ConversionBias:
    """c_i = std · (ρ · b̃_i + √(1 − ρ²) · η_i) and c_u = std · ζ_u, from `rng` only."""
    b = world.item_bias.astype(np.float64)
    spread = float(b.std())
    # Standardised so that corr(c, b) is ρ whatever item_bias_std is; no spread, no correlation.
    b_std = (b - b.mean()) / spread if spread > 0 else np.zeros_like(b)
    rho = config.cvr_item_bias_corr
    eta = rng.standard_normal(len(b))
    item = config.cvr_item_bias_std * (rho * b_std + np.sqrt(1.0 - rho**2) * eta)
    user = config.cvr_user_bias_std * rng.standard_normal(len(world.user_bias))
    return ConversionBias(item=item, user=user)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows of x scaled to unit L2 norm (float32)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """ε ~ N(0, I/d) over the last axis, so that ‖ε‖ ≈ 1 whatever d is."""
    return rng.standard_normal(shape) / np.sqrt(shape[-1])


def build_world(config: SimulationConfig, rng: np.random.Generator) -> World:
    """Draws the static world from `rng` (deterministic given its state)."""
    n, c, d = config.n_items, config.n_categories, config.dim
    centers = normalise(rng.standard_normal((c, d)))
    # The first C items cover every category once, so that no category is empty.
    item_cat = np.concatenate([np.arange(c), rng.integers(0, c, n - c)]).astype(np.int64)
    item_vec = normalise(centers[item_cat] + config.item_spread * noise(rng, (n, d)))
    item_pop, item_bias = _popularity(config, rng)
    # The style is independent of the category; the pair term relates history items through
    # it (see models.simulate.behavior).
    item_style = rng.integers(0, config.n_styles, n)
    cat_order = np.argsort(item_cat, kind="stable")
    cat_start = np.searchsorted(item_cat[cat_order], np.arange(c + 1))
    interests, weights, user_bias = _users(config, centers, rng)
    return World(
        centers=centers,
        item_cat=item_cat,
        item_vec=item_vec,
        item_pop=item_pop,
        item_bias=item_bias,
        item_style=item_style,
        cat_order=cat_order,
        cat_start=cat_start,
        interests=interests,
        weights=weights,
        user_bias=user_bias,
        is_test=_test_users(config, rng),
    )


def _popularity(
    config: SimulationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    n = config.n_items
    rank = rng.permutation(n)
    pop = (rank + 1.0) ** -config.popularity_exponent
    pop /= pop.sum()
    log_pop = np.log(pop)
    z = (log_pop - log_pop.mean()) / max(float(log_pop.std()), 1e-12)
    # Popular items are somewhat better (0.6 of the bias variance is popularity), not entirely:
    # a popularity-only score must stay below the oracle.
    quality = 0.6 * z + 0.8 * rng.standard_normal(n)
    return pop, (config.item_bias_std * quality).astype(np.float32)


def _users(
    config: SimulationConfig, centers: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, m, d = config.n_users, config.interests_per_user, config.dim
    # m distinct categories per user: the m smallest of C random keys.
    anchors = np.argsort(rng.random((u, centers.shape[0])), axis=1)[:, :m]
    interests = normalise(centers[anchors] + config.interest_spread * noise(rng, (u, m, d)))
    weights = rng.dirichlet(np.full(m, config.mixture_concentration), size=u)
    user_bias = (config.user_bias_std * rng.standard_normal(u)).astype(np.float32)
    return interests, weights, user_bias


def _test_users(config: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    n_test = min(max(1, round(config.test_fraction * config.n_users)), config.n_users - 1)
    is_test = np.zeros(config.n_users, dtype=bool)
    is_test[rng.permutation(config.n_users)[:n_test]] = True
    return is_test
