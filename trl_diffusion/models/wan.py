"""Wan 2.1 / 2.2 text-to-video: a UMT5 prompt encoder, a causal 3-D VAE and a video transformer, flow matching."""

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from .flow_matching import FlowMatchingFamily


class WanFamily(FlowMatchingFamily):
    """Wan text-to-video (``WanPipeline``: Wan 2.1 T2V 1.3B/14B, Wan 2.2 TI2V 5B), trained with flow matching.

    Latents are videos: ``(2B, C, F', H', W')`` with ``F' = (F − 1)/s_t + 1`` latent frames (``s_t = 4``) and
    ``H' = H/s``, ``W' = W/s`` (``s = 8``; 16 for the Wan 2.2 VAE), so per-sample errors are means over
    ``(C, F', H', W')``. The pieces follow ``WanPipeline`` exactly:

    - Prompt: each prompt is cleaned as the pipeline cleans it (``ftfy``, HTML unescaping, whitespace), tokenized to
      ``max_sequence_length`` tokens (default 512, the pipeline's ``__call__`` default, capped at the tokenizer's
      limit), encoded by UMT5 with its attention mask, and the hidden states past each prompt's last token are
      zeroed: ``encoder_hidden_states`` of ``WanPipeline.encode_prompt``.
    - Latents: the VAE posterior's mode, normalised per channel, ``z = (μ − latents_mean) / latents_std`` (the
      inverse of the pipeline's ``z·latents_std + latents_mean`` before decoding).
    - Noise levels: the flow-matching densities of [`FlowMatchingFamily`][], then the scheduler's shift: Wan's
      ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` shifts its sigmas by ``flow_shift`` (3.0 for 480p,
      5.0 for 720p), a ``FlowMatchEulerDiscreteScheduler`` by its static ``shift``. The transformer takes
      ``t = σ·T`` (``T = 1000``), one per sample, or one per latent token for Wan 2.2 TI2V (``expand_timesteps``).
    - Target: the velocity ``ε − x_0``.

    Wan 2.2 A14B (two experts, ``transformer_2`` and ``boundary_ratio``) is not supported: it needs one LoRA per
    expert, each trained on its own noise range.
    """

    pipeline_class_names = ("WanPipeline",)
    # Self- and cross-attention projections of every block (`attn1`, `attn2`); add `ffn.net.0.proj` and
    # `ffn.net.2` for the feed-forward layers, as many Wan LoRA trainers do.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    is_video = True
    default_max_sequence_length = 512
    # 81 frames: Wan's 5-second clips at 16 fps, 21 latent frames
    default_num_frames = 81

    def __init__(self, pipeline, options):
        super().__init__(pipeline, options)
        config = pipeline.scheduler.config
        if config.get("use_flow_sigmas", False):
            self.shift = 1.0 if config.get("use_dynamic_shifting", False) else float(config.flow_shift)
        if getattr(pipeline, "transformer_2", None) is not None:
            raise NotImplementedError(
                "Wan 2.2 A14B pipelines (two experts: `transformer` for high noise, `transformer_2` for low noise) "
                "are not supported: each expert needs its own LoRA trained on its own noise range."
            )
        if self.denoiser is None:
            raise ValueError("The Wan pipeline has no `transformer` to train.")
        self._check_video_size()

    @property
    def num_frames(self) -> int:
        """Frames of a training clip: ``num_frames`` of the config, else 81."""
        return self.options.num_frames or self.default_num_frames

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(height, width)`` of the training frames: ``video_size``, else ``resolution`` squared."""
        return (
            tuple(self.options.video_size)
            if self.options.video_size
            else (self.options.resolution, self.options.resolution)
        )

    def _check_video_size(self) -> None:
        temporal = self.pipeline.vae_scale_factor_temporal
        if (self.num_frames - 1) % temporal:
            raise ValueError(
                f"WanPipeline needs num_frames = {temporal}·k + 1 (the VAE compresses {temporal} frames into one "
                f"after the first), got {self.num_frames}."
            )
        multiple = self.pipeline.vae_scale_factor_spatial * self.denoiser.config.patch_size[1]
        if any(side % multiple for side in self.frame_size):
            raise ValueError(f"WanPipeline needs frame sides that are multiples of {multiple}, got {self.frame_size}.")

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipeline = self.pipeline
        length = self.max_sequence_length(pipeline.tokenizer)
        inputs = pipeline.tokenizer(
            [prompt_clean(prompt) for prompt in prompts],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = pipeline.text_encoder.device
        mask = inputs.attention_mask.to(device)
        hidden_states = pipeline.text_encoder(inputs.input_ids.to(device), mask).last_hidden_state
        # Zero the states of the padding tokens, as the pipeline does (it cuts each prompt at its length, re-pads).
        keep = torch.arange(length, device=device)[None, :] < mask.gt(0).sum(dim=1, keepdim=True)
        hidden_states = torch.where(keep.unsqueeze(-1), hidden_states, torch.zeros_like(hidden_states))
        return {"encoder_hidden_states": hidden_states}

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.pipeline.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, C, F', H', W')`` of videos ``(N, 3, F, H, W)`` in ``[-1, 1]``."""
        vae = self.pipeline.vae
        latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode()
        mean, std = self._latent_statistics(latents)
        return (latents - mean) / std

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos in ``[-1, 1]`` from normalised latents, as ``WanPipeline`` decodes them."""
        vae = self.pipeline.vae
        latents = latents.to(vae.device, vae.dtype)
        mean, std = self._latent_statistics(latents)
        return vae.decode(latents * std + mean, return_dict=False)[0]

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        timestep = timesteps
        if self.pipeline.config.get("expand_timesteps", False):
            # Wan 2.2 TI2V: one timestep per latent token, as the pipeline feeds it (all equal for text-to-video)
            _, _, frames, height, width = noisy_latents.shape
            p_t, p_h, p_w = self.denoiser.config.patch_size
            tokens = (frames // p_t) * (height // p_h) * (width // p_w)
            timestep = timesteps[:, None].expand(-1, tokens)
        return denoiser(
            hidden_states=noisy_latents,
            timestep=timestep,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            return_dict=False,
        )[0]
