"""Stable Diffusion 3 and 3.5: two CLIP text encoders and T5, an MMDiT transformer, rectified-flow training."""

import torch

from .base import token_ids, two_clip_outputs
from .flow_matching import FlowMatchingFamily
from .resolution_shift import ResolutionShiftMixin


class StableDiffusion3Family(ResolutionShiftMixin, FlowMatchingFamily):
    """SD3/SD3.5 (``StableDiffusion3Pipeline``), trained with flow matching (see [`FlowMatchingFamily`][]).

    The prompt conditioning is built as ``StableDiffusion3Pipeline.encode_prompt`` builds it (without its second,
    untruncated tokenisation and the truncation warning it logs every step):

    - ``encoder_hidden_states = [pad([h_1 ; h_2]) , h_T5]``: the penultimate hidden states of both CLIP encoders,
      concatenated on the feature axis and zero-padded to T5's width, followed on the sequence axis by T5's last
      hidden states (``max_sequence_length`` tokens; zeros when the pipeline was loaded without T5);
    - ``pooled_projections = [p_1 ; p_2]``: both CLIP encoders' projected pooled outputs.

    The transformer takes the timestep ``t = σ·T`` itself, and the latents unpacked (it patchifies them).
    """

    pipeline_class_names = ("StableDiffusion3Pipeline",)
    default_max_sequence_length = 256

    def __init__(self, pipeline, options):
        super().__init__(pipeline, options)
        self._check_resolution(pipeline.vae_scale_factor * self.denoiser.config.patch_size)

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipeline = self.pipeline
        outputs = two_clip_outputs(pipeline, prompts)
        clip_hidden_states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        length = self.max_sequence_length(pipeline.tokenizer_3)
        if pipeline.text_encoder_3 is None:
            width = self.denoiser.config.joint_attention_dim
            t5_hidden_states = clip_hidden_states.new_zeros(len(prompts), length, width)
        else:
            t5_ids = token_ids(pipeline.tokenizer_3, prompts, pipeline.text_encoder_3.device, length)
            t5_hidden_states = pipeline.text_encoder_3(t5_ids)[0]
        padding = t5_hidden_states.shape[-1] - clip_hidden_states.shape[-1]
        clip_hidden_states = torch.nn.functional.pad(clip_hidden_states, (0, padding))
        return {
            "encoder_hidden_states": torch.cat([clip_hidden_states, t5_hidden_states], dim=-2),
            "pooled_projections": torch.cat([output.text_embeds for output in outputs], dim=-1),
        }

    def predict(self, denoiser, noisy_latents, timesteps, conditioning):
        return denoiser(hidden_states=noisy_latents, timestep=timesteps, **conditioning, return_dict=False)[0]
