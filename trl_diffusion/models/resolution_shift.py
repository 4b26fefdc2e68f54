"""The resolution-dependent ("dynamic") shift of flow-matching noise levels, applied at training time.

Schedulers with ``use_dynamic_shifting`` (Flux.1, Flux.2, Qwen-Image) shift the noise levels of a sampling run by
a ``μ`` that the pipeline computes from the number of image tokens, with `FlowMatchEulerDiscreteScheduler`'s
``time_shift``:

- ``exponential``: ``σ' = e^μ / (e^μ + (1/σ − 1))``, i.e. the static shift ``s·σ / (1 + (s − 1)·σ)`` with
  ``s = e^μ``;
- ``linear``: ``σ' = μ / (μ + (1/σ − 1))``, the static shift with ``s = μ``.

[`ResolutionShiftMixin`][] applies the same shift to the training noise levels, for the training resolution, so that
training sees the noise levels the pipeline samples at.
"""

import math

import torch


def time_shift(sigmas: torch.Tensor, mu: float, shift_type: str = "exponential") -> torch.Tensor:
    """``FlowMatchEulerDiscreteScheduler.time_shift`` with exponent 1, written as the equivalent static shift
    ``s·σ / (1 + (s − 1)·σ)`` (``s = e^μ`` or ``μ``), which is finite at ``σ = 0``."""
    if shift_type == "exponential":
        scale = math.exp(mu)
    elif shift_type == "linear":
        scale = mu
    else:
        raise ValueError(f"Unknown time_shift_type {shift_type!r}; expected 'exponential' or 'linear'.")
    return scale * sigmas / (1 + (scale - 1) * sigmas)


def linear_mu(image_seq_len: int, scheduler_config) -> float:
    """``μ`` of ``calculate_shift`` (FluxPipeline, QwenImagePipeline, ZImagePipeline): linear in the number of image
    tokens, from ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len``."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


class ResolutionShiftMixin:
    """Shift a flow-matching family's training noise levels by the pipeline's ``μ`` at the training resolution.

    Put it before [`FlowMatchingFamily`][] in the bases. With a dynamic-shift scheduler the base family leaves ``σ``
    unshifted; this mixin then maps it through [`time_shift`][] with ``μ = `` [`resolution_mu`][], when the config's
    ``resolution_shift`` (or, if that is ``None``, the class's ``default_resolution_shift``) says so.

    Attributes:
        default_resolution_shift: whether the family shifts when ``resolution_shift`` is ``None``.
    """

    default_resolution_shift: bool = True

    def __init__(self, pipeline, options):
        super().__init__(pipeline, options)
        config = pipeline.scheduler.config
        dynamic = bool(config.get("use_dynamic_shifting", False))
        requested = options.resolution_shift
        if requested and not dynamic:
            raise ValueError(
                f"resolution_shift=True, but the scheduler of {type(pipeline).__name__} has a static shift "
                f"({config.get('shift', 1.0)}), already applied to the training noise levels."
            )
        self.resolution_shift = dynamic and (self.default_resolution_shift if requested is None else requested)
        self.shift_type = config.get("time_shift_type", "exponential")

    def image_seq_len(self) -> int:
        """Image tokens of a ``resolution``² training image: latents of ``resolution / vae_scale_factor`` a side,
        in 2x2 patches."""
        side = self.options.resolution // (2 * self.pipeline.vae_scale_factor)
        return side * side

    def resolution_mu(self) -> float:
        """The ``μ`` the pipeline uses for a ``resolution``² image (default: [`linear_mu`][])."""
        return linear_mu(self.image_seq_len(), self.pipeline.scheduler.config)

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        timesteps = super().timesteps_from_uniform(u)
        if not self.resolution_shift:
            return timesteps
        sigmas = time_shift(timesteps / self.num_train_timesteps, self.resolution_mu(), self.shift_type)
        return sigmas * self.num_train_timesteps
