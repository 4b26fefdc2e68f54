"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, DDPM noise, epsilon or v-prediction targets."""

import torch
from diffusers import DDPMScheduler

from .base import DiffusionFamily


class StableDiffusionFamily(DiffusionFamily):
    """SD 1.x/2.x. The prediction type (``epsilon`` or ``v_prediction``) comes from the pipeline's scheduler config.

    Training noise follows DDPM: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with ``t`` uniform on ``{0, ..., T-1}``.
    The target is ``eps`` (epsilon) or ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (v-prediction).
    """

    pipeline_class_names = ("StableDiffusionPipeline",)
    denoiser_name = "unet"

    def __init__(self, pipeline, options):
        super().__init__(pipeline, options)
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"Unsupported prediction_type {self.prediction_type!r} in the scheduler config; "
                "expected 'epsilon' or 'v_prediction'."
            )

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, text_encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        input_ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(text_encoder.device)
        return {"encoder_hidden_states": text_encoder(input_ids)[0]}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode()
        return latents * vae.config.scaling_factor

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        return (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)

    def noisy_input(self, latents, noise, timesteps):
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        return denoiser(noisy_latents, timesteps, **conditioning, return_dict=False)[0]
