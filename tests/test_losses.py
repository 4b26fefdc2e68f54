import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from trl_diffusion.losses import (
    adaptive_dpo_loss,
    adaptive_dpo_loss_from_errors,
    annotator_ema_decay,
    annotator_margins,
    diffusion_dpo_loss,
    diffusion_kto_loss,
    flip_minority_labels,
    mapo_loss,
    mapo_score,
    minority_score_terms,
    minority_scores,
    minority_warmup,
    preference_accuracy,
)


E_W = torch.tensor([0.10, 0.20, 0.30, 0.25])
E_L = torch.tensor([0.12, 0.18, 0.30, 0.40])
R_W = torch.tensor([0.11, 0.19, 0.31, 0.30])
R_L = torch.tensor([0.11, 0.19, 0.29, 0.35])


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _margins() -> list[float]:
    return [(rw - rl) - (ew - el) for ew, el, rw, rl in zip(E_W.tolist(), E_L.tolist(), R_W.tolist(), R_L.tolist())]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "conservative", "robust"])
def test_dpo_loss_matches_formula(loss_type):
    beta, eps = 50.0, 0.1
    expected = []
    for m in _margins():
        z = beta * m
        expected.append(
            {
                "sigmoid": -math.log(_sigmoid(z)),
                "hinge": max(0.0, 1 - z),
                "ipo": (m - 1 / (2 * beta)) ** 2,
                "conservative": -(1 - eps) * math.log(_sigmoid(z)) - eps * math.log(_sigmoid(-z)),
                "robust": (-(1 - eps) * math.log(_sigmoid(z)) + eps * math.log(_sigmoid(-z))) / (1 - 2 * eps),
            }[loss_type]
        )
    loss, _ = diffusion_dpo_loss(E_W, E_L, R_W, R_L, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_dpo_metrics_follow_trl_names_and_values():
    beta = 10.0
    _, metrics = diffusion_dpo_loss(E_W, E_L, R_W, R_L, beta=beta)
    torch.testing.assert_close(metrics["rewards/chosen"], beta * (R_W - E_W))
    torch.testing.assert_close(metrics["rewards/rejected"], beta * (R_L - E_L))
    torch.testing.assert_close(metrics["rewards/margins"], beta * torch.tensor(_margins()))
    # margins: -0.02 + ... pair 3 (index 2) has a margin of exactly 0.02 - 0 = 0.02; accuracies follow the sign
    assert metrics["rewards/accuracies"].tolist() == [float(m > 0) for m in _margins()]
    assert all(not value.requires_grad for value in metrics.values())
    for key in ("mse/policy_chosen", "mse/policy_rejected", "mse/ref_chosen", "mse/ref_rejected"):
        assert key in metrics


def test_zero_margin_counts_half():
    assert preference_accuracy(torch.tensor([1.0, 0.0, -1.0])).tolist() == [1.0, 0.5, 0.0]


def test_dpo_loss_finite_for_huge_beta_and_tiny_errors():
    e_w = torch.tensor([1e-8, 2e-8], requires_grad=True)
    e_l = torch.tensor([3e-8, 1e-9])
    r = torch.tensor([2e-8, 2e-8])
    loss, _ = diffusion_dpo_loss(e_w, e_l, r, r, beta=1e12)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e_w.grad).all()
    # one pair has margin +2e-8 (loss ~0), the other -1.9e-8 (loss ~ beta * 1.9e-8 = 1.9e4)
    assert loss.item() == pytest.approx(1.9e4 / 2, rel=1e-3)


def test_dpo_loss_starts_at_ln2_when_policy_equals_reference():
    loss, _ = diffusion_dpo_loss(E_W, E_L, E_W, E_L, beta=2500.0)
    assert loss.item() == pytest.approx(math.log(2))


def test_dpo_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_dpo_loss(E_W, E_L, R_W, R_L, loss_type="nope")


def test_mapo_loss_matches_formula():
    beta, s, T = 0.1, 0.5, 1000

    def f(e):
        return s * e / (math.exp(s * e) - 1)

    expected_ratio = [-beta * math.log(_sigmoid(T * (f(w) - f(r)))) for w, r in zip(E_W.tolist(), E_L.tolist())]
    expected = sum(E_W.tolist()) / 4 + sum(expected_ratio) / 4
    loss, metrics = mapo_loss(E_W, E_L, beta=beta, num_train_timesteps=T, snr_value=s)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(metrics["mapo/sft_loss"], E_W)
    torch.testing.assert_close(metrics["mapo/ratio_loss"], torch.tensor(expected_ratio))
    assert set(metrics) >= {
        "mapo/sft_loss",
        "mapo/ratio_loss",
        "mapo/chosen_score",
        "mapo/rejected_score",
        "mapo/margin",
        "mapo/accuracy",
    }


