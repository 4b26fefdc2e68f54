"""Stable Diffusion XL: two CLIP text encoders, size and crop micro-conditioning, DDPM noise as in SD 1.x/2.x."""

import os

import torch
from diffusers import AutoencoderKL

from .base import two_clip_outputs
from .stable_diffusion import StableDiffusionFamily


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL. Noise, timesteps and targets (``epsilon`` or ``v_prediction``) are those of [`StableDiffusionFamily`][].

    What differs is the conditioning, built as ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``
    build it:

    - ``encoder_hidden_states = [h_1 ; h_2]``: the penultimate hidden states of both text encoders, concatenated on
      the feature axis;
    - ``text_embeds``: the projected pooled output of the second text encoder;
    - ``time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` per image, from the batch's
      ``original_sizes`` and ``crop_top_lefts`` and the square training ``resolution``.

    The VAE runs in float32 unless ``upcast_vae=False`` (SDXL's VAE overflows in float16). With
    ``pretrained_vae_model_name_or_path`` (such as the fp16-fix VAE) that VAE replaces the pipeline's, and by
    default runs in the compute dtype.
    """

    pipeline_class_names = ("StableDiffusionXLPipeline",)
    denoiser_name = "unet"

    def __init__(self, pipeline, options):
        vae_path = options.pretrained_vae_model_name_or_path
        if vae_path is not None:
            subfolder = "vae" if os.path.isdir(os.path.join(vae_path, "vae")) else None
            pipeline.register_modules(vae=AutoencoderKL.from_pretrained(vae_path, subfolder=subfolder))
        super().__init__(pipeline, options)
        self.upcast_vae = options.upcast_vae if options.upcast_vae is not None else vae_path is None

    def frozen_module_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if name == "vae" and self.upcast_vae else compute_dtype

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipeline = self.pipeline
        outputs = two_clip_outputs(pipeline, prompts)
        return {
            "encoder_hidden_states": torch.cat([output.hidden_states[-2] for output in outputs], dim=-1),
            "text_embeds": outputs[1].text_embeds,
        }

    def image_conditioning(self, inputs: dict) -> dict[str, torch.Tensor]:
        """``time_ids`` of shape ``(2B, 6)``: original size, crop top-left and target size of every image."""
        original_sizes, crop_top_lefts = inputs["original_sizes"], inputs["crop_top_lefts"]
        target_sizes = torch.full_like(original_sizes, self.options.resolution)
        return {"time_ids": torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).float()}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        added_cond_kwargs = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return denoiser(
            noisy_latents,
            timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
