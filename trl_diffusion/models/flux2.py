"""Flux.2 (dev) and Flux.2 [klein]: an LLM's stacked hidden states, a transformer on patchified, batch-normalised
latents with 4-axis rotary position ids."""

import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, format_input

from .flow_matching import FlowMatchingFamily
from .resolution_shift import ResolutionShiftMixin


# The pipelines' default number of sampling steps, at which their empirical shift `μ` is taken
DEFAULT_INFERENCE_STEPS = 50


def patchify_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) → (B, 4C, H/2, W/2)``: each 2x2 patch folded into channels ``(c, dy, dx)``, the layout of
    ``Flux2Pipeline._patchify_latents``."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(batch, channels * 4, height // 2, width // 2)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) → (B, h·w, C)``: one token per latent position, in row-major order."""
    batch, channels, height, width = latents.shape
    return latents.reshape(batch, channels, height * width).permute(0, 2, 1)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of [`pack_latents`][]: ``(B, h·w, C) → (B, C, h, w)``."""
    batch, _, channels = tokens.shape
    return tokens.permute(0, 2, 1).reshape(batch, channels, height, width)


def latent_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Position ids ``(t, h, w, l) = (0, row, column, 0)`` of the ``h·w`` image tokens, ``(h·w, 4)``."""
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, columns, zeros], dim=-1).reshape(-1, 4).to(device)


def text_ids(length: int, device: torch.device) -> torch.Tensor:
    """Position ids ``(0, 0, 0, l)`` of the ``length`` text tokens, ``(length, 4)``."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


class Flux2Family(ResolutionShiftMixin, FlowMatchingFamily):
    """Flux.2 dev (``Flux2Pipeline``, Mistral Small 3.1) and Flux.2 [klein] (``Flux2KleinPipeline``, Qwen3).

    Prompt conditioning, as ``encode_prompt`` builds it: the chat-formatted prompt (Flux.2 dev: with the pipeline's
    system message; klein: the Qwen3 chat template with thinking off), padded to ``max_sequence_length`` tokens
    (default 512, the pipeline's, capped at the tokenizer's ``model_max_length``), and the hidden states of three text-encoder layers (dev: 10, 20, 30; klein: 9, 18, 27) stacked on
    the feature axis: ``(B, L, 3·D)``. The padding is not masked, as in the pipelines.

    Latents: the VAE's posterior mode, patchified 2x2 into ``4C`` channels and normalised by the VAE's batch-norm
    statistics, ``z = (patchify(x) − running_mean) / √(running_var + ε)``; training errors are means over that
    ``(4C, H/2, W/2)`` latent. [`predict`][] packs it into one token per position with ids ``(0, row, column, 0)``
    (text ids ``(0, 0, 0, l)``), feeds ``σ = t/T`` and, where the transformer has a guidance embedding (dev, not
    klein), ``guidance_scale``.

    Noise levels: the flow-matching density, then (``resolution_shift``, on by default) the pipeline's shift with
    its empirical ``μ`` for the image tokens of ``resolution`` at 50 sampling steps (``compute_empirical_mu``).
    """

    pipeline_class_names = ("Flux2Pipeline", "Flux2KleinPipeline")
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")
    default_max_sequence_length = 512

    def __init__(self, pipeline, options):
        super().__init__(pipeline, options)
        self._check_resolution(2 * pipeline.vae_scale_factor)
        self.klein = isinstance(pipeline, Flux2KleinPipeline)
        self.hidden_states_layers = (9, 18, 27) if self.klein else (10, 20, 30)

    def resolution_mu(self) -> float:
        return compute_empirical_mu(self.image_seq_len(), DEFAULT_INFERENCE_STEPS)

    def _token_ids(self, prompts: list[str], length: int) -> dict[str, torch.Tensor]:
        tokenizer = self.pipeline.tokenizer
        if not self.klein:
            messages = format_input(prompts=prompts, system_message=self.pipeline.system_message)
            return tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=False,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                padding="max_length",
                truncation=True,
                max_length=length,
            )
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for prompt in prompts
        ]
        return tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=length)

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        text_encoder, tokenizer = self.pipeline.text_encoder, self.pipeline.tokenizer
        # Flux.2 dev's tokenizer is a processor: its text tokenizer caps the length
        tokens = self._token_ids(prompts, self.max_sequence_length(getattr(tokenizer, "tokenizer", tokenizer)))
        output = text_encoder(
            input_ids=tokens["input_ids"].to(text_encoder.device),
            attention_mask=tokens["attention_mask"].to(text_encoder.device),
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.stack([output.hidden_states[layer] for layer in self.hidden_states_layers], dim=2)
        return {"encoder_hidden_states": stacked.flatten(2).to(text_encoder.dtype)}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = patchify_latents(vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device)
        return (latents - mean) / std.to(latents.dtype)

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        batch, _, height, width = noisy_latents.shape
        device, dtype = noisy_latents.device, noisy_latents.dtype
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), self.options.guidance_scale, device=device, dtype=torch.float32)
        prediction = denoiser(
            hidden_states=pack_latents(noisy_latents),
            timestep=self.sigmas(timesteps).to(dtype),
            guidance=guidance,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            txt_ids=text_ids(conditioning["encoder_hidden_states"].shape[1], device),
            img_ids=latent_ids(height, width, device),
            return_dict=False,
        )[0]
        return unpack_latents(prediction, height, width)
