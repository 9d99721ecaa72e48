"""NCM family: shapes, masks, causality across slates, the readout contract, AdvNCM gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.ncm.adversarial import AdvNCM, AdvNCMConfig
from models.ncm.base import SlateModel
from models.ncm.data import SlateBatch
from models.ncm.models import NCM, SCOT, NCMConfig, SlateGRU, SlateLogReg, TransformerGRU
from models.ncm.state import causal_user_state
from models.registry import SLATE_MODELS, model_class

torch.set_num_threads(1)
SIZES = {"item": 40, "category": 8}
B, S, K = 3, 4, 5
ALL = sorted(SLATE_MODELS)


def make_batch(seed: int = 0, lengths: tuple[int, ...] = (5, 3, 4)) -> SlateBatch:
    """B sessions of S slates; session b's slates hold lengths[b] items (the rest padding);
    session 1 has only 3 real slates. Clicks are random on real positions."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S, K, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :, :n] = True
    mask[1, 3] = False  # a padded slate
    items = torch.randint(2, SIZES["item"], (B, S, K), generator=gen) * mask
    cats = torch.randint(2, SIZES["category"], (B, S, K), generator=gen) * mask
    clicks = (torch.rand(B, S, K, generator=gen) < 0.4).float() * mask
    return SlateBatch(items, cats, mask, clicks, clicks.clone(), mask.clone())


def build(name: str, **config: object) -> SlateModel:
    torch.manual_seed(0)
    cls = model_class(name)
    model: SlateModel = cls(SIZES, cls.config_class(dim=8, **config))
    return model.eval()


def predict(model: SlateModel, batch: SlateBatch, hist: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        clicks = batch.hist_clicks if hist is None else hist
        return model(batch.items, batch.cats, batch.mask, clicks)


@pytest.mark.parametrize("name", ALL)
def test_logits_shape_and_finite(name: str) -> None:
    batch = make_batch()
    model = build(name)
    logits = predict(model, batch)
    assert logits.shape == (B, S, K)
    assert torch.isfinite(logits).all()
    out = model.train().forward_train(batch, epoch=5)
    assert out.logits.shape == (B, S, K)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("slate", [0, 1, 2])
def test_click_in_slate_t_changes_nothing_up_to_t(name: str, slate: int) -> None:
    batch = make_batch()
    model = build(name)
    before = predict(model, batch)
    flipped = batch.hist_clicks.clone()
    flipped[0, slate] = 1.0 - flipped[0, slate]  # every click of slate t of session 0 flipped
    flipped *= batch.mask
    after = predict(model, batch, flipped)
    assert torch.equal(before[:, : slate + 1], after[:, : slate + 1])
    # ...while later slates do react, so the test can fail.
    assert not torch.allclose(before[0, slate + 1 :], after[0, slate + 1 :])
    assert torch.equal(before[1:], after[1:])  # other sessions untouched


@pytest.mark.parametrize("name", ALL)
def test_padding_never_changes_real_predictions(name: str) -> None:
    batch = make_batch()
    model = build(name)
    before = predict(model, batch)
    pad = ~batch.mask
    noisy = SlateBatch(
        items=torch.where(pad, torch.full_like(batch.items, 7), batch.items),
        cats=torch.where(pad, torch.full_like(batch.cats, 3), batch.cats),
        mask=batch.mask,
        clicks=batch.clicks,
        hist_clicks=torch.where(pad, torch.ones_like(batch.hist_clicks), batch.hist_clicks),
        target=batch.target,
    )
    after = predict(model, noisy)
    assert torch.equal(before[batch.mask], after[batch.mask])


@pytest.mark.parametrize("name", ALL)
def test_scores_do_not_depend_on_the_rest_of_the_batch(name: str) -> None:
    batch = make_batch()
    model = build(name)
    full = predict(model, batch)
    alone = predict(model, SlateBatch(*(t[2:3] for t in _fields(batch))))
    assert torch.allclose(full[2:3], alone, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_wider_padding_does_not_change_scores(name: str) -> None:
    """Extra padded positions and an extra padded slate (a bigger S, K) change nothing."""
    batch = make_batch()
    model = build(name)
    before = predict(model, batch)
    wide = SlateBatch(*(F.pad(t, (0, 2, 0, 1)) for t in _fields(batch)))
    after = predict(model, wide)
    assert torch.allclose(before, after[:, :S, :K], atol=1e-6)


def test_user_state_is_the_mean_of_earlier_clicked_embeddings() -> None:
    emb = torch.arange(1 * 3 * 2 * 1, dtype=torch.float32).reshape(1, 3, 2, 1)  # e = 0..5
    clicks = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]])
    user = causal_user_state(emb, clicks)[0, :, 0]
    # slate 0: nothing before; slate 1: mean(0, 1); slate 2: still mean(0, 1).
    assert user.tolist() == [0.0, 0.5, 0.5]


