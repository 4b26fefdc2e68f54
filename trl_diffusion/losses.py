"""Preference losses for diffusion models, one pure tensor function per method.

Every function takes per-sample denoising errors (``e = mean over C, H, W of (prediction - target)^2``, float32) and
returns ``(loss, metrics)``: a scalar loss tensor and a dict of detached tensors of shape ``(B,)``, one value per
pair. The trainers average the metrics over pairs, steps and processes before logging them.

Notation, shared by the whole library (see ``shared/DESIGN.md``): ``e_w``, ``e_l`` are the policy's errors on the
chosen (winning) and rejected (losing) image of a pair, ``r_w``, ``r_l`` the reference's. The implicit reward margin is
``l = (r_w - r_l) - (e_w - e_l)``: how much more the policy improved on the chosen image than on the rejected one,
relative to the reference. Every DPO-family loss is a function of ``beta * l``.
"""

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

    Args:
        policy_chosen_errors, policy_rejected_errors: ``(B,)`` per-sample errors of the policy.
        ref_chosen_errors, ref_rejected_errors: ``(B,)`` per-sample errors of the frozen reference.
        beta: KL-regularisation strength.
        loss_type: one of ``sigmoid``, ``hinge``, ``ipo``, ``conservative``, ``robust``.
        label_smoothing: ``eps``, the assumed probability that a label is flipped (``conservative``/``robust``).

    Returns:
        ``(loss, metrics)``, the scalar loss and per-pair detached metrics (see [`dpo_reward_metrics`]).
    """
    margins = implicit_reward_margin(
        policy_chosen_errors, policy_rejected_errors, ref_chosen_errors, ref_rejected_errors
    )
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

    With ``f(e) = s e / (exp(s e) - 1)`` (``s = snr_value``, see [`mapo_score`]) and ``T = num_train_timesteps``,
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
    """Adaptive-DPO's per-pair minority score ``u``, detached: the ``u`` of [`minority_score_terms`]."""
    return minority_score_terms(annotator_margins, rho, normalize, prior_confidence)["u"]


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

    With the policy's implicit reward margins ``l`` and minority scores ``u`` (see [`minority_scores`]):

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
    flipped = torch.zeros_like(u, dtype=torch.bool)
    if flip_threshold is not None:
        flipped = u > flip_threshold
        policy_margins = torch.where(flipped, -policy_margins, policy_margins)
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