def test_mapo_score_limit_and_gradient_at_zero():
    errors = torch.tensor([0.0, 1e-12, 1.0], requires_grad=True)
    scores = mapo_score(errors)
    scores.sum().backward()
    assert scores[0].item() == 1.0
    assert scores[1].item() == pytest.approx(1.0)
    assert scores[2].item() == pytest.approx(0.5 / math.expm1(0.5))
    assert torch.isfinite(errors.grad).all()


def test_mapo_margin_sign_is_stable_in_float32_where_naive_formula_flips():
    """Errors around 1e-3 that differ by 1%: the naive exp(x) - 1 gets the sign of some margins wrong."""
    s, T = 0.5, 1000
    e_w = torch.linspace(1.0e-3, 1.2e-3, 200, dtype=torch.float32)
    e_l = e_w * (1 + 1e-2)  # the rejected image is always slightly worse, so f(e_w) > f(e_l)
    x_w, x_l = s * e_w, s * e_l
    naive = T * (x_w / (torch.exp(x_w) - 1) - x_l / (torch.exp(x_l) - 1))
    _, metrics = mapo_loss(e_w, e_l, num_train_timesteps=T, snr_value=s)
    exact = T * (mapo_score(e_w.double(), s) - mapo_score(e_l.double(), s))
    assert (exact > 0).all()
    assert (naive <= 0).any(), "the naive float32 formula should flip some margins"
    assert (metrics["mapo/margin"] > 0).all()
    # f is close to 1 in float32, so a few ULPs of it are a few percent of the margin; the naive form is off by 100%.
    torch.testing.assert_close(metrics["mapo/margin"].double(), exact, rtol=0.1, atol=0)


def test_minority_scores_multi_annotator_formula():
    margins = torch.tensor([[0.3, -0.2, 0.1], [0.1, 0.4, -0.3], [0.2, -0.1, 0.0]])
    rho = 15.0
    normalized = margins / margins.norm(dim=1, keepdim=True)
    z = rho * normalized
    expected = (torch.sigmoid(z).mean(0) - 1).abs() * z.std(0, unbiased=True).clamp(max=1)
    torch.testing.assert_close(minority_scores(margins, rho=rho), expected)
    z_raw = rho * margins
    expected_raw = (torch.sigmoid(z_raw).mean(0) - 1).abs() * z_raw.std(0).clamp(max=1)
    torch.testing.assert_close(minority_scores(margins, rho=rho, normalize=False), expected_raw)


def test_minority_scores_single_annotator_and_prior():
    margins = torch.tensor([[0.5, -0.5]])
    u = minority_scores(margins, rho=2.0)
    z = 2.0 * margins[0] / margins[0].norm()
    torch.testing.assert_close(u, 1 - torch.sigmoid(z))
    prior = torch.tensor([0.5, 1.0])
    torch.testing.assert_close(minority_scores(margins, rho=2.0, prior_confidence=prior), 1 - prior * torch.sigmoid(z))


def test_minority_scores_single_annotator_raw_margins_as_the_authors_code():
    """The authors' policy-only path: ``u = |sigma(rho * l) - 1|`` on the raw margins, rho = their 1e4 default."""
    margins = torch.tensor([[2e-4, -1e-4, 0.0, 5e-5]])
    expected = [abs(_sigmoid(1e4 * m) - 1) for m in margins[0].tolist()]
    torch.testing.assert_close(minority_scores(margins, rho=1e4, normalize=False), torch.tensor(expected))


def test_minority_score_terms_log_stability_norms_and_warmup():
    margins = torch.tensor([[0.3, -0.2, 0.1], [0.1, 0.4, -0.3], [1e-9, -1e-9, 0.0]])
    terms = minority_score_terms(margins, rho=15.0)
    z = 15.0 * margins / margins.norm(dim=1, keepdim=True)
    torch.testing.assert_close(terms["stability"], z.std(0).clamp(max=1))
    torch.testing.assert_close(terms["confidence"], torch.sigmoid(z).mean(0))
    torch.testing.assert_close(terms["margin_norms"], torch.tensor([0.14**0.5, 0.26**0.5, 2**0.5 * 1e-9]))
    torch.testing.assert_close(terms["u"], minority_scores(margins, rho=15.0))
    warm = minority_score_terms(margins, rho=15.0, warmup=True)
    assert warm["u"].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(warm["stability"], terms["stability"])  # still reported during warm-up
    assert "stability" not in minority_score_terms(margins[:1])