def _fields(batch: SlateBatch) -> tuple[torch.Tensor, ...]:
    return (batch.items, batch.cats, batch.mask, batch.clicks, batch.hist_clicks, batch.target)


# ---------------------------------------------------------------------------- NCM readout


def _teacher_logits(model: NCM, batch: SlateBatch, teacher: torch.Tensor) -> torch.Tensor:
    emb, user, _ = model.inputs(batch.items, batch.cats, batch.mask, batch.hist_clicks)
    gate = torch.ones_like(teacher)
    with torch.no_grad():
        logits, _ = model.unroll(emb, user, batch.mask, "soft", None, teacher, gate)
    return logits


@pytest.mark.parametrize("position", [0, 1, 3])
def test_teacher_click_at_k_changes_only_later_positions_of_its_slate(position: int) -> None:
    batch = make_batch()
    model = build("ncm")
    assert isinstance(model, NCM)
    before = _teacher_logits(model, batch, batch.clicks)
    flipped = batch.clicks.clone()
    flipped[0, 1, position] = 1.0 - flipped[0, 1, position]
    after = _teacher_logits(model, batch, flipped)
    changed = ~torch.isclose(before, after, rtol=0, atol=0)
    assert changed[0, 1, position + 1 :].all()  # the readout reaches every later position
    changed[0, 1, position + 1 :] = False
    assert not changed.any()


def test_the_slate_wise_gru_ignores_clicks_inside_the_slate() -> None:
    """The baseline the readout is compared with: the slate being scored has no click input."""
    batch = make_batch()
    model = build("ncm-gru")
    hist = batch.hist_clicks.clone()
    hist[:, -1] = 1.0 - hist[:, -1]  # only the last slate's clicks; nothing after it
    assert torch.equal(predict(model, batch), predict(model, batch, hist * batch.mask))


@pytest.mark.parametrize("mode", ["soft", "threshold", "sample", "relaxed", "teacher"])
def test_an_interior_padded_position_never_gates_the_next(mode: str) -> None:
    batch = make_batch()
    batch.mask[0, 0, 1] = False  # a hole at position 1, real items at 2..4
    model = build("ncm", readout="soft" if mode == "teacher" else mode)
    assert isinstance(model, NCM)
    noise = torch.full((B, S, K), 0.5)

    def run(items: torch.Tensor, teacher_value: float) -> torch.Tensor:
        emb, user, _ = model.inputs(items, batch.cats, batch.mask, batch.hist_clicks)
        teacher = batch.clicks.clone()
        teacher[0, 0, 1] = teacher_value
        gate = torch.ones_like(teacher) if mode == "teacher" else None
        read_mode = "soft" if mode == "teacher" else mode
        with torch.no_grad():
            logits, _ = model.unroll(emb, user, batch.mask, read_mode, noise, teacher, gate)
        return logits

    other_items = batch.items.clone()
    other_items[0, 0, 1] = 11  # a different item in the hole
    reference = run(batch.items, 0.0)
    assert torch.equal(reference[0, 0, 2:], run(other_items, 1.0)[0, 0, 2:])


def test_sampling_readout_follows_the_noise_input() -> None:
    """noise → 1 makes every sample a click, noise → 0 none: equal to teacher-forced 1s / 0s."""
    batch = make_batch()
    model = build("ncm", readout="sample")
    assert isinstance(model, NCM)
    with torch.no_grad():
        all_clicks = model(
            batch.items, batch.cats, batch.mask, batch.hist_clicks, torch.full((B, S, K), 1 - 1e-9)
        )
        no_clicks = model(
            batch.items, batch.cats, batch.mask, batch.hist_clicks, torch.zeros(B, S, K)
        )
    real = batch.mask
    forced_ones = _teacher_logits(model, batch, real.float())
    forced_zeros = _teacher_logits(model, batch, torch.zeros(B, S, K))
    assert torch.allclose(all_clicks[real], forced_ones[real])
    assert torch.allclose(no_clicks[real], forced_zeros[real])
    with pytest.raises(ValueError, match="noise"):
        model(batch.items, batch.cats, batch.mask, batch.hist_clicks)


