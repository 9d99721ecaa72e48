"""`ncm`: the Neural Click Model, a slate-wise GRU with readout of the previous click (§3.4).

Per slate, a GRUCell (hidden E, h₀ = u_t) is unrolled over the K positions (K is static, so
the exported graph is a fixed chain); y_k = Linear(E→1)(h_k).

Decisions on the [proposal]s of MODELS.md §3.4:

* Input at position k: x_k = [e_k ; r_{k−1}·e_{k−1} ; r_{k−1}] with r_{−1} = 0 (the web-search
  NCM form of Borisov et al.): the model sees *which* item above was taken as clicked, which is
  what competition between similar items needs, and r itself, which satisfaction needs.
* Readout r_k (times mask_k, so a padded position never gates the next one):
  - `soft` (default, inference): σ(y_k); deterministic, differentiable, exportable;
  - `threshold`: 1[y_k > τ], τ a logit (`threshold_logit`, 0 as in Sim4Rec);
  - `sample`: 1[y_k + ℓ_k > 0], ℓ_k = log(n_k) − log(1 − n_k) from the `noise` input n;
  - `relaxed`: σ((y_k + ℓ_k)/T), the binary-concrete sample on the logit itself.
* Training ("teacher forcing mixed with Gumbel-softmax samples"): at each position the readout
  is the true click with probability p_tf, else the relaxed sample σ((y_k + ℓ)/T), T = 0.3 (the
  benchmark's temperature). Schedule: p_tf = 1.0 at epoch 0 (0-based: the trainer's first
  epoch), linear to 0.5 at epoch `tf_anneal_epochs` (4), then held. BCE on every valid
  position (the task adds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.ncm.base import SlateConfig, SlateModel
from models.ncm.data import SlateBatch
from models.nets.base import TrainOutput

READOUT_MODES = ("soft", "threshold", "sample", "relaxed")
_NOISE_EPS = 1e-6


@dataclass
class NCMConfig(SlateConfig):
    readout: str = "soft"  # inference readout, one of READOUT_MODES
    threshold_logit: float = 0.0  # τ of the `threshold` readout
    temperature: float = 0.3  # T of the relaxed (Gumbel / binary-concrete) sample
    tf_start: float = 1.0  # teacher-forcing probability at epoch 0
    tf_end: float = 0.5  # ... and from epoch `tf_anneal_epochs` on
    tf_anneal_epochs: int = 4


def logistic_noise(uniform: Tensor) -> Tensor:
    """uniform(0, 1) -> Logistic(0, 1) = g₁ − g₂ of two Gumbels; clamped so it stays finite."""
    u = uniform.clamp(_NOISE_EPS, 1.0 - _NOISE_EPS)
    return torch.log(u) - torch.log1p(-u)


class NCM(SlateModel):
    """GRU with readout; see the module docstring for the input, readout and schedule."""

    config_class = NCMConfig

    def __init__(self, sizes: dict[str, int], config: NCMConfig | None = None) -> None:
        super().__init__(sizes, config)
        if self.config.readout not in READOUT_MODES:
            raise ValueError(f"readout must be one of {READOUT_MODES}, not {self.config.readout!r}")
        dim = self.config.dim
        self.cell = nn.GRUCell(2 * dim + 1, dim)
        self.head = nn.Linear(dim, 1)

    def forward(
        self,
        items: Tensor,
        cats: Tensor,
        mask: Tensor,
        hist_clicks: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        emb, user, _ = self.inputs(items, cats, mask, hist_clicks)
        logits, _ = self.unroll(emb, user, mask, self.config.readout, noise)
        return logits

    def forward_train(self, batch: SlateBatch, epoch: int) -> TrainOutput:
        emb, user, _ = self.inputs(batch.items, batch.cats, batch.mask, batch.hist_clicks)
        gate = torch.bernoulli(torch.full_like(batch.clicks, self.teacher_probability(epoch)))
        noise = torch.rand_like(batch.clicks)
        logits, _ = self.unroll(emb, user, batch.mask, "relaxed", noise, batch.clicks, gate)
        return TrainOutput(logits)

    def teacher_probability(self, epoch: int) -> float:
        cfg = self.config
        progress = min(1.0, epoch / max(cfg.tf_anneal_epochs, 1))
        return float(cfg.tf_start + (cfg.tf_end - cfg.tf_start) * progress)

    def readout(self, logit: Tensor, noise: Tensor | None, mode: str) -> Tensor:
        """y_k [N] (and noise_k [N]) -> r_k [N] for one position."""
        if mode == "soft":
            return torch.sigmoid(logit)
        if mode == "threshold":
            return (logit > self.config.threshold_logit).to(logit.dtype)
        if noise is None:
            raise ValueError(f"readout {mode!r} needs the `noise` input")
        shifted = logit + logistic_noise(noise)
        if mode == "sample":
            return (shifted > 0).to(logit.dtype)
        return torch.sigmoid(shifted / self.config.temperature)

    def unroll(
        self,
        emb: Tensor,
        user: Tensor,
        mask: Tensor,
        mode: str,
        noise: Tensor | None,
        teacher: Tensor | None = None,
        gate: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """emb [B,S,K,E], user [B,S,E], mask/noise/teacher/gate [B,S,K] -> logits, readouts.

        Where gate is 1 the readout is the teacher's click, elsewhere the `mode` readout.
        """
        b, s, k, e = emb.shape
        emb = emb.reshape(b * s, k, e)  # slates folded into the batch: N = B·S
        real = mask.reshape(b * s, k).to(emb.dtype)  # [N, K]
        flat = [t.reshape(b * s, k) if t is not None else None for t in (noise, teacher, gate)]
        hidden = user.reshape(b * s, e)  # h₀ = u_t
        prev_emb, prev_read = torch.zeros_like(hidden), hidden.new_zeros(b * s, 1)
        logits, reads = [], []
        for pos in range(k):  # K is static: a fixed chain once traced
            step_in = torch.cat([emb[:, pos], prev_read * prev_emb, prev_read], dim=-1)
            new_hidden = self.cell(step_in, hidden)
            keep = real[:, pos : pos + 1]
            hidden = keep * new_hidden + (1 - keep) * hidden  # padding leaves the state alone
            logit = self.head(new_hidden).squeeze(-1)  # [N]
            read = self.readout(logit, _column(flat[0], pos), mode)
            teach, use_teacher = _column(flat[1], pos), _column(flat[2], pos)
            if teach is not None and use_teacher is not None:
                read = use_teacher * teach + (1 - use_teacher) * read
            read = read * real[:, pos]
            logits.append(logit)
            reads.append(read)
            prev_emb, prev_read = emb[:, pos], read.unsqueeze(-1)
        return torch.stack(logits, 1).reshape(b, s, k), torch.stack(reads, 1).reshape(b, s, k)


def _column(values: Tensor | None, pos: int) -> Tensor | None:
    return None if values is None else values[:, pos]