def test_annotator_ema_decay_is_diffusers_ema_schedule():
    """Update 1 copies the policy; update s + 1 uses min(d, (1 + s)/(10 + s)); as EMAModel.get_decay."""
    assert annotator_ema_decay(0.9999, 1) == 0.0
    assert annotator_ema_decay(0.9999, 2) == 2 / 11
    assert annotator_ema_decay(0.9999, 101) == 101 / 110
    assert annotator_ema_decay(0.5, 9) == 0.5 and annotator_ema_decay(0.5, 8) == 8 / 17
    for decay in (0.5, 0.9, 0.9999):
        ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay)
        assert [annotator_ema_decay(decay, n) for n in range(1, 300)] == [ema.get_decay(n) for n in range(1, 300)]
    with pytest.raises(ValueError, match="from 1"):
        annotator_ema_decay(0.5, 0)


def test_minority_scores_finite_on_zero_margins():
    assert torch.isfinite(minority_scores(torch.zeros(3, 4))).all()


@pytest.mark.parametrize("weight_type", ["linear", "quadratic"])
@pytest.mark.parametrize("margin_type", ["quadratic", "linear", "none"])
def test_adaptive_dpo_loss_matches_formula(weight_type, margin_type):
    beta, k, c = 100.0, 10.0, 1.0
    margins = torch.tensor(_margins(), requires_grad=True)
    u = torch.tensor([0.0, 0.3, 0.7, 0.1])
    w = 1 / (k * (u if weight_type == "linear" else u**2) + c)
    mean = margins.detach().mean()
    gamma = {"quadratic": -(u**2) / beta + mean, "linear": -u / beta + mean, "none": torch.zeros(4)}[margin_type]
    expected = -(w * F.logsigmoid(beta * margins.detach() - gamma)).mean()
    loss, metrics = adaptive_dpo_loss(
        margins, u, beta=beta, weight_type=weight_type, k=k, c=c, margin_type=margin_type
    )
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(metrics["adaptive/weight_mean"], w)
    assert metrics["adaptive/minority_fraction"].tolist() == [0.0, 0.0, 1.0, 0.0]
    # u, w and mean(l) are detached: the gradient is w * beta * (1 - sigma(beta*l - gamma)) / B per pair
    loss.backward()
    expected_grad = -w * beta * (1 - torch.sigmoid(beta * margins.detach() - gamma)) / 4
    torch.testing.assert_close(margins.grad, expected_grad)
    assert metrics["adaptive/flipped_fraction"].tolist() == [0.0] * 4


def test_adaptive_dpo_loss_flips_pairs_above_the_threshold():
    """``flip_threshold``: pairs with u above it count with ``-l``, in the loss and in the margin's mean (gamma)."""
    beta = 100.0
    margins = torch.tensor(_margins())
    u = torch.tensor([0.0, 0.6, 0.7, 0.1])
    flipped = torch.tensor([1.0, -1.0, -1.0, 1.0]) * margins
    loss, metrics = adaptive_dpo_loss(margins, u, beta=beta, flip_threshold=0.5)
    expected, _ = adaptive_dpo_loss(flipped, u, beta=beta)
    torch.testing.assert_close(loss, expected)
    assert metrics["adaptive/flipped_fraction"].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_annotator_margins_are_each_annotators_implicit_reward_margin():
    """``l_m = (r_w - r_l) - (e^m_w - e^m_l)`` per annotator, from ``(2B,)`` errors (chosen first), detached."""
    policy = torch.cat([E_W, E_L]).requires_grad_(True)
    ema = torch.tensor([0.10, 0.21, 0.28, 0.30, 0.13, 0.18, 0.33, 0.38])
    margins = annotator_margins([policy, ema], torch.cat([R_W, R_L]))
    expected_policy = [(rw - rl) - (ew - el) for ew, el, rw, rl in zip(E_W, E_L, R_W, R_L, strict=True)]
    expected_ema = [(rw - rl) - (ew - el) for ew, el, rw, rl in zip(ema[:4], ema[4:], R_W, R_L, strict=True)]
    torch.testing.assert_close(margins, torch.tensor([expected_policy, expected_ema]))
    assert margins.shape == (2, 4) and not margins.requires_grad


def test_minority_warmup_only_while_ema_annotators_settle():
    assert minority_warmup(global_step=0, warmup_steps=2, num_ema_annotators=2)
    assert minority_warmup(global_step=1, warmup_steps=2, num_ema_annotators=1)
    assert not minority_warmup(global_step=2, warmup_steps=2, num_ema_annotators=2)
    assert not minority_warmup(global_step=0, warmup_steps=2, num_ema_annotators=0)  # the policy judges from step 0
    assert not minority_warmup(global_step=0, warmup_steps=0, num_ema_annotators=2)


