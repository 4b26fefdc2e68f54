"""The options a model family reads: a small frozen object built from the trainer's config, not the config itself.

Every field is named as the config field it is read from ([`FamilyOptions.from_config`][] copies them by name, so a
new field needs no extra code). The encoding cache is keyed by [`FamilyOptions.encoding_key`][]: every field except
those marked ``STEP_ONLY`` (options that change noise levels, weights or guidance of the training step, never what
the frozen VAE and text encoders produce). A new option is therefore part of the cache key unless someone marks it
step-only: forgetting costs a needless re-encode, never a stale cache.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Any


# Field metadata of an option that never changes the VAE's latents or the prompt embeddings
STEP_ONLY = {"step_only": True}


@dataclass(frozen=True)
class FamilyOptions:
    """What a [`DiffusionFamily`][] reads from the training config (see `DiffusionPreferenceConfig` for each field).

    Attributes:
        resolution: side of the square training images.
        max_sequence_length: prompt tokens of the T5/chat encoders (``None``: the family's default).
        pretrained_vae_model_name_or_path: SDXL's replacement VAE.
        upcast_vae: SDXL: run the VAE in float32 (``None``: unless a replacement VAE is given).
        num_frames: video families' frames per clip (``None``: the family's default).
        video_size: video families' ``(height, width)`` (``None``: ``resolution`` squared).
        weighting_scheme: flow matching's noise-level density.
        logit_mean: mean of the ``logit_normal`` density.
        logit_std: standard deviation of the ``logit_normal`` density.
        mode_scale: scale of the ``mode`` density.
        flow_loss_weighting: flow matching's weight of the velocity errors.
        epsilon_equivalent_errors: weight velocity errors by ``(1 − σ)²``.
        guidance_scale: the guidance embedding of guidance-distilled transformers.
        resolution_shift: shift flow-matching noise levels for the resolution (``None``: the family's default).
    """

    resolution: int = 512
    max_sequence_length: int | None = None
    pretrained_vae_model_name_or_path: str | None = None
    upcast_vae: bool | None = None
    num_frames: int | None = None
    video_size: tuple[int, int] | None = None
    weighting_scheme: str = field(default="logit_normal", metadata=STEP_ONLY)
    logit_mean: float = field(default=0.0, metadata=STEP_ONLY)
    logit_std: float = field(default=1.0, metadata=STEP_ONLY)
    mode_scale: float = field(default=1.29, metadata=STEP_ONLY)
    flow_loss_weighting: str = field(default="none", metadata=STEP_ONLY)
    epsilon_equivalent_errors: bool = field(default=False, metadata=STEP_ONLY)
    guidance_scale: float = field(default=3.5, metadata=STEP_ONLY)
    resolution_shift: bool | None = field(default=None, metadata=STEP_ONLY)

    @classmethod
    def from_config(cls, args) -> "FamilyOptions":
        """Copy every field from the config attribute of the same name (lists become tuples, to stay hashable).

        Raises:
            AttributeError: the config has no attribute for a field (a field must be named as its config option).
        """
        values = {}
        for option in fields(cls):
            value = getattr(args, option.name)
            values[option.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def encoding_key(self) -> dict[str, Any]:
        """The options that can change the encodings, for the encoding cache's fingerprint: all but ``STEP_ONLY``."""
        return {
            option.name: getattr(self, option.name) for option in fields(self) if not option.metadata.get("step_only")
        }

    def key(self) -> dict[str, Any]:
        """All options, for fingerprints of what the training step computes (precomputed reference errors)."""
        return asdict(self)
