"""Parameter counts and an estimate of peak LoRA training memory for Wan at real size, on meta tensors.

    python benchmarks/wan_memory.py [--output results.json]

Nothing is downloaded or allocated: every network is built from its real config (the diffusers conversion script's
transformer configs, UMT5-XXL's encoder config, the Wan 2.1 / 2.2 VAE configs) on the meta device, and one training
forward pass of the transformer runs on meta tensors of the real shapes, with LoRA adapters on the family's default
targets, while a saved-tensor hook adds up what autograd keeps for the backward pass, block by block.

The estimate, for one pair (2 videos) in bf16 and LoRA rank 32 with AdamW:

    weights (transformer + UMT5 encoder + VAE, bf16) + LoRA (fp32 weights, grads, two Adam moments)
    + activations kept for backward + one block's activations again as backward working memory

With gradient checkpointing the activations kept are every block's input plus everything outside the blocks, and
one block is recomputed during backward. Under FSDP / ZeRO-3 over ``n`` GPUs the transformer's weights and the LoRA
states are divided by ``n``; the frozen UMT5 encoder and VAE stay whole on every GPU, and so do the activations of
each GPU's own pair. Attention is counted as a fused (flash / memory-efficient) kernel keeps it:
``q``, ``k``, ``v``, the output and a float32 log-sum-exp per query, never the ``L x L`` matrix. The reference pass
runs under ``no_grad`` and keeps nothing. Not counted: the allocator's fragmentation, CUDA context (~0.5-1 GiB), and
the VAE and text encoder's own activations (with the encoding cache they never run during training).
"""

import argparse
import json

import torch
from accelerate import init_empty_weights
from common import count_parameters, fused_attention
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from peft import LoraConfig
from transformers import UMT5Config, UMT5EncoderModel


