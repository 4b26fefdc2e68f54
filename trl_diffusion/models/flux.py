"""Flux.1: a CLIP pooled embedding and T5, a transformer on 2x2-packed latents with rotary position ids."""

import torch

from .base import token_ids
from .flow_matching import FlowMatchingFamily
from .resolution_shift import ResolutionShiftMixin


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) → (B, H/2·W/2, 4C)``: each 2x2 patch becomes one token, channels outermost (``c, dy, dx``),
    the layout of ``FluxPipeline._pack_latents``."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of [`pack_latents`][]: ``(B, H/2·W/2, 4C) → (B, C, H, W)``, for latents of ``height x width``."""
    batch, _, packed_channels = packed.shape
    channels = packed_channels // 4
    patches = packed.reshape(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rotary position ids of the packed image tokens, ``(H/2·W/2, 3)``: ``(0, row, column)`` in row-major order."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxFamily(ResolutionShiftMixin, FlowMatchingFamily):
    """Flux.1 (``FluxPipeline``: dev, schnell and their fine-tunes), trained with flow matching.

    The conditioning is built as ``FluxPipeline.encode_prompt`` builds it: ``pooled_projections`` is the CLIP
    text model's pooled output and ``encoder_hidden_states`` T5's last hidden states (``max_sequence_length``
    tokens). [`predict`][] packs the ``(2B, C, H, W)`` latents into ``H/2·W/2`` tokens of ``4C`` channels, adds the
    position ids (zeros for text, ``(0, row, column)`` for the image), the timestep as ``σ = t/T`` and, for
    guidance-distilled transformers (``guidance_embeds``, e.g. FLUX.1 dev), the guidance ``guidance_scale``; it unpacks
    the prediction, so errors and losses see the usual latent shape.

    Noise levels are not shifted by default, as in the diffusers Flux example; ``resolution_shift=True`` shifts them
    with the pipeline's ``μ`` for ``resolution`` (see [`ResolutionShiftMixin`][]).
    """

    pipeline_class_names = ("FluxPipeline",)
    default_resolution_shift = False
    default_max_sequence_length = 512

    def __init__(self, pipeline, options):
        super().__init__(pipeline, options)
        self._check_resolution(2 * pipeline.vae_scale_factor)

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipeline = self.pipeline
        clip_ids = token_ids(pipeline.tokenizer, prompts, pipeline.text_encoder.device)
        t5_length = self.max_sequence_length(pipeline.tokenizer_2)
        t5_ids = token_ids(pipeline.tokenizer_2, prompts, pipeline.text_encoder_2.device, t5_length)
        return {
            "encoder_hidden_states": pipeline.text_encoder_2(t5_ids)[0],
            "pooled_projections": pipeline.text_encoder(clip_ids).pooler_output,
        }

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        batch, _, height, width = noisy_latents.shape
        device, dtype = noisy_latents.device, noisy_latents.dtype
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), self.options.guidance_scale, device=device, dtype=dtype)
        text_length = conditioning["encoder_hidden_states"].shape[1]
        prediction = denoiser(
            hidden_states=pack_latents(noisy_latents),
            timestep=self.sigmas(timesteps),
            guidance=guidance,
            txt_ids=torch.zeros(text_length, 3, device=device, dtype=dtype),
            img_ids=latent_image_ids(height, width, device, dtype),
            **conditioning,
            return_dict=False,
        )[0]
        return unpack_latents(prediction, height, width)
