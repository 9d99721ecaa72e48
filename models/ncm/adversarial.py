"""`ncm-adv`: AdvNCM, the NCM generator plus a relativistic slate discriminator (§3.5).

Discriminator (as in Sim4Rec `adversarial.py`): GRU over [e_k (detached) ; click_k] (input
E+1, hidden E, h₀ = u_t detached), masked mean over the slate, MLP(E→10 SELU→1); the score of
a slate pair is D(real) − D(fake).

Decisions:

* [proposal] The generator is our NCM (readout and teacher-forcing schedule included) rather
  than Sim4Rec's slate-wise GRU, so `ncm-adv` differs from `ncm` by the adversarial terms only,
  and its free-running readouts *are* the generated click sequence.
* Gradients are zeroed correctly: the trainer clears them every step (the authors' loops never
  call `zero_grad`, §3.5 ⚠). The discriminator loss reaches the discriminator only (it sees
  detached generator samples); the supervised BCE and the generator's adversarial loss reach
  the generator only (the adversarial loss runs the discriminator with detached parameters,
  `torch.func.functional_call`), and both update it: their gradients add on the same generator
  parameters. So one backward of the sum equals a discriminator step on its loss plus a
  generator step on BCE + adversarial loss (`tests/test_ncm_models.py` checks both sides).
* Schedule scaled to short runs: supervised BCE always; discriminator loss
  BCE(D_real − D_fake, 1) on hard samples from epoch `disc_start_epoch` (authors: 10);
  generator loss BCE(D_fake − D_real, 1) on relaxed samples with detached embeddings from epoch
  `gen_start_epoch` (authors: 20), weighted `adv_weight` = 0.1 in place of the authors' ten
  times smaller learning rate. (The authors' BCE(1 − (D_real − D_fake), 1) pushes the same way,
  shifted by a constant; we use the standard relativistic form.)
* The discriminator is training-only: `forward` (and so the export) is NCM's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from models.ncm.data import SlateBatch
from models.ncm.readout import NCM, NCMConfig
from models.nets.base import TrainOutput
from models.nets.layers import masked_mean

Critic = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class AdvNCMConfig(NCMConfig):
    disc_start_epoch: int = 1
    gen_start_epoch: int = 2
    adv_weight: float = 0.1
    disc_hidden: int = 10


class SlateDiscriminator(nn.Module):
    """emb [N,K,E], clicks [N,K], user [N,E], mask [N,K] -> realism score [N] per slate."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(dim + 1, dim, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SELU(), nn.Linear(hidden, 1))

    def forward(self, emb: Tensor, clicks: Tensor, user: Tensor, mask: Tensor) -> Tensor:
        states, _ = self.gru(torch.cat([emb, clicks.unsqueeze(-1)], -1), user.unsqueeze(0))
        score: Tensor = self.mlp(masked_mean(states, mask)).squeeze(-1)
        return score


class AdvNCM(NCM):
    """NCM trained with an extra relativistic adversarial objective; inference is NCM's."""

    config_class = AdvNCMConfig

    def __init__(self, sizes: dict[str, int], config: AdvNCMConfig | None = None) -> None:
        super().__init__(sizes, config)
        self.discriminator = SlateDiscriminator(self.config.dim, self.config.disc_hidden)

    def forward_train(self, batch: SlateBatch, epoch: int) -> TrainOutput:
        out = super().forward_train(batch, epoch)
        cfg = self.config
        if epoch < cfg.disc_start_epoch:
            return out
        emb, user, _ = self.inputs(batch.items, batch.cats, batch.mask, batch.hist_clicks)
        emb, user = emb.detach(), user.detach()  # adversarial terms never move the embeddings
        aux = {"disc": self._discriminator_loss(emb, user, batch)}
        if epoch >= cfg.gen_start_epoch:
            aux["gen_adv"] = cfg.adv_weight * self._generator_loss(emb, user, batch)
        return TrainOutput(out.logits, aux)

    def _discriminator_loss(self, emb: Tensor, user: Tensor, batch: SlateBatch) -> Tensor:
        with torch.no_grad():  # hard generated clicks; no gradient back to the generator
            _, fake = self.unroll(emb, user, batch.mask, "sample", torch.rand_like(batch.clicks))
        gap = self._relativistic(self.discriminator, emb, user, batch, fake)
        return _bce_to_one(gap, batch)

    def _generator_loss(self, emb: Tensor, user: Tensor, batch: SlateBatch) -> Tensor:
        _, fake = self.unroll(emb, user, batch.mask, "relaxed", torch.rand_like(batch.clicks))
        frozen = {n: p.detach() for n, p in self.discriminator.named_parameters()}

        def critic(e: Tensor, c: Tensor, u: Tensor, m: Tensor) -> Tensor:
            out: Tensor = functional_call(self.discriminator, frozen, (e, c, u, m))
            return out

        gap = self._relativistic(critic, emb, user, batch, fake)
        return _bce_to_one(-gap, batch)

    @staticmethod
    def _relativistic(
        critic: Critic, emb: Tensor, user: Tensor, batch: SlateBatch, fake: Tensor
    ) -> Tensor:
        """D(real) − D(fake) per slate, [B·S]."""
        b, s, k, e = emb.shape
        flat_emb, flat_user = emb.reshape(b * s, k, e), user.reshape(b * s, e)
        flat_mask = batch.mask.reshape(b * s, k)
        real_score = critic(flat_emb, batch.clicks.reshape(b * s, k), flat_user, flat_mask)
        fake_score = critic(flat_emb, fake.reshape(b * s, k), flat_user, flat_mask)
        gap: Tensor = real_score - fake_score
        return gap


def _bce_to_one(logit: Tensor, batch: SlateBatch) -> Tensor:
    """Mean BCE(logit, 1) over slates with at least one target position, [B·S] -> scalar."""
    slate_real = batch.target.reshape(logit.shape[0], -1).any(-1).to(logit.dtype)  # [B·S]
    per_slate = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit), reduction="none")
    return (per_slate * slate_real).sum() / slate_real.sum().clamp_min(1.0)
