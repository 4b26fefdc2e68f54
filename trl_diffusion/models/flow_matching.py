"""Rectified-flow ("flow matching") training, shared by SD3 and Flux: noise levels, noisy inputs, velocity targets.

With a noise level ``σ ∈ (0, 1]`` the denoiser sees ``x_t = (1 − σ)·x_0 + σ·ε`` and regresses the velocity
``v = ε − x_0``. Timesteps are ``t = σ·T`` on the scale of the scheduler's ``num_train_timesteps`` ``T``.

A velocity prediction ``v̂`` implies a noise prediction ``ε̂ = x_t + (1 − σ)·v̂`` (because ``x_t + (1 − σ)·v = ε``),
so ``ε̂ − ε = (1 − σ)·(v̂ − v)``: the ε-error is ``(1 − σ)²`` times the velocity error. Weighting velocity errors by
``(1 − σ)²`` (``epsilon_equivalent_errors``) therefore puts them on the scale of the ε-prediction families.
"""

import math

import torch

from .base import DiffusionFamily


def sigmas_from_uniform(
    u: torch.Tensor,
    weighting_scheme: str,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Noise levels ``σ`` from uniforms ``u ∈ [0, 1)`` by the inverse CDF of the chosen density (SD3 paper, §3.1).

    - ``uniform``: ``σ = 1 − u``;
    - ``logit_normal``: ``σ = sigmoid(m + s·Φ⁻¹(1 − u))``, i.e. ``σ = sigmoid(n)`` with ``n ~ N(m, s²)``;
    - ``mode``: ``σ = f(u) = 1 − u − c·(cos²(πu/2) − 1 + u)``, the SD3 paper's mode sampling with scale ``c``.

    Every map is deterministic and decreasing in ``u`` (``u = 0`` gives ``σ = 1``, pure noise), as
    ``scheduler.timesteps[int(u·T)]`` is in the diffusers examples. Since ``f(1 − u) = 1 − f(u)``, the ``mode``
    density is symmetric and its direction does not matter; ``logit_normal`` with ``m > 0`` favours noisy levels.
    """
    if weighting_scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(1 - u))
    if weighting_scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if weighting_scheme == "uniform":
        return 1 - u
    raise ValueError(f"Unknown weighting_scheme {weighting_scheme!r}; expected 'uniform', 'logit_normal' or 'mode'.")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The resolution shift of `FlowMatchEulerDiscreteScheduler`: ``σ' = shift·σ / (1 + (shift − 1)·σ)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_loss_weights(sigmas: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weights of the velocity error, as in the diffusers SD3/Flux examples.

    ``none``: 1; ``sigma_sqrt``: ``σ⁻²``; ``cosmap``: ``2 / (π·(1 − 2σ + 2σ²))``.
    """
    if weighting == "sigma_sqrt":
        return sigmas**-2
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    if weighting == "none":
        return torch.ones_like(sigmas)
    raise ValueError(f"Unknown flow_loss_weighting {weighting!r}; expected 'none', 'sigma_sqrt' or 'cosmap'.")


class FlowMatchingFamily(DiffusionFamily):
    """Shared base of the rectified-flow families (SD3, Flux), configured by the trainer's config.

    Timesteps: ``σ = shift(clamp(density⁻¹(u), 1/T, 1))`` and ``t = σ·T`` (see [`sigmas_from_uniform`][]). The clamp
    keeps ``σ`` on the range of the examples' discrete grid ``{1/T, ..., 1}``. The shift is the scheduler's static
    ``shift`` (SD3: 3.0), which the examples apply through ``scheduler.timesteps``; a scheduler with
    ``use_dynamic_shifting`` (Flux) shifts by image size: here it leaves ``σ`` unshifted, and
    [`ResolutionShiftMixin`][] applies the pipeline's resolution shift where the family or `resolution_shift` asks for
    it.

    Error weights: ``w(σ) = flow_loss_weighting(σ)``, times ``(1 − σ)²`` with ``epsilon_equivalent_errors``.

    Latents: ``z = (mean − shift_factor)·scaling_factor`` of the VAE's posterior.
    """

    denoiser_name = "transformer"
    # The pipeline's default T5 prompt length, used when `max_sequence_length` is unset
    default_max_sequence_length: int = 256

    def __init__(self, pipeline, options):
        super().__init__(pipeline, options)
        config = pipeline.scheduler.config
        self._num_train_timesteps = int(config.num_train_timesteps)
        self.shift = 1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))

    def _check_resolution(self, multiple: int) -> None:
        if self.options.resolution % multiple:
            raise ValueError(
                f"{type(self.pipeline).__name__} needs a resolution that is a multiple of {multiple}, "
                f"got {self.options.resolution}."
            )

    def max_sequence_length(self, t5_tokenizer) -> int:
        """T5 prompt length: ``max_sequence_length``, else the pipeline's default capped at the tokenizer's limit."""
        if self.options.max_sequence_length is not None:
            return self.options.max_sequence_length
        if t5_tokenizer is None:
            return self.default_max_sequence_length
        return min(self.default_max_sequence_length, t5_tokenizer.model_max_length)

    @property
    def num_train_timesteps(self) -> int:
        return self._num_train_timesteps

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``σ = t / T``, in float32."""
        return timesteps.float() / self.num_train_timesteps

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        options = self.options
        sigmas = sigmas_from_uniform(
            u.float(), options.weighting_scheme, options.logit_mean, options.logit_std, options.mode_scale
        )
        sigmas = shift_sigmas(sigmas.clamp(1 / self.num_train_timesteps, 1.0), self.shift)
        return sigmas * self.num_train_timesteps

    def _per_sample(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sigmas(timesteps).view(-1, *([1] * (like.dim() - 1)))

    def noisy_input(self, latents, noise, timesteps):
        sigmas = self._per_sample(timesteps, latents)
        return (1 - sigmas) * latents + sigmas * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def error_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        weighting, epsilon_equivalent = self.options.flow_loss_weighting, self.options.epsilon_equivalent_errors
        if weighting == "none" and not epsilon_equivalent:
            return None
        sigmas = self.sigmas(timesteps)
        weights = flow_loss_weights(sigmas, weighting)
        return weights * (1 - sigmas) ** 2 if epsilon_equivalent else weights