def test_flip_minority_labels_negates_pairs_above_the_threshold():
    margins = torch.tensor([0.5, -0.2, 0.3, 0.1])
    u = torch.tensor([0.1, 0.6, 0.5, 0.9])
    flipped_margins, flipped = flip_minority_labels(margins, u, threshold=0.5)
    assert flipped.tolist() == [False, True, False, True]  # strictly above the threshold
    assert torch.equal(flipped_margins, torch.tensor([0.5, 0.2, 0.3, -0.1]))
    unchanged, none = flip_minority_labels(margins, u, threshold=None)
    assert unchanged is margins and not none.any()


@pytest.mark.parametrize("num_ema", [0, 2])
def test_adaptive_dpo_loss_from_errors_is_the_composition_of_its_steps(num_ema):
    """The policy's margins, every annotator's margins, ``u`` from their agreement, and the weighted loss."""
    generator = torch.Generator().manual_seed(0)
    policy = (torch.rand(8, generator=generator) * 0.2 + 0.1).requires_grad_(True)
    ref = torch.rand(8, generator=generator) * 0.2 + 0.1
    emas = {f"ema_{i}": torch.rand(8, generator=generator) * 0.2 + 0.1 for i in range(num_ema)}
    prior = torch.tensor([1.0, 0.5, 0.8, 1.0])
    options = {"beta": 50.0, "weight_type": "quadratic", "k": 5.0, "c": 2.0, "margin_type": "linear"}
    loss, metrics = adaptive_dpo_loss_from_errors(
        policy, ref, emas, rho=3.0, normalize=bool(num_ema), prior_confidence=prior, flip_threshold=0.4, **options
    )
    e_w, e_l, r_w, r_l = *policy.detach().chunk(2), *ref.chunk(2)
    margins = (r_w - r_l) - (e_w - e_l)
    judged = torch.stack([margins] + [(r_w - r_l) - (e.chunk(2)[0] - e.chunk(2)[1]) for e in emas.values()])
    z = 3.0 * (judged / judged.norm(dim=1, keepdim=True) if num_ema else judged)
    confidence = torch.sigmoid(z).mean(0) * prior
    u = (confidence - 1).abs() * z.std(0).clamp(max=1) if num_ema else 1 - confidence
    signed = torch.where(u > 0.4, -margins, margins)
    w = 1 / (5.0 * u**2 + 2.0)
    gamma = -u / 50.0 + signed.mean()
    torch.testing.assert_close(loss.detach(), -(w * F.logsigmoid(50.0 * signed - gamma)).mean())
    torch.testing.assert_close(metrics["adaptive/u_mean"], u)
    torch.testing.assert_close(metrics["adaptive/confidence_mean"], confidence)
    assert ("adaptive/stability_mean" in metrics) == bool(num_ema)
    names = ["policy", *emas]
    assert [key.rsplit("/", 1)[1] for key in metrics if key.startswith("adaptive/margin_norm/")] == names
    torch.testing.assert_close(metrics["adaptive/margin_norm/policy"], margins.norm().expand(4))
    torch.testing.assert_close(metrics["rewards/margins"], 50.0 * margins)
    loss.backward()
    assert policy.grad is not None and torch.isfinite(policy.grad).all()
    warm, warm_metrics = adaptive_dpo_loss_from_errors(policy, ref, emas, rho=3.0, warmup=True, **options)
    assert warm_metrics["adaptive/u_mean"].tolist() == [0.0] * 4
    torch.testing.assert_close(warm.detach(), -(F.logsigmoid(50.0 * margins - margins.mean()) / 2.0).mean())


# ----- guards against collapse (Diffusion-DPO) -----


def test_dpo_sft_anchor_adds_the_chosen_error_and_its_gradient():
    e_w = E_W.clone().requires_grad_(True)
    base, _ = diffusion_dpo_loss(E_W, E_L, R_W, R_L, beta=50.0)
    loss, metrics = diffusion_dpo_loss(e_w, E_L, R_W, R_L, beta=50.0, sft_weight=0.5)
    assert loss.item() == pytest.approx(base.item() + 0.5 * E_W.mean().item(), rel=1e-6)
    torch.testing.assert_close(metrics["guards/sft_loss"], E_W)
    loss.backward()
    # d/de_w of -log sigma(beta * l) / B is beta * (1 - sigma(beta * l)) / B (l falls as e_w rises); the anchor adds 0.5/B
    margins = torch.tensor(_margins())
    expected = 50.0 * (1 - torch.sigmoid(50.0 * margins)) / 4 + 0.5 / 4
    torch.testing.assert_close(e_w.grad, expected)


