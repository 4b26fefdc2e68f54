"""A tiny `transformers` CLIP model and processor saved as a real folder (built from a config, no weights fetched)."""

import torch

from trl_diffusion.testing.tiny_models import build_tiny_clip_tokenizer


def build_tiny_clip(path: str, hidden_act: str = "quick_gelu", projection_dim: int = 8, seed: int = 0) -> str:
    """Save a 1-layer CLIP (16 wide, 8-pixel images in 4-pixel patches) with its processor into ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_tiny_clip_tokenizer(path)
    torch.manual_seed(seed)
    common = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **common,
            "hidden_act": hidden_act,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 16,
            "bos_token_id": len(tokenizer) - 2,
            "eos_token_id": len(tokenizer) - 1,
            "pad_token_id": len(tokenizer) - 1,
        },
        vision_config={**common, "hidden_act": hidden_act, "image_size": 8, "patch_size": 4},
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    with torch.no_grad():  # LayerNorms start as the identity; make them count
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
