"""Z-Image: Qwen3's penultimate hidden states of the unpadded tokens, a single-stream DiT that predicts ``x_0 − ε``."""

import torch

from .flow_matching import FlowMatchingFamily
from .resolution_shift import ResolutionShiftMixin


class ZImageFamily(ResolutionShiftMixin, FlowMatchingFamily):
    """Z-Image and Z-Image-Turbo (``ZImagePipeline``), trained with flow matching.

    Prompt conditioning, as ``ZImagePipeline.encode_prompt`` builds it: each prompt in the tokenizer's chat template
    (generation prompt, thinking on), padded to ``max_sequence_length`` tokens (default 512, the pipeline's, capped at the tokenizer's
    ``model_max_length``), and
    the text encoder's penultimate hidden states. The pipeline keeps each prompt's unpadded rows as a list; here they
    stay in one ``(B, L, D)`` tensor (padding rows zeroed) with ``prompt_mask``, and [`predict`][] hands the
    transformer the unpadded rows, as the pipeline does.

    The transformer's conventions differ from the other flow-matching families: its time input is ``1 − σ`` and it
    predicts ``x_0 − ε``, the negative of the velocity ``v = ε − x_0`` (the pipeline negates it before the Euler step).
    [`predict`][] feeds ``(T − t)/T = 1 − σ`` and returns the negated output, so the target is ``v`` as for SD3 and
    Flux.

    Latents: ``z = (mean − shift_factor)·scaling_factor`` of the (Flux.1) VAE, one-frame ``(C, 1, H, W)`` inputs to
    the transformer, which patchifies them 2x2. Noise levels: the flow-matching density, then the scheduler's static
    ``shift`` (Z-Image-Turbo: 3.0), or a resolution shift if a checkpoint's scheduler has ``use_dynamic_shifting``.
    """

    pipeline_class_names = ("ZImagePipeline",)
    default_max_sequence_length = 512

    def __init__(self, pipeline, options):
        super().__init__(pipeline, options)
        self._check_resolution(2 * pipeline.vae_scale_factor)

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, text_encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for prompt in prompts
        ]
        tokens = tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_sequence_length(tokenizer),
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(text_encoder.device).bool()
        hidden_states = text_encoder(
            input_ids=tokens.input_ids.to(text_encoder.device), attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        embeds = torch.where(mask.unsqueeze(-1), hidden_states, torch.zeros_like(hidden_states))
        return {"prompt_embeds": embeds, "prompt_mask": mask.long()}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        mask = conditioning["prompt_mask"].bool()
        captions = [embeds[row_mask] for embeds, row_mask in zip(conditioning["prompt_embeds"], mask, strict=True)]
        output = denoiser(
            list(noisy_latents.unsqueeze(2).unbind(0)),
            ((self.num_train_timesteps - timesteps.float()) / self.num_train_timesteps).to(noisy_latents.dtype),
            captions,
            return_dict=False,
        )[0]
        return -torch.stack(output).squeeze(2)
