"""Model families: one module per kind of pipeline, and the registry that picks one."""

from typing import TYPE_CHECKING

from diffusers import DiffusionPipeline

from .base import DiffusionFamily
from .flow_matching import FlowMatchingFamily
from .flux import FluxFamily
from .flux2 import Flux2Family
from .options import FamilyOptions
from .qwen_image import QwenImageFamily
from .stable_diffusion import StableDiffusionFamily
from .stable_diffusion_3 import StableDiffusion3Family
from .stable_diffusion_xl import StableDiffusionXLFamily
from .wan import WanFamily
from .z_image import ZImageFamily


if TYPE_CHECKING:
    from ..trainer.base_config import DiffusionPreferenceConfig


FAMILIES: list[type[DiffusionFamily]] = [
    StableDiffusionFamily,
    StableDiffusionXLFamily,
    StableDiffusion3Family,
    FluxFamily,
    Flux2Family,
    QwenImageFamily,
    ZImageFamily,
    WanFamily,
]


def get_family(pipeline: DiffusionPipeline, options: "FamilyOptions | DiffusionPreferenceConfig") -> DiffusionFamily:
    """Return the family adapter for a loaded pipeline, chosen by the pipeline's class (or a parent class).

    Args:
        pipeline: the loaded pipeline.
        options: the family's [`FamilyOptions`][], or a training config to build them from
            ([`FamilyOptions.from_config`][]).

    Raises:
        ValueError: no family serves the pipeline's class.
    """
    if not isinstance(options, FamilyOptions):
        options = FamilyOptions.from_config(options)
    class_names = [cls.__name__ for cls in type(pipeline).__mro__]
    for name in class_names:
        for family in FAMILIES:
            if name in family.pipeline_class_names:
                return family(pipeline, options)
    supported = sorted(name for family in FAMILIES for name in family.pipeline_class_names)
    raise ValueError(f"No trl_diffusion model family supports {type(pipeline).__name__}; supported: {supported}.")


__all__ = [
    "FAMILIES",
    "DiffusionFamily",
    "FamilyOptions",
    "FlowMatchingFamily",
    "Flux2Family",
    "FluxFamily",
    "QwenImageFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "WanFamily",
    "ZImageFamily",
    "get_family",
]