GIB = 1024**3
_WAN_COMMON = {
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "freq_dim": 256,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "text_dim": 4096,
}
# (transformer config, VAE config, latent channels, spatial compression, video (frames, height, width))
MODELS = {
    "Wan2.1-T2V-1.3B (480p)": (
        {**_WAN_COMMON, "ffn_dim": 8960, "in_channels": 16, "out_channels": 16, "num_attention_heads": 12},
        {},
        (81, 480, 832),
        {"num_layers": 30},
    ),
    "Wan2.1-T2V-14B (480p)": (
        {**_WAN_COMMON, "ffn_dim": 13824, "in_channels": 16, "out_channels": 16, "num_attention_heads": 40},
        {},
        (81, 480, 832),
        {"num_layers": 40},
    ),
    "Wan2.1-T2V-14B (480p, 49 frames)": (
        {**_WAN_COMMON, "ffn_dim": 13824, "in_channels": 16, "out_channels": 16, "num_attention_heads": 40},
        {},
        (49, 480, 832),
        {"num_layers": 40},
    ),
    "Wan2.1-T2V-14B (720p)": (
        {**_WAN_COMMON, "ffn_dim": 13824, "in_channels": 16, "out_channels": 16, "num_attention_heads": 40},
        {},
        (81, 720, 1280),
        {"num_layers": 40},
    ),
    "Wan2.2-TI2V-5B (720p)": (
        {**_WAN_COMMON, "ffn_dim": 14336, "in_channels": 48, "out_channels": 48, "num_attention_heads": 24},
        {
            "base_dim": 160,
            "decoder_base_dim": 256,
            "z_dim": 48,
            "is_residual": True,
            "in_channels": 12,
            "out_channels": 12,
            "patch_size": 2,
            "scale_factor_spatial": 16,
            "latents_mean": [0.0] * 48,
            "latents_std": [1.0] * 48,
        },
        (121, 704, 1280),
        {"num_layers": 30},
    ),
}
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
}
TEXT_TOKENS = 512
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def saved_activation_bytes(transformer, latents, text, per_token_timesteps: bool) -> tuple[int, list[int], int]:
    """``(total, per-block, block input size)`` of the bytes autograd saves in one forward pass (parameters and
    their views excluded)."""
    parameters = {id(parameter) for parameter in transformer.parameters()}
    state = {"block": None, "total": 0, "blocks": [0] * len(transformer.blocks), "seen": set()}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        key = (id(base), tensor.shape, tensor.dtype)
        if id(tensor) in parameters or id(base) in parameters or key in state["seen"]:
            return tensor
        state["seen"].add(key)
        size = tensor.numel() * tensor.element_size()
        state["total"] += size
        if state["block"] is not None:
            state["blocks"][state["block"]] += size
        return tensor

    def enter(index):
        return lambda module, args: state.__setitem__("block", index)

    handles = [block.register_forward_pre_hook(enter(i)) for i, block in enumerate(transformer.blocks)]
    handles += [
        block.register_forward_hook(lambda *_: state.__setitem__("block", None)) for block in transformer.blocks
    ]
    p_t, p_h, p_w = transformer.config.patch_size
    tokens = latents.shape[2] // p_t * (latents.shape[3] // p_h) * (latents.shape[4] // p_w)
    # Wan 2.2 TI2V takes one timestep per token (`expand_timesteps`)
    timestep = torch.full((latents.shape[0], tokens) if per_token_timesteps else (latents.shape[0],), 500.0)
    timestep = timestep.to("meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), fused_attention(log_sum_exp=True):
            transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    block_input = latents.shape[0] * tokens * transformer.config.num_attention_heads * 128 * 2  # bf16
    return state["total"], state["blocks"], block_input


def estimate(name: str, lora_rank: int = 32) -> dict:
    transformer_config, vae_config, (frames, height, width), layers = MODELS[name]
    with init_empty_weights(include_buffers=True):
        # All bf16, as the trainer casts a LoRA-trained denoiser (its float32 LoRA weights run under autocast)
        transformer = WanTransformer3DModel(**transformer_config, **layers).to(torch.bfloat16)
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
        vae = AutoencoderKLWan(**vae_config)
    counts = {"transformer": count_parameters(transformer), "text_encoder": count_parameters(text_encoder)}
    counts["vae"] = count_parameters(vae)
    transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS))
    lora = sum(parameter.numel() for name_, parameter in transformer.named_parameters() if "lora_" in name_)
    trainable = sum(parameter.numel() for parameter in transformer.parameters() if parameter.requires_grad)
    if trainable != lora:
        raise RuntimeError(f"Expected only the {lora} LoRA parameters to train, found {trainable} trainable.")
    temporal, spatial = 4, vae.config.scale_factor_spatial
    latent_shape = (
        2,
        transformer.config.in_channels,
        (frames - 1) // temporal + 1,
        height // spatial,
        width // spatial,
    )
    latents = torch.empty(latent_shape, device="meta", dtype=torch.bfloat16)
    text = torch.empty(2, TEXT_TOKENS, 4096, device="meta", dtype=torch.bfloat16)
    total, per_block, block_input = saved_activation_bytes(transformer, latents, text, "2.2" in name)
    weights = 2 * (counts["transformer"] + counts["text_encoder"] + counts["vae"])
    lora_states = 16 * lora  # fp32 weight, gradient and two Adam moments
    largest_block = max(per_block)
    outside_blocks = total - sum(per_block)
    without = weights + lora_states + total + largest_block
    checkpointed = weights + lora_states + outside_blocks + len(per_block) * block_input + 2 * largest_block
    # FSDP / ZeRO-3 over n GPUs shards the transformer and the LoRA states; the frozen encoders stay replicated
    # and so does each process's own pair's activations.
    sharded = 2 * counts["transformer"] + lora_states
    fsdp = {n: (checkpointed - sharded * (1 - 1 / n)) / GIB for n in (2, 4, 8)}
    p_t, p_h, p_w = transformer.config.patch_size
    return {
        "parameters": counts,
        "lora_parameters_rank_32": lora,
        "video": [frames, height, width],
        "latents": list(latent_shape),
        "tokens_per_video": latent_shape[2] // p_t * (latent_shape[3] // p_h) * (latent_shape[4] // p_w),
        "weights_gib": weights / GIB,
        "activations_gib": total / GIB,
        "activations_per_block_gib": largest_block / GIB,
        "peak_gib_without_checkpointing": without / GIB,
        "peak_gib_with_checkpointing": checkpointed / GIB,
        "peak_gib_with_checkpointing_fsdp": fsdp,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    parser.add_argument("--models", nargs="*", default=list(MODELS), help=f"Any of {list(MODELS)}.")
    args = parser.parse_args()
    results = {name: estimate(name) for name in args.models}
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
