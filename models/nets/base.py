"""The contract every behaviour CTR model (SARN, FAT, baselines) implements.

A model is split into a user side and a candidate side so that serving can compute the user
side once per user and share it across that user's whole slate (DESIGN.md, "slate-shared user
side"):

* `encode_user` takes U users' histories and returns a `UserState`: a tuple of tensors whose
  leading axis is U (history embeddings, SARN's relation cube, user-field tokens, ...).
* `score_candidates` takes a `UserState` whose rows are aligned with N candidates and returns
  N logits.
* `forward_slates` is the serving signature: a ragged layout where `cand_user_index [N]` points
  each candidate to its user; the base class gathers the user side's *outputs* per candidate.
* `forward` is the pairwise training form (one candidate per user row).

Logits have one column per task, [N, T] (`models.nets.multitask`): a click model's are [N, 1]; a
multi-task model's towers (CTR, CVR) share everything up to the model's representation z, the
model's own output head is the first task's tower and every further task adds a tower of the
same shape on the same z (`_add_towers`, `_task_logits`).

Models return logits and own no optimizer or loss (STYLE.md). Models with auxiliary objectives
(SARN) override `forward_train` to return them beside the logits; the trainer adds them.
No Python control flow may depend on tensor values (the ONNX export relies on it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from models.data.batch import BehaviorBatch
from models.nets.multitask import validate_tasks

UserState = tuple[Tensor, ...]


@dataclass
class TrainOutput:
    logits: Tensor  # [B, T], one column per task
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # scalars, added to the CTR loss


class BehaviorModel(nn.Module, ABC):
    """Base class of the behaviour CTR models; see the module docstring for the contract.

    Subclasses set `config_class` (a dataclass with defaults) and take
    `(sizes, config)` in their constructor, where `sizes` maps a vocabulary name (`item`,
    `category`, `user`, `context_<name>`) to its embedding table size.
    """

    config_class: ClassVar[type[Any]]
    supports_multitask: ClassVar[bool] = True  # False: `_add_towers` gets no tower factory
    tasks: tuple[str, ...] = ("ctr",)  # set per instance by `_add_towers`

    @classmethod
    def samples_negatives(cls, config: Any) -> bool:
        """Whether training samples batch.neg_hist_items/neg_hist_cats for a model of this
        config: true where forward_train's auxiliary loss reads them (SARN's always, FAT's
        when it is on); the trainer samples negatives only then."""
        return False

    def _add_towers(self, tasks: Sequence[str], make_tower: Callable[[], nn.Module] | None) -> None:
        """The model's own head serves tasks[0]; each further task gets `make_tower()`, a
        fresh head of the same shape over the same representation (None: single-task only)."""
        self.tasks = validate_tasks(tasks)
        if len(self.tasks) > 1 and (make_tower is None or not self.supports_multitask):
            raise ValueError(f"{type(self).__name__} has no multi-task option")
        self.extra_towers = nn.ModuleDict(
            {task: make_tower() for task in self.tasks[1:] if make_tower is not None}
        )

    def _task_logits(self, z: Tensor, first: Tensor) -> Tensor:
        """The first task's logits [N] and the extra towers on z [N, ...] -> logits [N, T]."""
        towers = [tower(z) for tower in self.extra_towers.values()]
        return torch.stack([first, *towers], dim=-1)

    @abstractmethod
    def encode_user(
        self, user: Tensor, hist_items: Tensor, hist_cats: Tensor, context: Tensor
    ) -> UserState:
        """[U], [U, L], [U, L], [U, C] -> tensors with leading axis U."""

    @abstractmethod
    def score_candidates(self, state: UserState, items: Tensor, cats: Tensor) -> Tensor:
        """UserState rows aligned with the N candidates, [N], [N] -> logits [N, T]."""

    def forward_slates(
        self,
        user: Tensor,
        hist_items: Tensor,
        hist_cats: Tensor,
        context: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user_index: Tensor,
    ) -> Tensor:
        """Scores N candidates of U users: the user side runs once per user. -> logits [N, T]."""
        state = self.encode_user(user, hist_items, hist_cats, context)
        per_candidate = tuple(s.index_select(0, cand_user_index) for s in state)
        return self.score_candidates(per_candidate, cand_items, cand_cats)

    def forward(self, batch: BehaviorBatch) -> Tensor:
        """Pairwise form: row b's history scores row b's target. -> logits [B, T]."""
        state = self.encode_user(batch.user, batch.hist_items, batch.hist_cats, batch.context)
        return self.score_candidates(state, batch.items, batch.cats)

    def forward_train(self, batch: BehaviorBatch) -> TrainOutput:
        return TrainOutput(self(batch))
