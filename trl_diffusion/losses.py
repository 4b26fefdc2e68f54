"""Preference losses for diffusion models, one pure tensor function per method.

Every function takes per-sample denoising errors (``e = mean over C, H, W of (prediction - target)^2``, float32) and
returns ``(loss, metrics)``: a scalar loss tensor and a dict of detached tensors of shape ``(B,)``, one value per
pair. The trainers average the metrics over pairs, steps and processes before logging them.

Notation, shared by the whole library (see ``docs/design.md``): ``e_w``, ``e_l`` are the policy's errors on the
chosen (winning) and rejected (losing) image of a pair, ``r_w``, ``r_l`` the reference's. The implicit reward margin is
``l = (r_w - r_l) - (e_w - e_l)``: how much more the policy improved on the chosen image than on the rejected one,
relative to the reference. Every DPO-family loss is a function of ``beta * l``.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "conservative", "robust")


def preference_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Per-pair accuracy of a margin: 1 where it is positive, 1/2 where it is exactly zero, 0 otherwise."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def implicit_reward_margin(
    policy_chosen_errors: torch.Tensor,
    policy_rejected_errors: torch.Tensor,
    ref_chosen_errors: torch.Tensor,
    ref_rejected_errors: torch.Tensor,
) -> torch.Tensor:
    """The implicit reward margin ``l = (r_w - r_l) - (e_w - e_l)`` of each pair (Wallace et al. 2023, Eq. 14)."""
    return (ref_chosen_errors - ref_rejected_errors) - (policy_chosen_errors - policy_rejected_errors)


def dpo_reward_metrics(
    policy_chosen_errors: torch.Tensor,
    policy_rejected_errors: torch.Tensor,
    ref_chosen_errors: torch.Tensor,
    ref_rejected_errors: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """TRL's reward metrics for a DPO-family method, per pair and detached.

    ``rewards/chosen = beta * (r_w - e_w)``, ``rewards/rejected = beta * (r_l - e_l)``, ``rewards/margins = beta * l``,
    ``rewards/accuracies`` (``l > 0``; a zero margin counts 1/2), and the four mean squared errors.
    """
    e_w, e_l = policy_chosen_errors.detach(), policy_rejected_errors.detach()
    r_w, r_l = ref_chosen_errors.detach(), ref_rejected_errors.detach()
    chosen_rewards = beta * (r_w - e_w)
    rejected_rewards = beta * (r_l - e_l)
    margins = implicit_reward_margin(e_w, e_l, r_w, r_l)
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": beta * margins,
        "rewards/accuracies": preference_accuracy(margins),
        "mse/policy_chosen": e_w,
        "mse/policy_rejected": e_l,
        "mse/ref_chosen": r_w,
        "mse/ref_rejected": r_l,
    }


def diffusion_dpo_loss(
    policy_chosen_errors: torch.Tensor,
    policy_rejected_errors: torch.Tensor,
    ref_chosen_errors: torch.Tensor,
    ref_rejected_errors: torch.Tensor,
    beta: float = 2500.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    max_margin: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Diffusion-DPO loss (Wallace et al. 2023, arXiv 2311.12908, Eq. 14).

    With the implicit reward margin ``l = (r_w - r_l) - (e_w - e_l)`` and ``z = beta * l``:

    - ``sigmoid`` (the paper's loss): ``L = -mean log sigma(z)``
    - ``hinge``: ``L = mean relu(1 - z)``
    - ``ipo``: ``L = mean (l - 1 / (2 beta))^2``
    - ``conservative`` (cDPO, label smoothing ``eps``): ``L = mean[-(1 - eps) log sigma(z) - eps log sigma(-z)]``
    - ``robust`` (rDPO): ``L = mean[(-(1 - eps) log sigma(z) + eps log sigma(-z)) / (1 - 2 eps)]``

    ``beta`` is on the library-wide scale: the paper's official code writes ``-(beta'/2)(...)`` with ``beta' = 5000``,
    which is ``beta = 2500`` here. ``log sigma`` is computed with ``logsigmoid``, so the loss stays finite for huge
    ``beta`` and tiny errors.

    Two optional guards against collapse (beyond the paper; both off by default):

    - ``max_margin`` ``m``: the loss sees ``min(z, m)`` instead of ``z`` (``min(l, m / beta)`` for ``ipo``), so a pair
      whose margin is already above ``m`` gives no gradient. DPO can raise ``z`` without bound by making the rejected
      image unlikely, which also degrades the chosen one; the cap stops that push once a pair is well separated.
    - ``sft_weight`` ``lambda``: adds ``lambda * mean(e_w)``, a supervised anchor on the chosen images (the term MaPO
      always has), so the policy's error on them cannot drift up unopposed.

    Args:
        policy_chosen_errors: ``(B,)`` per-sample errors of the policy on the chosen images, ``e_w``.
        policy_rejected_errors: ``(B,)`` per-sample errors of the policy on the rejected images, ``e_l``.
        ref_chosen_errors: ``(B,)`` per-sample errors of the frozen reference on the chosen images, ``r_w``.
        ref_rejected_errors: ``(B,)`` per-sample errors of the frozen reference on the rejected images, ``r_l``.
        beta: KL-regularisation strength.
        loss_type: one of ``sigmoid``, ``hinge``, ``ipo``, ``conservative``, ``robust``.
        label_smoothing: ``eps``, the assumed probability that a label is flipped (``conservative``/``robust``).
        sft_weight: ``lambda`` of the supervised anchor ``lambda * mean(e_w)``; ``0`` turns it off.
        max_margin: cap ``m`` on ``z = beta * l``; ``None`` turns it off.

    Returns:
        ``(loss, metrics)``, the scalar loss and per-pair detached metrics (see [`dpo_reward_metrics`][]); with a cap,
        also ``guards/capped_fraction`` (1 where ``z > m``), and with an anchor ``guards/sft_loss`` (``e_w``).
    """
    margins = implicit_reward_margin(
        policy_chosen_errors, policy_rejected_errors, ref_chosen_errors, ref_rejected_errors
    )
    uncapped = margins
    if max_margin is not None:
        margins = torch.clamp(margins, max=max_margin / beta)
    z = beta * margins
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "ipo":
        losses = (margins - 1 / (2 * beta)) ** 2
    elif loss_type == "conservative":
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    else:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}.")
    metrics = dpo_reward_metrics(
        policy_chosen_errors, policy_rejected_errors, ref_chosen_errors, ref_rejected_errors, beta
    )
    loss = losses.mean()
    if max_margin is not None:
        metrics["guards/capped_fraction"] = (uncapped.detach() > max_margin / beta).float()
    if sft_weight:
        loss = loss + sft_weight * policy_chosen_errors.mean()
        metrics["guards/sft_loss"] = policy_chosen_errors.detach()
    return loss, metrics


