"""Locust scenario for the benchmark peer (loadtest/triton/server.py): the same slates as
loadtest/locustfile.py, sent to Triton's KServe-v2 `infer` endpoint as index tensors.

Triton has no behaviour store, so each request carries the user's history inline, padded
with PAD to exactly `--ctr-history` items (Triton batches only equal shapes; PAD slots are
what the model sees for a shorter history anyway). The client maps the ids with the model's
own vocabularies, cached per user, so the peer's work is the model call and its batching.
Shares the options, the population and the stepped shape with the service scenario.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from locust import events, task

from loadtest.locustfile import SCORE, PacedUser, SteppedLoad, classify, options
from loadtest.population import parse_range
from runtime.features import PAD, FeatureSpec, Vocabulary
from runtime.feeds import encode_pairs

__all__ = ["SteppedLoad", "TritonUser"]  # PacedUser is abstract: locust skips it
_VOCABS: dict[str, dict[str, Vocabulary]] = {}


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument(
        "--ctr-model-dir",
        default="",
        env_var="CTR_LT_MODEL_DIR",
        help="model version directory (its vocabularies) [CTR_LT_MODEL_DIR]",
    )
    parser.add_argument(
        "--ctr-triton-model",
        default="ctr",
        env_var="CTR_LT_TRITON_MODEL",
        help="Triton model name [CTR_LT_TRITON_MODEL]",
    )


def _tensor(name: str, values: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "shape": [1, len(values)],
        "datatype": "INT64",
        "data": [int(v) for v in values],
    }


class TritonUser(PacedUser):
    """One client of the Triton peer; one request = one user's slate."""

    def on_start(self) -> None:
        super().on_start()
        opts = options(self.environment)
        directory = str(opts.ctr_model_dir)
        if directory not in _VOCABS:
            _VOCABS[directory] = FeatureSpec.load(Path(directory))[1]
        self.vocabs = _VOCABS[directory]
        self.length = parse_range(opts.ctr_history)[1]
        self.path = f"/v2/models/{opts.ctr_triton_model}/infer"
        self._histories: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _history(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        if user not in self._histories:
            items, cats = encode_pairs(self.sampler.history(user, self.length), self.vocabs)
            padded = np.full((2, self.length), PAD, dtype=np.int64)  # [2, L]
            padded[0, : len(items)], padded[1, : len(cats)] = items, cats
            self._histories[user] = (padded[0], padded[1])
        return self._histories[user]

    @task
    def score(self) -> None:
        user = self.sampler.user()
        k = max(1, self.draw(self.slate))
        items, cats = encode_pairs(self.sampler.candidates(k), self.vocabs)
        hist_items, hist_cats = self._history(user)
        user_index = self.vocabs["user"].encode([user]) if "user" in self.vocabs else [1]
        body = {
            "inputs": [
                _tensor("user", np.asarray(user_index)),
                _tensor("hist_items", hist_items),
                _tensor("hist_cats", hist_cats),
                _tensor("cand_items", items),
                _tensor("cand_cats", cats),
            ],
            "outputs": [{"name": "scores"}],
        }
        # Reported under the scoring name so the step statistics and the report read the same.
        with self.client.post(self.path, json=body, name=SCORE, catch_response=True) as resp:
            classify(resp, 200, lambda answer: len(answer["outputs"][0]["data"]) == k)
