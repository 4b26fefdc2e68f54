"""Qwen-Image: Qwen2.5-VL's last hidden states with a padding mask, an MMDiT on 2x2-packed latents of a video VAE."""

import torch

from .flow_matching import FlowMatchingFamily
from .flux import pack_latents, unpack_latents
from .resolution_shift import ResolutionShiftMixin


class QwenImageFamily(ResolutionShiftMixin, FlowMatchingFamily):
    """Qwen-Image (``QwenImagePipeline``), trained with flow matching.

    Prompt conditioning, as ``QwenImagePipeline.encode_prompt`` builds it: the prompt in the pipeline's
    ``prompt_template_encode``, tokenised (padded to the longest prompt of the batch, at most
    ``tokenizer_max_length + prompt_template_encode_start_idx`` tokens), Qwen2.5-VL's last hidden states of the
    unpadded tokens, less the first ``prompt_template_encode_start_idx`` (the template's system prompt), truncated to
    ``max_sequence_length`` (default 512, capped at the tokenizer's ``model_max_length``). To give every prompt the same shape (for batching and the encoding cache),
    the embeddings are then zero-padded to ``max_sequence_length`` and ``encoder_hidden_states_mask`` marks the real
    tokens; the transformer attends to those only, and the padding changes no text token's rotary position.

    Latents: the VAE (a one-frame video VAE) posterior's mode, normalised per channel,
    ``z = (x − latents_mean) / latents_std``, as ``(C, H, W)`` images. [`predict`][] packs them 2x2 into tokens as
    Flux.1 does, with ``img_shapes = (1, H/2, W/2)``, and feeds ``σ = t/T`` (and ``guidance_scale`` to a
    guidance-distilled transformer).

    Noise levels: the flow-matching density, then (``resolution_shift``, on by default) the pipeline's shift with
    ``μ = calculate_shift(image tokens)`` of the scheduler config (Qwen-Image: ``base_shift = max_shift = ln 3``,
    exponential, so a constant shift of 3). The scheduler's ``shift_terminal`` only stretches the sampling grid and
    is not applied.
    """

    pipeline_class_names = ("QwenImagePipeline",)
    default_max_sequence_length = 512

    def __init__(self, pipeline, options):
        super().__init__(pipeline, options)
        self._check_resolution(2 * pipeline.vae_scale_factor)

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipeline, text_encoder = self.pipeline, self.pipeline.text_encoder
        drop = pipeline.prompt_template_encode_start_idx
        tokens = pipeline.tokenizer(
            [pipeline.prompt_template_encode.format(prompt) for prompt in prompts],
            max_length=pipeline.tokenizer_max_length + drop,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(text_encoder.device)
        hidden_states = text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
        length = self.max_sequence_length(pipeline.tokenizer)
        embeds = hidden_states.new_zeros(len(prompts), length, hidden_states.shape[-1])
        mask = torch.zeros(len(prompts), length, dtype=torch.long, device=hidden_states.device)
        for row, (states, row_mask) in enumerate(zip(hidden_states, tokens.attention_mask.bool(), strict=True)):
            kept = states[row_mask][drop:][:length]
            embeds[row, : len(kept)] = kept
            mask[row, : len(kept)] = 1
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        frames = pixel_values.to(vae.device, vae.dtype).unsqueeze(2)
        latents = vae.encode(frames).latent_dist.mode()[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return (latents - mean) / std

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        batch, _, height, width = noisy_latents.shape
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), self.options.guidance_scale, device=noisy_latents.device)
        prediction = denoiser(
            hidden_states=pack_latents(noisy_latents),
            timestep=self.sigmas(timesteps).to(noisy_latents.dtype),
            guidance=guidance,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            encoder_hidden_states_mask=conditioning["encoder_hidden_states_mask"],
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        return unpack_latents(prediction, height, width)
