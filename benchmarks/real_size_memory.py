"""Parameter counts and an estimate of peak training memory of the image families at real size, on meta tensors.

Nothing is downloaded or allocated: each denoiser, text encoder and VAE is built from its published config on the
``meta`` device (configs below, with their sources), LoRA adapters are injected, and one training forward pass of a
batch of one preference pair (2 images, as the trainers run it) at ``--resolution`` is traced on meta tensors. A
``saved_tensors_hooks`` pair records every tensor autograd keeps for the backward pass (the activations); attention
is counted as a flash/memory-efficient kernel keeps it (its inputs and output, no ``S x S`` matrix), as SDPA runs on
a GPU. The estimate, in GiB:

- weights: denoiser, text encoder(s) and VAE in bf16 (all stay on the GPU during training);
- LoRA: float32 adapters, their gradients and AdamW's two moments (16 bytes per adapter parameter);
- activations: without checkpointing, everything saved by the forward pass; with gradient checkpointing, what is
  saved outside the blocks, the blocks' inputs (what checkpointing keeps) and one block's activations (the block
  being recomputed);
- plus, in both cases, one block's activations again as the working set of the backward pass.

The reference pass (no grad) and the text encoder's own activations (run once, before training, with the encoding
cache) add no more than one block's worth. The result is an estimate, not a measurement: allocator fragmentation and
CUDA workspaces come on top (budget 10-15%).

    python benchmarks/real_size_memory.py --resolution 1024
"""

import argparse
import math

import torch
from common import count_parameters, fused_attention
from peft import LoraConfig, inject_adapter_in_model


GIB = 2**30

# Transformer configs. Sources: the diffusers 0.42 class defaults, which are the published configs of FLUX.2 [dev]
# (`Flux2Transformer2DModel`), Qwen-Image (`QwenImageTransformer2DModel`) and Z-Image-Turbo
# (`ZImageTransformer2DModel`); FLUX.2 [klein] 4B's block counts and widths (5 double- and 20 single-stream blocks,
# 24 heads of 128, Qwen3-4B's 3 x 2560 text features) from the published architecture notes of its ports
# (e.g. github.com/filipstrand/mflux, github.com/marcelcotta/iris.c), whose loaders read the Hub config.
DENOISERS = {
    "FLUX.2 [dev]": ("Flux2Transformer2DModel", {}),
    "FLUX.2 [klein] 4B": (
        "Flux2Transformer2DModel",
        {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680,
         "guidance_embeds": False},
    ),
    "Qwen-Image": ("QwenImageTransformer2DModel", {}),
    "Z-Image": ("ZImageTransformer2DModel", {}),
}  # fmt: skip

# Text encoder configs, from the models' Hub config.json files: Mistral-Small-3.1-24B (FLUX.2 [dev]), Qwen3-4B
# (FLUX.2 [klein] 4B, Z-Image), Qwen2.5-VL-7B-Instruct (Qwen-Image).
_QWEN3_4B = {
    "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
}  # fmt: skip
TEXT_ENCODERS = {
    "FLUX.2 [dev]": ("Mistral3ForConditionalGeneration", {
        "text_config": {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120,
                        "intermediate_size": 32768, "num_hidden_layers": 40, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128},
        "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "head_dim": 64, "image_size": 1540,
                          "patch_size": 14},
        "spatial_merge_size": 2,
    }),
    "FLUX.2 [klein] 4B": ("Qwen3ForCausalLM", _QWEN3_4B),
    "Qwen-Image": ("Qwen2_5_VLForConditionalGeneration", {
        "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584},
    }),
    "Z-Image": ("Qwen3Model", _QWEN3_4B),
}  # fmt: skip

