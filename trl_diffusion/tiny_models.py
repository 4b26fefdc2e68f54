"""Kept for compatibility: the tiny model builders now live in `trl_diffusion.testing.tiny_models`.

``from trl_diffusion.tiny_models import build_tiny_stable_diffusion`` keeps working; new code should import from
`trl_diffusion.testing.tiny_models`.
"""

from .testing.tiny_models import (
    build_tiny_chat_tokenizer,
    build_tiny_clip_tokenizer,
    build_tiny_flux,
    build_tiny_flux2,
    build_tiny_qwen_image,
    build_tiny_sd3,
    build_tiny_sdxl,
    build_tiny_stable_diffusion,
    build_tiny_t5_tokenizer,
    build_tiny_wan,
    build_tiny_z_image,
)


__all__ = [
    "build_tiny_chat_tokenizer",
    "build_tiny_clip_tokenizer",
    "build_tiny_flux",
    "build_tiny_flux2",
    "build_tiny_qwen_image",
    "build_tiny_sd3",
    "build_tiny_sdxl",
    "build_tiny_stable_diffusion",
    "build_tiny_t5_tokenizer",
    "build_tiny_wan",
    "build_tiny_z_image",
]