def kto_reference_point(policy_errors: torch.Tensor, ref_errors: torch.Tensor) -> torch.Tensor:
    """Diffusion-KTO's KL estimate before clamping: the batch mean of the implicit reward ``g = r - e``, detached.

    The trainer averages it over processes and clamps it at 0 (see [`diffusion_kto_loss`][]).
    """
    return (ref_errors - policy_errors).detach().mean()


def diffusion_kto_loss(
    policy_errors: torch.Tensor,
    ref_errors: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 1000.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Diffusion-KTO loss (Li et al. 2024, arXiv 2404.04465, "Aligning Diffusion Models by Optimizing Human Utility").

    The paper maximises the expected Kahneman-Tversky utility of each image, with no pairs:

        ``max_theta E_{x_0, t} [ U( w(x_0) * (beta * log pi_theta(x_{t-1}|x_t) / pi_ref(x_{t-1}|x_t) - Q_ref) ) ]``

    with ``w(x_0) = +1`` for a desirable image and ``-1`` for an undesirable one, the utility ``U = sigmoid`` and the
    reference point ``Q_ref = beta * KL(pi_theta || pi_ref)``. The log-likelihood ratio of a denoising step is
    replaced, as in Diffusion-DPO, by the difference of denoising errors, ``g = r - e`` (the reference's error minus
    the policy's, per image). As in the authors' code, the loss minimised is

        ``L = mean( lambda_y * (1 - sigmoid( w(x_0) * beta * (g - z_0) )) )``

    where ``lambda_y`` is ``desirable_weight`` (``lambda_D``) or ``undesirable_weight`` (``lambda_U``) and the KL
    estimate ``z_0 = max(0, mean_batch g)`` is the batch mean of ``g`` over desirable and undesirable images alike
    (averaged over processes by the trainer), clamped at 0 and detached. ``beta`` multiplies errors that are means over
    ``C, H, W``, as in the authors' code (their default is 1000).

    Args:
        policy_errors: ``(B,)`` per-image errors of the policy, ``e``.
        ref_errors: ``(B,)`` per-image errors of the frozen reference, ``r``.
        desirable: ``(B,)`` booleans, ``True`` for a desirable image.
        beta: the implicit reward's scale.
        desirable_weight: ``lambda_D``, the weight of a desirable image's loss.
        undesirable_weight: ``lambda_U``, the weight of an undesirable image's loss.
        reference_point: the KL estimate ``z_0``, already clamped; by default ``max(0, mean(g))`` over this batch.

    Returns:
        ``(loss, metrics)``. Per desirable image: ``rewards/chosen`` (``beta * g``), ``mse/policy_chosen``,
        ``mse/ref_chosen``; per undesirable image: ``rewards/rejected``, ``mse/policy_rejected``, ``mse/ref_rejected``;
        per image: ``kto/accuracy`` (``w(x_0) * (g - z_0) > 0``) and ``kto/utility_loss``; and ``kl``, the ``z_0`` used.
    """
    desirable = desirable.bool()
    rewards = ref_errors - policy_errors
    if reference_point is None:
        reference_point = kto_reference_point(policy_errors, ref_errors).clamp(min=0)
    reference_point = reference_point.detach()
    sign = desirable.float() * 2 - 1
    z = sign * beta * (rewards - reference_point)
    weights = torch.where(desirable, desirable_weight, undesirable_weight)
    losses = weights * (1 - torch.sigmoid(z))
    detached, e, r = rewards.detach(), policy_errors.detach(), ref_errors.detach()
    metrics = {
        "rewards/chosen": beta * detached[desirable],
        "rewards/rejected": beta * detached[~desirable],
        "mse/policy_chosen": e[desirable],
        "mse/policy_rejected": e[~desirable],
        "mse/ref_chosen": r[desirable],
        "mse/ref_rejected": r[~desirable],
        "kto/accuracy": preference_accuracy(z.detach()),
        "kto/utility_loss": losses.detach(),
        "kl": reference_point.reshape(1),
    }
    return losses.mean(), metrics


def mapo_score(errors: torch.Tensor, snr_value: float = 0.5) -> torch.Tensor:
    r"""MaPO's bounded stand-in for likelihood, ``f(e) = s e / (exp(s e) - 1)``, with its limit ``f(0) = 1``.

    Computed as ``x / expm1(x)``: the naive ``exp(x) - 1`` loses about four significant digits in float32 at
    ``e = 1e-3``, enough to flip the sign of a MaPO margin. The ``where`` keeps both value and gradient finite at 0.
    """
    x = snr_value * errors
    is_zero = x == 0
    safe_x = torch.where(is_zero, torch.ones_like(x), x)
    return torch.where(is_zero, torch.ones_like(x), safe_x / torch.expm1(safe_x))


def mapo_loss(
    policy_chosen_errors: torch.Tensor,
    policy_rejected_errors: torch.Tensor,
    beta: float = 0.1,
    num_train_timesteps: int = 1000,
    snr_value: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Margin-aware Preference Optimization loss (Hong et al. 2024, arXiv 2406.06424), reference-free.

    With ``f(e) = s e / (exp(s e) - 1)`` (``s = snr_value``, see [`mapo_score`][]) and ``T = num_train_timesteps``,
    the margin is ``m = T (f(e_w) - f(e_l))`` and

        ``L = mean(e_w) - beta * mean log sigma(m)``

    The first term is supervised fine-tuning on the chosen images; the second pushes the chosen image's likelihood
    above the rejected one's, as in the authors' released code.

    Returns:
        ``(loss, metrics)`` with per-pair ``mapo/sft_loss``, ``mapo/ratio_loss`` (``-beta log sigma(m)``),
        ``mapo/chosen_score``, ``mapo/rejected_score``, ``mapo/margin``, ``mapo/accuracy`` and the policy MSEs.
    """
    chosen_score = mapo_score(policy_chosen_errors, snr_value)
    rejected_score = mapo_score(policy_rejected_errors, snr_value)
    margins = num_train_timesteps * (chosen_score - rejected_score)
    ratio_losses = -beta * F.logsigmoid(margins)
    loss = policy_chosen_errors.mean() + ratio_losses.mean()
    metrics = {
        "mapo/sft_loss": policy_chosen_errors.detach(),
        "mapo/ratio_loss": ratio_losses.detach(),
        "mapo/chosen_score": chosen_score.detach(),
        "mapo/rejected_score": rejected_score.detach(),
        "mapo/margin": margins.detach(),
        "mapo/accuracy": preference_accuracy(margins.detach()),
        "mse/policy_chosen": policy_chosen_errors.detach(),
        "mse/policy_rejected": policy_rejected_errors.detach(),
    }
    return loss, metrics


def annotator_ema_decay(decay: float, num_updates: int) -> float:
    r"""The decay of an Adaptive-DPO EMA annotator at its ``num_updates``-th update (1-based), as the authors run it.

    The authors' annotators are diffusers ``EMAModel``\ s with its defaults (no ``update_after_step``, no
    ``use_ema_warmup``, ``min_decay = 0``). ``EMAModel.get_decay`` then gives, with ``s = num_updates - 1``:

    - ``s = 0`` (the first update after an optimizer step): ``0``, so the annotator becomes a copy of the policy;
    - ``s >= 1``: ``min(decay, (1 + s) / (10 + s))``.

    So the ``0.9999`` annotator is a trailing average of the policy that lags behind it by a share of the run, never a
    frozen copy of the initial weights.
    """
    if num_updates < 1:
        raise ValueError(f"num_updates counts updates from 1, got {num_updates}.")
    step = num_updates - 1
    if step == 0:
        return 0.0
    return min(decay, (1 + step) / (10 + step))


def annotator_margins(annotator_errors: Sequence[torch.Tensor], ref_errors: torch.Tensor) -> torch.Tensor:
    r"""The implicit reward margin of each pair as each Adaptive-DPO annotator judges it (arXiv 2503.16921), detached.

    For annotator ``m`` (the policy, then the EMA copies of it) with errors ``e^m_w``, ``e^m_l`` on a pair's chosen and
    rejected images, and the reference's ``r_w``, ``r_l``: ``l_m = (r_w - r_l) - (e^m_w - e^m_l)``, the margin of
    [`implicit_reward_margin`][].

    Args:
        annotator_errors: ``M`` tensors of shape ``(2B,)``, each a batch's errors, chosen images first.
        ref_errors: ``(2B,)`` errors of the reference, in the same order.

    Returns:
        ``(M, B)`` detached margins, the input of [`minority_score_terms`][].
    """
    ref_chosen, ref_rejected = ref_errors.detach().chunk(2)
    margins = []
    for errors in annotator_errors:
        chosen, rejected = errors.detach().chunk(2)
        margins.append(implicit_reward_margin(chosen, rejected, ref_chosen, ref_rejected))
    return torch.stack(margins)


def minority_warmup(global_step: int, warmup_steps: int, num_ema_annotators: int) -> bool:
    """Whether Adaptive-DPO's minority scores are held at ``u = 0`` at a training step (the authors' warm-up).

    During the first ``warmup_steps`` optimizer steps the EMA annotators are still settling (the first update makes
    each a copy of the policy, see [`annotator_ema_decay`][]), so their judgement is not used and the loss is plain
    DPO with its margin. Without EMA annotators the policy alone scores the pairs from the first step, as in the
    authors' code. Evaluation never warms up.

    Args:
        global_step: the optimizer step (0-based).
        warmup_steps: ``minority_warmup_steps``.
        num_ema_annotators: how many EMA annotators judge beside the policy.

    Returns:
        ``True`` while ``u`` is held at 0.
    """
    return num_ema_annotators > 0 and global_step < warmup_steps


def minority_score_terms(
    annotator_margins: torch.Tensor,
    rho: float = 15.0,
    normalize: bool = True,
    prior_confidence: torch.Tensor | None = None,
    warmup: bool = False,
) -> dict[str, torch.Tensor]:
    r"""Adaptive-DPO's per-pair minority score ``u`` and its two factors (arXiv 2503.16921, the authors' code).

    ``annotator_margins`` has shape ``(M, B)``: the implicit reward margin of each pair as judged by ``M``
    annotators (the policy and EMA copies of it). With ``normalize``, each row is divided by its L2 norm over the
    batch, ``l_hat = l / ||l||``. Then, with ``z = rho * l_hat``:

    - ``M > 1``: ``u = |mean_m sigma(z) - 1| * min(std_m(z), 1)``, intra-annotator confidence times inter-annotator
      instability (``std`` is torch's default, unbiased, over the annotator dimension);
    - ``M == 1``: ``u = 1 - sigma(z)``. The authors' code never normalises here: it scales the raw margins.

    A pair the annotators agree the model prefers gets ``u`` near 0; one they find dispreferred, or disagree on, gets
    a larger ``u``. An optional ``(B,)`` ``prior_confidence`` in ``[0, 1]`` (for example the agreement rate of several
    human annotators) multiplies into the confidence ``mean_m sigma(z)`` (beyond the paper). With ``warmup`` (the
    first optimizer steps, while the EMA annotators settle) ``u = 0``, so the loss is plain DPO with its margin.

    Returns:
        Detached ``(B,)`` tensors: ``u``, ``confidence`` and (``M > 1`` only) ``stability``, the clamped
        ``std_m(z)``; and ``margin_norms``, shape ``(M,)``, the L2 norm of each annotator's raw margins over the
        batch (a dead annotator, one whose margins are rounding noise, shows as a norm near 0).
    """
    margins = annotator_margins.detach().float()
    norms = margins.norm(dim=1)
    if normalize:
        margins = margins / norms.clamp_min(torch.finfo(margins.dtype).tiny)[:, None]
    z = rho * margins
    confidence = torch.sigmoid(z).mean(dim=0)
    if prior_confidence is not None:
        confidence = confidence * prior_confidence.to(confidence)
    terms = {"confidence": confidence, "margin_norms": norms}
    if z.shape[0] == 1:
        u = 1 - confidence
    else:
        terms["stability"] = z.std(dim=0).clamp(max=1.0)
        u = (confidence - 1).abs() * terms["stability"]
    terms["u"] = torch.zeros_like(u) if warmup else u
    return terms


def minority_scores(
    annotator_margins: torch.Tensor,
    rho: float = 15.0,
    normalize: bool = True,
    prior_confidence: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adaptive-DPO's per-pair minority score ``u``, detached: the ``u`` of [`minority_score_terms`][]."""
    return minority_score_terms(annotator_margins, rho, normalize, prior_confidence)["u"]


def flip_minority_labels(
    margins: torch.Tensor, u: torch.Tensor, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Treat pairs whose minority score exceeds ``threshold`` as mislabelled: ``l <- -l`` where ``u > threshold``.

    Beyond the paper's loss (the authors' code has it as ``flip_un_label``): the loss then pulls such a pair towards
    the other image. Only for data known to hold flipped labels.

    Args:
        margins: ``(B,)`` implicit reward margins ``l``.
        u: ``(B,)`` minority scores.
        threshold: the minority score above which a pair is flipped; ``None`` flips nothing.

    Returns:
        ``(margins, flipped)``: the margins with flipped pairs negated, and the boolean ``(B,)`` mask of those pairs.
    """
    if threshold is None:
        return margins, torch.zeros_like(u, dtype=torch.bool)
    flipped = u.detach() > threshold
    return torch.where(flipped, -margins, margins), flipped


def adaptive_dpo_loss(
    policy_margins: torch.Tensor,
    u: torch.Tensor,
    beta: float = 1000.0,
    weight_type: str = "linear",
    k: float = 10.0,
    c: float = 1.0,
    margin_type: str = "quadratic",
    flip_threshold: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Minority-aware Adaptive-DPO loss (arXiv 2503.16921, as in the authors' released code).

    With the policy's implicit reward margins ``l`` and minority scores ``u`` (see [`minority_scores`][]):

    - with ``flip_threshold`` (beyond the paper's loss, as the authors' ``flip_un_label``): pairs with
      ``u > flip_threshold`` are treated as mislabelled, ``l <- -l``;
    - weight ``w = 1 / (k u + c)`` (``linear``) or ``w = 1 / (k u^2 + c)`` (``quadratic``);
    - adaptive margin ``gamma = -u^2 / beta + mean(l)`` (``quadratic``), ``-u / beta + mean(l)`` (``linear``) or
      ``0`` (``none``);
    - ``L = -mean(w * log sigma(beta * l - gamma))``.

    ``u``, ``w`` and ``mean(l)`` are detached: they reweight the gradient of each pair without being trained.

    Returns:
        ``(loss, metrics)`` with per-pair ``adaptive/u_mean``, ``adaptive/weight_mean``, ``adaptive/gamma_mean``,
        ``adaptive/minority_fraction`` (``u > 0.5``) and ``adaptive/flipped_fraction``; the names are those logged
        after averaging over pairs.
    """
    u = u.detach()
    policy_margins, flipped = flip_minority_labels(policy_margins, u, flip_threshold)
    if weight_type == "linear":
        weights = 1 / (k * u + c)
    elif weight_type == "quadratic":
        weights = 1 / (k * u**2 + c)
    else:
        raise ValueError(f"Unknown weight_type {weight_type!r}; expected 'linear' or 'quadratic'.")
    if margin_type == "quadratic":
        gamma = -(u**2) / beta + policy_margins.detach().mean()
    elif margin_type == "linear":
        gamma = -u / beta + policy_margins.detach().mean()
    elif margin_type == "none":
        gamma = torch.zeros_like(u)
    else:
        raise ValueError(f"Unknown margin_type {margin_type!r}; expected 'quadratic', 'linear' or 'none'.")
    losses = -weights * F.logsigmoid(beta * policy_margins - gamma)
    metrics = {
        "adaptive/u_mean": u,
        "adaptive/weight_mean": weights,
        "adaptive/gamma_mean": gamma,
        "adaptive/minority_fraction": (u > 0.5).float(),
        "adaptive/flipped_fraction": flipped.float(),
    }
    return losses.mean(), metrics


def adaptive_dpo_loss_from_errors(
    policy_errors: torch.Tensor,
    ref_errors: torch.Tensor,
    ema_annotator_errors: Mapping[str, torch.Tensor],
    beta: float = 1000.0,
    rho: float = 15.0,
    normalize: bool = True,
    prior_confidence: torch.Tensor | None = None,
    warmup: bool = False,
    weight_type: str = "linear",
    k: float = 10.0,
    c: float = 1.0,
    margin_type: str = "quadratic",
    flip_threshold: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Minority-aware Adaptive-DPO (arXiv 2503.16921) from a batch's denoising errors: the whole method's maths.

    1. The policy's margins ``l = (r_w - r_l) - (e_w - e_l)`` ([`implicit_reward_margin`][]).
    2. Every annotator's margins ``l_m`` ([`annotator_margins`][]): the policy's (detached), then each EMA annotator's.
    3. The minority score ``u`` from their agreement ([`minority_score_terms`][]; ``u = 0`` with ``warmup``).
    4. ``L = -mean(w * log sigma(beta * l - gamma))`` with the pair weight ``w`` and adaptive margin ``gamma`` of
       ``u`` ([`adaptive_dpo_loss`][], with the optional label flip of [`flip_minority_labels`][]).

    Args:
        policy_errors: ``(2B,)`` errors of the policy, chosen images first.
        ref_errors: ``(2B,)`` errors of the reference.
        ema_annotator_errors: ``(2B,)`` no-grad errors of each EMA annotator, by name (empty: the policy alone).
        beta: KL-regularisation strength, on the Diffusion-DPO scale.
        rho: scale ``rho`` of the annotators' margins inside the minority score.
        normalize: divide each annotator's margins by their L2 norm over the batch before scaling by ``rho``.
        prior_confidence: optional ``(B,)`` per-pair prior confidence in ``[0, 1]``, multiplied into the confidence.
        warmup: hold ``u`` at 0 (the first optimizer steps, see [`minority_warmup`][]).
        weight_type: pair weight ``1 / (k u + c)`` (``linear``) or ``1 / (k u^2 + c)`` (``quadratic``).
        k: scale of ``u`` in the pair weight.
        c: offset of the pair weight.
        margin_type: adaptive margin ``gamma``: ``quadratic``, ``linear`` or ``none`` (see [`adaptive_dpo_loss`][]).
        flip_threshold: minority score above which a pair's margin is negated; ``None`` flips nothing.

    Returns:
        ``(loss, metrics)``: the metrics of [`adaptive_dpo_loss`][] and [`dpo_reward_metrics`][], and
        ``adaptive/confidence_mean``, ``adaptive/stability_mean`` (with EMA annotators) and, one value per batch,
        ``adaptive/margin_norm/<annotator>`` (``policy``, then each EMA annotator's name).
    """
    policy_chosen, policy_rejected = policy_errors.chunk(2)
    ref_chosen, ref_rejected = ref_errors.chunk(2)
    margins = implicit_reward_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    judged = annotator_margins([policy_errors, *ema_annotator_errors.values()], ref_errors)
    terms = minority_score_terms(judged, rho, normalize, prior_confidence, warmup)
    u = terms["u"]
    loss, metrics = adaptive_dpo_loss(margins, u, beta, weight_type, k, c, margin_type, flip_threshold)
    metrics["adaptive/confidence_mean"] = terms["confidence"]
    if "stability" in terms:
        metrics["adaptive/stability_mean"] = terms["stability"]
    for name, norm in zip(["policy", *ema_annotator_errors], terms["margin_norms"], strict=True):
        metrics[f"adaptive/margin_norm/{name}"] = norm.expand_as(u)
    metrics.update(dpo_reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))
    return loss, metrics