def test_dpo_margin_cap_stops_the_gradient_of_well_separated_pairs():
    beta, cap = 50.0, 2.0  # z = beta * l is [1, -1, 1, 5]: the last pair is above the cap
    margins = torch.tensor(_margins())
    z = beta * margins
    e_l = E_L.clone().requires_grad_(True)
    loss, metrics = diffusion_dpo_loss(E_W, e_l, R_W, R_L, beta=beta, max_margin=cap)
    expected = -F.logsigmoid(torch.clamp(z, max=cap)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    capped = z > cap
    assert capped.any() and (~capped).any()
    assert (e_l.grad[capped] == 0).all()
    assert (e_l.grad[~capped] < 0).all()  # raising a rejected error still lowers the loss below the cap
    assert metrics["guards/capped_fraction"].tolist() == capped.float().tolist()
    # the logged margins are the real (uncapped) ones
    torch.testing.assert_close(metrics["rewards/margins"], z)


def test_dpo_guards_are_off_by_default():
    loss, metrics = diffusion_dpo_loss(E_W, E_L, R_W, R_L, beta=50.0)
    plain = -F.logsigmoid(50.0 * torch.tensor(_margins())).mean()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    assert not any(key.startswith("guards/") for key in metrics)


# ----- Diffusion-KTO -----

E = torch.tensor([0.10, 0.20, 0.30, 0.25, 0.40])  # policy errors of five images
R = torch.tensor([0.12, 0.18, 0.31, 0.20, 0.40])  # reference errors
DESIRABLE = torch.tensor([True, False, True, False, True])


def test_kto_loss_matches_the_authors_formula():
    beta, lambda_d, lambda_u = 20.0, 1.5, 0.5
    g = [r - e for e, r in zip(E.tolist(), R.tolist())]
    z0 = max(0.0, sum(g) / len(g))  # KL estimate: mean over all images, clamped at 0
    expected = []
    for gi, d in zip(g, DESIRABLE.tolist()):
        sign, weight = (1, lambda_d) if d else (-1, lambda_u)
        expected.append(weight * (1 - _sigmoid(sign * beta * (gi - z0))))
    e = E.clone().requires_grad_(True)
    loss, metrics = diffusion_kto_loss(e, R, DESIRABLE, beta, desirable_weight=lambda_d, undesirable_weight=lambda_u)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(z0, abs=1e-7)
    torch.testing.assert_close(metrics["rewards/chosen"], beta * (R - E)[DESIRABLE])
    torch.testing.assert_close(metrics["rewards/rejected"], beta * (R - E)[~DESIRABLE])
    torch.testing.assert_close(metrics["mse/policy_chosen"], E[DESIRABLE])
    torch.testing.assert_close(metrics["mse/ref_rejected"], R[~DESIRABLE])
    torch.testing.assert_close(metrics["kto/utility_loss"], torch.tensor(expected))
    # the reference point is detached: d/de of w (1 - sigma(s beta (r - e - z0))) / B = w s beta sigma'(.) / B
    loss.backward()
    sign = DESIRABLE.float() * 2 - 1
    weights = torch.where(DESIRABLE, lambda_d, lambda_u)
    zz = sign * beta * (R - E - z0)
    expected_grad = weights * sign * beta * torch.sigmoid(zz) * (1 - torch.sigmoid(zz)) / len(E)
    torch.testing.assert_close(e.grad, expected_grad)


def test_kto_reference_point_is_clamped_at_zero_and_can_be_given():
    worse = R + 0.05  # the policy is worse than the reference everywhere: g = r - e = -0.05, so z0 = max(0, -0.05)
    _, metrics = diffusion_kto_loss(worse, R, DESIRABLE, beta=10.0)
    assert metrics["kl"].item() == 0.0
    loss, metrics = diffusion_kto_loss(E, R, DESIRABLE, beta=10.0, reference_point=torch.tensor(0.3))
    sign = DESIRABLE.float() * 2 - 1
    expected = (1 - torch.sigmoid(sign * 10.0 * (R - E - 0.3))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(0.3)


def test_kto_loss_starts_at_half_when_policy_equals_reference():
    loss, metrics = diffusion_kto_loss(R, R, DESIRABLE, beta=1000.0)
    assert loss.item() == pytest.approx(0.5)
    assert metrics["kto/accuracy"].tolist() == [0.5] * 5