def test_default_readout_is_soft_and_deterministic() -> None:
    batch = make_batch()
    model = build("ncm")
    assert model.config.readout == "soft"
    assert torch.equal(predict(model, batch), predict(model, batch))
    with pytest.raises(ValueError, match="readout"):
        NCM(SIZES, NCMConfig(readout="argmax"))


def test_teacher_forcing_schedule() -> None:
    model = build("ncm")
    assert isinstance(model, NCM)
    probs = [model.teacher_probability(epoch) for epoch in range(7)]
    assert probs == [1.0, 0.875, 0.75, 0.625, 0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------- SCOT


def test_scot_full_attention_equals_the_clicked_only_gather() -> None:
    """The exportable masked form must equal §3.7: attend only to earlier clicked items."""
    batch = make_batch()
    model = build("scot")
    assert isinstance(model, SCOT)
    logits = predict(model, batch)
    emb, user, clicks = model.inputs(batch.items, batch.cats, batch.mask, batch.hist_clicks)
    tokens = torch.cat([emb, user.unsqueeze(2).expand_as(emb)], -1)  # [B, S, K, 2E]
    zero = torch.zeros(1, tokens.shape[-1])
    with torch.no_grad():
        for b in range(B):
            for t in range(S):
                earlier = tokens[b, :t][clicks[b, :t] > 0]  # clicked items of slates < t
                keys = torch.cat([zero, earlier]).unsqueeze(0)
                query = tokens[b, t].unsqueeze(0)
                out, _ = model.attention(query, keys, keys)
                expected = model.head(out + query).squeeze(-1)[0]
                assert torch.allclose(logits[b, t], expected, atol=1e-5)


# ---------------------------------------------------------------------------- AdvNCM


def _grads(model: AdvNCM, batch: SlateBatch, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same teacher gates and noise in every call
    out = model.forward_train(batch, epoch=10)
    loss = sum((out.aux_losses[p] for p in parts if p != "bce"), torch.zeros(()))
    if "bce" in parts:
        loss = loss + F.binary_cross_entropy_with_logits(out.logits, batch.clicks)
    loss.backward()
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def test_discriminator_loss_moves_d_only_and_bce_plus_generator_term_move_the_generator() -> None:
    batch = make_batch()
    model = build("ncm-adv")
    assert isinstance(model, AdvNCM)
    model.train()
    disc_only = _grads(model, batch, ("disc",))
    gen_only = _grads(model, batch, ("gen_adv",))
    total = _grads(model, batch, ("bce", "disc", "gen_adv"))
    bce_only = _grads(model, batch, ("bce",))
    for name in total:
        is_disc = name.startswith("discriminator.")
        if is_disc:  # D learns from its own loss only
            assert not gen_only[name].any(), name
            assert torch.allclose(total[name], disc_only[name], atol=1e-6), name
        else:  # the generator learns from BCE and its adversarial loss, never from D's loss
            assert not disc_only[name].any(), name
            assert torch.allclose(total[name], bce_only[name] + gen_only[name], atol=1e-6), name
        if name.startswith("embed."):
            assert not gen_only[name].any()  # detached embeddings in the adversarial terms
    assert disc_only["discriminator.mlp.0.weight"].abs().sum() > 0
    assert gen_only["cell.weight_ih"].abs().sum() > 0


def test_adversarial_schedule() -> None:
    batch = make_batch()
    model = build("ncm-adv")
    assert isinstance(model.config, AdvNCMConfig)
    start_d, start_g = model.config.disc_start_epoch, model.config.gen_start_epoch
    assert set(model.forward_train(batch, start_d - 1).aux_losses) == set()
    assert set(model.forward_train(batch, start_d).aux_losses) == {"disc"}
    assert set(model.forward_train(batch, start_g).aux_losses) == {"disc", "gen_adv"}


def test_adv_inference_is_the_ncm_forward() -> None:
    batch = make_batch()
    adv = build("ncm-adv")
    plain = NCM(SIZES, NCMConfig(dim=8))
    plain.load_state_dict(
        {k: v for k, v in adv.state_dict().items() if not k.startswith("discriminator.")}
    )
    assert torch.equal(predict(adv, batch), predict(plain.eval(), batch))


@pytest.mark.parametrize("cls", [SlateLogReg, SlateGRU, NCM, SCOT, TransformerGRU, AdvNCM])
def test_registry_names_the_classes(cls: type) -> None:
    assert any(model_class(name) is cls for name in SLATE_MODELS)
