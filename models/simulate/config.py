"""Every knob of the synthetic world, with its default and what it does.

The defaults were tuned so that the behaviour stream has a CTR near 0.40 and an oracle
(true-probability) test AUC near 0.80, of which the relational pair term is a large part
(without it the observable truth drops from ~0.77 to ~0.70 AUC); and so that slates have a CTR
near 0.15 and an oracle AUC near 0.82, against ~0.65 for item relevance alone and ~0.78 for
relevance times the position bias (the rest is satisfaction and competition inside a slate).

The conversion knobs were tuned (2000 users, seed 0; 20000 users agree within 0.01) so that
P(conversion | click) is ~0.15 (~0.06 conversions per impression) and the oracle CVR AUC, q
against the conversions of clicked test rows, is ~0.77, of which the history style term is a
large part (without it ~0.70, and the CVR drops to ~0.12); the CTCVR oracle AUC (p · q
against conversions over all test impressions) is ~0.83. q and p correlate at ~0.25 over
impressions (they share the item bias through ρ and the active-interest match).

The truth functions the weights enter are written out in `models.simulate.behavior` and
`models.simulate.slates`.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.features import DEFAULT_HISTORY_LEN


@dataclass
class SimulationConfig:
    """Configuration of `simulate_world`; same config and seed -> identical files."""

    # --- size and seed -------------------------------------------------------------------
    n_users: int = 5000
    n_items: int = 2000
    seed: int = 0
    parts: int = 1  # > 1: users simulated and written in this many groups (`parts.py`)
    n_categories: int = 50
    dim: int = 16  # latent dimension of items, categories and interests

    # --- items ---------------------------------------------------------------------------
    item_spread: float = 0.5  # noise norm around the category centre (cos to centre ~0.89)
    popularity_exponent: float = 1.0  # Zipf exponent of the exposure popularity
    item_bias_std: float = 0.4  # std of the item's logit bias (correlated with popularity)
    n_styles: int = 4  # item styles; two history items are related when they share one

    # --- users ---------------------------------------------------------------------------
    interests_per_user: int = 3  # latent interests, each anchored at a distinct category
    interest_spread: float = 0.5  # noise norm of an interest around its category centre
    mixture_concentration: float = 2.0  # Dirichlet concentration of the interest weights
    interest_stickiness: float = 0.7  # P(the active interest stays active at the next step)
    drift_rate: float = 0.04  # norm of the per-step random walk of every interest vector
    user_bias_std: float = 0.3  # std of the user's logit bias

    # --- behaviour stream ------------------------------------------------------------------
    events_per_user: int = 50  # clicks per user (rows of events.parquet per user)
    max_impressions_per_user: int = 400  # stops a user with a very low CTR
    history_len: int = DEFAULT_HISTORY_LEN  # history in the samples (last clicks) and the truth
    min_history: int = 1  # samples with fewer earlier clicks are not written
    exposure_interest: float = 0.45  # P(shown item is from the active interest's category)
    exposure_history: float = 0.15  # P(shown item shares the category of a past click)
    exposure_popular: float = 0.2  # P(popularity-weighted item); the rest is uniform

    # --- behaviour truth (see models.simulate.behavior) ------------------------------------
    base_logit: float = -2.2
    interest_weight: float = 1.2  # x cos(active interest, target)
    attention_weight: float = 2.0  # x target-attentive, recency-weighted history match
    attention_sharpness: float = 8.0  # kappa of the attention softmax over history items
    recency_scale: float = 15.0  # clicks; history weight decays as exp(-age / recency_scale)
    pair_strength: float = 3.0  # x asinh(style-signed sum over supporting history pairs)
    relation_threshold: float = 0.4  # target cosine below which an item gives no support

    # --- conversion truth, P(conversion | click) (see models.simulate.behavior) ------------
    cvr_base_logit: float = -2.9
    cvr_item_bias_std: float = 0.6  # std of the item's conversion logit bias c_i
    cvr_item_bias_corr: float = 0.5  # correlation of c_i with the item's click bias b_i
    cvr_user_bias_std: float = 0.4  # std of the user's conversion logit bias c_u
    cvr_interest_weight: float = 1.0  # x cos(active interest, target)
    cvr_style_weight: float = 4.5  # x (history share of the target's style - 1 / n_styles)
    cvr_recency_scale: float = 5.0  # clicks; the style share's weights exp(-age / scale)

    # --- slate sessions (see models.simulate.slates) ---------------------------------------
    slate_size: int = 10  # K
    sessions_per_user: int = 2
    slates_per_session: int = 10  # S
    slate_exposure_interest: float = 0.5  # P(slot item is from one of the user's interests)
    slate_exposure_session: float = 0.2  # P(slot item shares the category of a session click)
    slate_exposure_popular: float = 0.15  # the rest is uniform
    slate_base_logit: float = -1.8
    slate_interest_weight: float = 2.0  # x max over interests of cos(interest, item)
    session_weight: float = 2.0  # x cos(mean of items clicked in earlier slates, item)
    position_decay: float = 0.5  # examination at position k (0-based) is (1 + k) ** -decay
    satisfaction: float = 0.5  # examination factor per click higher up in the same slate
    competition_strength: float = 2.0  # logit penalty for a near-duplicate shown higher up
    competition_threshold: float = 0.6  # cosine above which two slate items compete

    # --- split, time and evaluation --------------------------------------------------------
    test_fraction: float = 0.2  # fraction of users (not rows) in the test split
    slate_eval_fraction: float = 0.2  # slate metrics use the last 20% of slates of a session
    start_ts: int = 1_700_000_000  # unix seconds of the earliest possible event
    mean_gap_s: float = 90.0  # mean seconds between two impressions of a user

    def validate(self) -> None:
        """Raises ValueError on a config the simulator cannot run."""
        positive = (
            "n_users",
            "n_items",
            "n_categories",
            "dim",
            "n_styles",
            "interests_per_user",
            "events_per_user",
            "history_len",
            "slate_size",
            "sessions_per_user",
            "slates_per_session",
            "parts",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_items < self.n_categories:
            raise ValueError("n_items must be >= n_categories (every category needs an item)")
        if self.interests_per_user > self.n_categories:
            raise ValueError("interests_per_user must be <= n_categories")
        if self.slates_per_session < 2:
            raise ValueError("slates_per_session must be >= 2 (context plus evaluated slates)")
        if self.parts > self.n_users:
            raise ValueError(f"parts ({self.parts}) must be at most n_users ({self.n_users})")
        if not 0.0 < self.test_fraction < 1.0 or self.n_users < 2:
            raise ValueError("need 0 < test_fraction < 1 and at least two users")
        for a, b, c in (
            (self.exposure_interest, self.exposure_history, self.exposure_popular),
            (
                self.slate_exposure_interest,
                self.slate_exposure_session,
                self.slate_exposure_popular,
            ),
        ):
            if min(a, b, c) < 0 or a + b + c > 1:
                raise ValueError("exposure probabilities must be >= 0 and sum to at most 1")
        if not 0.0 < self.satisfaction <= 1.0 or not 0.0 <= self.interest_stickiness <= 1.0:
            raise ValueError("satisfaction must be in (0, 1], interest_stickiness in [0, 1]")
        self._validate_conversion()

    def _validate_conversion(self) -> None:
        if not -1.0 <= self.cvr_item_bias_corr <= 1.0:
            raise ValueError(
                f"cvr_item_bias_corr must be in [-1, 1], got {self.cvr_item_bias_corr}"
            )
        if min(self.cvr_item_bias_std, self.cvr_user_bias_std) < 0:
            raise ValueError("cvr_item_bias_std and cvr_user_bias_std must be >= 0")
        if not self.cvr_recency_scale > 0:
            raise ValueError(f"cvr_recency_scale must be > 0, got {self.cvr_recency_scale}")