VAES = {
    "FLUX.2 [dev]": ("AutoencoderKLFlux2", {}),
    "FLUX.2 [klein] 4B": ("AutoencoderKLFlux2", {}),
    "Qwen-Image": ("AutoencoderKLQwenImage", {}),
    "Z-Image": ("AutoencoderKL", {"latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
                                  "down_block_types": ("DownEncoderBlock2D",) * 4,
                                  "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2}),
}  # fmt: skip

LORA_TARGETS = {
    "FLUX.2 [dev]": ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"],
    "FLUX.2 [klein] 4B": ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"],
    "Qwen-Image": ["to_q", "to_k", "to_v", "to_out.0"],
    "Z-Image": ["to_q", "to_k", "to_v", "to_out.0"],
}
TEXT_TOKENS = 512  # the families' default prompt length (Z-Image: the unpadded tokens reach the transformer)


def build(library, class_name: str, config: dict):
    import diffusers
    import transformers

    with torch.device("meta"):
        if library == "transformers":
            config_class = getattr(transformers, class_name).config_class
            return getattr(transformers, class_name)(config_class(**config))
        return getattr(diffusers, class_name)(**config)


def denoiser_inputs(name: str, denoiser, resolution: int, batch: int = 2) -> tuple[tuple, dict]:
    """Meta inputs of one training forward pass, as the families build them."""
    side = resolution // 16  # VAE x8, 2x2 patches
    meta = {"device": "meta", "dtype": torch.bfloat16}
    timestep = torch.full((batch,), 0.5, **meta)
    if name.startswith("FLUX.2"):
        config = denoiser.config
        return (), {
            "hidden_states": torch.empty(batch, side * side, config.in_channels, **meta),
            "encoder_hidden_states": torch.empty(batch, TEXT_TOKENS, config.joint_attention_dim, **meta),
            "timestep": timestep,
            "guidance": timestep if config.guidance_embeds else None,
            "img_ids": torch.zeros(side * side, 4, device="meta", dtype=torch.long),
            "txt_ids": torch.zeros(TEXT_TOKENS, 4, device="meta", dtype=torch.long),
        }
    if name == "Qwen-Image":
        config = denoiser.config
        return (), {
            "hidden_states": torch.empty(batch, side * side, config.in_channels, **meta),
            "encoder_hidden_states": torch.empty(batch, TEXT_TOKENS, config.joint_attention_dim, **meta),
            "encoder_hidden_states_mask": None,
            "timestep": timestep,
            "img_shapes": [[(1, side, side)]] * batch,
        }
    latents = [torch.empty(denoiser.config.in_channels, 1, 2 * side, 2 * side, **meta) for _ in range(batch)]
    captions = [torch.empty(TEXT_TOKENS, denoiser.config.cap_feat_dim, **meta) for _ in range(batch)]
    return (latents, timestep, captions), {}


def blocks_of(denoiser) -> list[torch.nn.Module]:
    names = ("transformer_blocks", "single_transformer_blocks", "layers", "noise_refiner", "context_refiner")
    return [block for name in names for block in getattr(denoiser, name, [])]


def saved_activations(denoiser, args: tuple, kwargs: dict) -> dict[str, int]:
    """Bytes autograd saves in one forward pass (``total``), the largest block's share (``block``), all blocks'
    share (``blocks``) and the bytes of the blocks' tensor inputs (``block_inputs``, what checkpointing keeps)."""
    parameters = {id(parameter) for parameter in denoiser.parameters()}
    saved, marks, inputs = {}, [], []

    def pack(tensor):
        if id(tensor) not in parameters:
            saved[id(tensor)] = (tensor, tensor.numel() * tensor.element_size())
        return tensor

    def total() -> int:
        return sum(size for _, size in saved.values())

    def before(module, args, kwargs):
        marks.append(-total())
        tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
        inputs.append(sum(tensor.numel() * tensor.element_size() for tensor in tensors))

    hooks = []
    for block in blocks_of(denoiser):
        hooks.append(block.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(block.register_forward_hook(lambda module, inputs, output: marks.append(total())))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), fused_attention(log_sum_exp=False):
        denoiser(*args, **kwargs, return_dict=False)
    for hook in hooks:
        hook.remove()
    per_block = [marks[i] + marks[i + 1] for i in range(0, len(marks) - 1, 2)]
    return {"total": total(), "block": max(per_block), "blocks": sum(per_block), "block_inputs": sum(inputs)}


def estimate(name: str, resolution: int, lora_rank: int) -> dict:
    class_name, config = DENOISERS[name]
    denoiser = build("diffusers", class_name, config).to(torch.bfloat16).requires_grad_(False)
    denoiser_params = count_parameters(denoiser)
    lora = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS[name])
    denoiser = inject_adapter_in_model(lora, denoiser, low_cpu_mem_usage=True)
    adapters = [parameter for key, parameter in denoiser.named_parameters() if "lora_" in key]
    for parameter in adapters:
        # bf16 as under autocast, so the activations they see are bf16; the fp32 master copy is counted below
        parameter.data = parameter.data.to(torch.bfloat16)
        parameter.requires_grad_(True)
    lora_params = sum(parameter.numel() for parameter in adapters)
    args, kwargs = denoiser_inputs(name, denoiser, resolution)
    saved = saved_activations(denoiser, args, kwargs)
    full, block = saved["total"], saved["block"]
    # Checkpointing keeps each block's inputs and what is saved outside the blocks (embedders, final layer)
    kept = saved["total"] - saved["blocks"] + saved["block_inputs"]
    text_class, text_config = TEXT_ENCODERS[name]
    text_params = count_parameters(build("transformers", text_class, text_config))
    vae_params = count_parameters(build("diffusers", *VAES[name]))
    weights = 2 * (denoiser_params + text_params + vae_params) + 16 * lora_params
    return {
        "family": name,
        "denoiser_params": denoiser_params,
        "text_encoder_params": text_params,
        "vae_params": vae_params,
        "lora_params": lora_params,
        "weights_gib": weights / GIB,
        "peak_gib": (weights + full + block) / GIB,
        "peak_checkpointing_gib": (weights + kept + 2 * block) / GIB,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--families", nargs="+", default=list(DENOISERS))
    args = parser.parse_args(argv)
    rows = []
    print(
        "| family | denoiser | text encoder | VAE | LoRA r=16 | weights (GiB) | peak, no ckpt (GiB) | peak, ckpt (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.families:
        row = estimate(name, args.resolution, args.lora_rank)
        rows.append(row)
        billions = [f"{row[key] / 1e9:.2f}B" for key in ("denoiser_params", "text_encoder_params", "vae_params")]
        print(
            f"| {name} | {' | '.join(billions)} | {row['lora_params'] / 1e6:.1f}M | {row['weights_gib']:.1f} | "
            f"{row['peak_gib']:.1f} | {row['peak_checkpointing_gib']:.1f} |",
            flush=True,
        )
    assert all(math.isfinite(row["peak_gib"]) for row in rows)
    return rows


if __name__ == "__main__":
    main()
