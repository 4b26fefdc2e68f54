"""The interface every model family implements, so that no trainer needs to know which model it trains."""

from typing import Any

import torch
from diffusers import DiffusionPipeline

from .options import FamilyOptions


def token_ids(tokenizer, prompts: list[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
    """Token ids of ``prompts`` padded and truncated to ``max_length`` (default: the tokenizer's
    ``model_max_length``), as the diffusers pipelines tokenize them."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def two_clip_outputs(pipeline: DiffusionPipeline, prompts: list[str]) -> list:
    """Outputs (with hidden states) of the pipeline's two CLIP text encoders, as SDXL and SD3 both use them."""
    encoders = ((pipeline.tokenizer, pipeline.text_encoder), (pipeline.tokenizer_2, pipeline.text_encoder_2))
    return [
        text_encoder(token_ids(tokenizer, prompts, text_encoder.device), output_hidden_states=True)
        for tokenizer, text_encoder in encoders
    ]


class DiffusionFamily:
    """Everything that differs between model families, behind one small interface.

    A family wraps a loaded pipeline and tells the trainers how to encode prompts and images, how to turn a uniform
    random number into a training timestep, how to noise a latent, what the regression target is, and how to call
    the denoiser. It reads its options (resolution, flow-matching density...) from a [`FamilyOptions`][].
    Subclasses set the class attributes and override the methods that differ.

    Attributes:
        pipeline_class_names: names of the `DiffusionPipeline` classes the family serves.
        denoiser_name: the pipeline attribute (and folder) that holds the trained network.
        lora_target_modules: default LoRA targets when the user's `LoraConfig` names none.
        is_video: whether the family trains on videos (latents ``(C, F, H, W)``, datasets of video pairs).
    """

    pipeline_class_names: tuple[str, ...] = ()
    denoiser_name: str = "unet"
    lora_target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    is_video: bool = False

    def __init__(self, pipeline: DiffusionPipeline, options: FamilyOptions):
        self.pipeline = pipeline
        self.options = options

    def encoding_key(self) -> dict[str, Any]:
        """What identifies the family's encoders besides their weights, for the encoding cache's fingerprint: the
        family and pipeline classes and the options that can change encodings ([`FamilyOptions.encoding_key`][])."""
        return {
            "family": f"{type(self).__module__}.{type(self).__qualname__}",
            "pipeline": type(self.pipeline).__name__,
            "options": self.options.encoding_key(),
        }

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The pipeline's networks that never train (VAE, text encoders), by component name."""
        modules = {}
        for name, component in self.pipeline.components.items():
            if isinstance(component, torch.nn.Module) and name != self.denoiser_name:
                modules[name] = component
        return modules

    def frozen_module_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype a frozen module runs in: the compute dtype, unless the family needs more (e.g. SDXL's VAE)."""
        return compute_dtype

    @property
    def num_train_timesteps(self) -> int:
        raise NotImplementedError

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt conditioning, one row per prompt, as keyword tensors that [`predict`][] understands."""
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Latents of images in ``[-1, 1]``, already scaled as the denoiser expects them."""
        raise NotImplementedError

    def image_conditioning(self, inputs: dict) -> dict[str, torch.Tensor]:
        """Per-image conditioning from the batch (e.g. SDXL's size and crop micro-conditioning), ``2B`` rows."""
        return {}

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Map uniform samples in ``[0, 1)`` to training timesteps, on the scale of ``num_train_timesteps``."""
        raise NotImplementedError

    def noisy_input(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def error_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Optional per-sample weights applied to the squared error; ``None`` means unweighted."""
        return None

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Run the denoiser and return its prediction, in the shape of ``target``."""
        raise NotImplementedError

    def save_lora_weights(self, save_directory: str, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write the denoiser's LoRA state dict in the diffusers format that ``load_lora_weights`` reads."""
        type(self.pipeline).save_lora_weights(
            save_directory,
            **{f"{self.denoiser_name}_lora_layers": state_dict},
            **{f"{self.denoiser_name}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )
