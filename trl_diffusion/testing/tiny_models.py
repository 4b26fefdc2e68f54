"""Tiny, randomly initialised diffusers pipelines built from configs, for tests, the demo and the benchmarks.

Nothing here downloads anything: every component is built from a config, with a character-level CLIP tokenizer
written to disk, and the pipeline is saved as a real diffusers folder that loads through the same
``DiffusionPipeline.from_pretrained`` call a Hub id takes.
"""

import json
import os

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte-to-character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    offset = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + offset)
            offset += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_tiny_clip_tokenizer(save_directory: str, model_max_length: int = 16):
    """A character-level CLIP tokenizer: the 256 byte symbols, their word-final forms and no merges."""
    from transformers import CLIPTokenizer

    os.makedirs(save_directory, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file = os.path.join(save_directory, "vocab.json")
    merges_file = os.path.join(save_directory, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump(vocab, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=model_max_length)
    tokenizer.save_pretrained(save_directory)
    return tokenizer


def _tiny_clip_text_model(vocab_size: int, hidden_size: int = 32, projection_dim: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(config).eval()


def _tiny_vae(seed: int = 0, **overrides):
    """A two-level ``AutoencoderKL`` (downsampling by 2) with 4 latent channels; ``overrides`` change its config."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 32,
    }
    return AutoencoderKL(**{**config, **overrides})


def build_tiny_stable_diffusion(
    save_directory: str, prediction_type: str = "epsilon", sample_size: int = 8, seed: int = 0
) -> str:
    """Save a tiny Stable Diffusion 1.x/2.x pipeline (``epsilon`` or ``v_prediction``) and return its path.

    The UNet works on 4-channel latents of ``sample_size`` pixels a side, the VAE downsamples by 2, so the pipeline
    makes ``2 * sample_size`` pixel images.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = build_tiny_clip_tokenizer(os.path.join(save_directory, "tokenizer"))
    text_encoder = _tiny_clip_text_model(len(tokenizer), seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipeline = StableDiffusionPipeline(
        vae=_tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(save_directory)
    return save_directory


def build_tiny_t5_tokenizer(save_directory: str, model_max_length: int = 16):
    """A character-level T5 (Unigram) tokenizer: ``<pad>``, ``</s>``, ``<unk>``, the word-start ``▁`` and printable
    ASCII, each character one token. Built with the `tokenizers` backend, so no sentencepiece model is needed."""
    import string

    from transformers import T5Tokenizer

    os.makedirs(save_directory, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(char, -3.0) for char in string.printable if not char.isspace()]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(save_directory)
    return tokenizer


def _tiny_t5_encoder(vocab_size: int, d_model: int = 64, seed: int = 0, umt5: bool = False):
    """A 2-layer T5 encoder (UMT5 with ``umt5``: Wan's text encoder) of width ``d_model``."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_class(config).eval()


# SD3 and Flux VAEs have no 1x1 (post-)quantisation convolutions; their configs also set a latent `shift_factor`.
_FLOW_VAE = {"use_quant_conv": False, "use_post_quant_conv": False}


def build_tiny_sdxl(save_directory: str, sample_size: int = 8, seed: int = 0) -> str:
    """Save a tiny Stable Diffusion XL pipeline and return its path.

    Like SDXL it has two text encoders (a CLIP text model and a CLIP text model with projection, whose hidden states
    are concatenated into a 64-wide cross-attention input) and a UNet with ``addition_embed_type="text_time"``: the
    projected pooled prompt (32) and the six size/crop ids (6 x 8 Fourier features) make its 80-wide added
    embedding. The VAE downsamples by 2, so the pipeline makes ``2 * sample_size`` pixel images.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = build_tiny_clip_tokenizer(os.path.join(save_directory, "tokenizer"))
    tokenizer_2 = build_tiny_clip_tokenizer(os.path.join(save_directory, "tokenizer_2"))
    text_encoder = _tiny_clip_text_model(len(tokenizer), seed=seed)
    text_encoder_2 = _tiny_clip_text_model(len(tokenizer_2), projection_dim=32, seed=seed + 1)
    addition_time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + 32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_tiny_vae(seed, scaling_factor=0.13025, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.save_pretrained(save_directory)
    return save_directory


def build_tiny_sd3(save_directory: str, sample_size: int = 8, seed: int = 0) -> str:
    """Save a tiny Stable Diffusion 3.5-style pipeline and return its path.

    Three text encoders as in SD3: two CLIP text models with projection (hidden 32, pooled 32 each: a 64-wide pooled
    projection) and a T5 encoder (``d_model`` 64, the joint attention width; the concatenated CLIP hidden states are
    zero-padded to it). The `SD3Transformer2DModel` has two joint blocks with RMS q/k-norm and one dual-attention
    block (the SD3.5 layout), and the scheduler is flow matching with ``shift=3``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = build_tiny_clip_tokenizer(os.path.join(save_directory, "tokenizer"))
    tokenizer_2 = build_tiny_clip_tokenizer(os.path.join(save_directory, "tokenizer_2"))
    tokenizer_3 = build_tiny_t5_tokenizer(os.path.join(save_directory, "tokenizer_3"))
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(seed, **_FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_tiny_clip_text_model(len(tokenizer), projection_dim=32, seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_clip_text_model(len(tokenizer_2), projection_dim=32, seed=seed + 1),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_tiny_t5_encoder(len(tokenizer_3), d_model=64, seed=seed),
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(save_directory)
    return save_directory


def build_tiny_flux(save_directory: str, guidance_embeds: bool = True, seed: int = 0) -> str:
    """Save a tiny Flux.1-dev-style pipeline (Flux.1-schnell-style with ``guidance_embeds=False``), return its path.

    A CLIP text model (pooled output, 32 wide) and a T5 encoder (``d_model`` 64), a `FluxTransformer2DModel` with one
    double-stream and one single-stream block and, by default, a guidance embedding (as in the guidance-distilled
    Flux.1 dev), on 2x2-packed 4-channel latents (16 channels per token). The scheduler shifts its sigmas dynamically
    with the image size at inference, as Flux.1 dev's does. Images must be a multiple of 4 pixels a side.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = build_tiny_clip_tokenizer(os.path.join(save_directory, "tokenizer"))
    tokenizer_2 = build_tiny_t5_tokenizer(os.path.join(save_directory, "tokenizer_2"))
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=_tiny_vae(seed, **_FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_tiny_clip_text_model(len(tokenizer), seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5_encoder(len(tokenizer_2), d_model=64, seed=seed),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(save_directory)
    return save_directory


# ----- Flux.2, Flux.2 [klein], Qwen-Image, Z-Image: LLM text encoders with chat templates -----

# Minimal chat templates in the shape of the real ones: Qwen's ChatML (with Qwen3's `enable_thinking` switch), and
# Mistral's instruction format over the list-of-parts message content that Flux2Pipeline sends.
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% for part in m['content'] %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ part['text'] }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ part['text'] }}[/INST]{% endif %}{% endfor %}{% endfor %}"
)
_CHATML_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
)
_MISTRAL_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
)


def build_tiny_chat_tokenizer(save_directory: str, mistral: bool = False, model_max_length: int = 256):
    """A byte-level BPE tokenizer with no merges (one token per byte) and a chat template: Qwen's ChatML (Qwen2.5-VL,
    Qwen3), or with ``mistral`` Mistral's instruction format. Built from a vocabulary, so nothing is downloaded.

    Its ``model_max_length`` (256) caps the families' prompt length: long enough for the byte-level tokens of the
    pipelines' system prompts (Flux.2 dev's, Qwen-Image's template) and a caption."""
    from transformers import Qwen2Tokenizer

    os.makedirs(save_directory, exist_ok=True)
    specials = _MISTRAL_SPECIALS if mistral else _CHATML_SPECIALS
    vocab = {token: i for i, token in enumerate(list(_bytes_to_unicode().values()) + list(specials))}
    names = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"} if mistral else {}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, **names)
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials[4 if mistral else 1 :])})
    tokenizer.chat_template = _MISTRAL_TEMPLATE if mistral else _CHATML_TEMPLATE
    tokenizer.save_pretrained(save_directory)
    return tokenizer


def _tiny_qwen3(vocab_size: int, num_layers: int, causal_lm: bool, hidden_size: int = 16, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=128,
        pad_token_id=vocab_size - len(_CHATML_SPECIALS),
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def _tiny_mistral3(vocab_size: int, num_layers: int, hidden_size: int = 16, seed: int = 0):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": hidden_size // 2,
            "max_position_embeddings": 128,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 32,
            "patch_size": 16,
        },
        image_token_index=vocab_size - 1,
        spatial_merge_size=1,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def _tiny_flux2_vae(seed: int = 0):
    """A one-level `AutoencoderKLFlux2` with 4 latent channels (16 after 2x2 patchification) and non-trivial
    batch-norm statistics, so that the latent normalisation is exercised."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.bn.running_mean.copy_(0.1 * torch.randn(16))
    vae.bn.running_var.copy_(0.5 + torch.rand(16))
    return vae


def build_tiny_flux2(save_directory: str, klein: bool = False, seed: int = 0) -> str:
    """Save a tiny Flux.2 dev pipeline (``klein``: a Flux.2 [klein] pipeline) and return its path.

    Flux.2 dev: a `Mistral3ForConditionalGeneration` text encoder (a 30-layer, 16-wide Mistral with a one-layer
    Pixtral vision tower) and a Mistral-format chat tokenizer; klein: a 27-layer, 16-wide `Qwen3ForCausalLM` and a
    ChatML tokenizer. The layers are as many as the pipelines' prompt layers (10, 20, 30 / 9, 18, 27) need; their
    stacked hidden states are 48 wide. A `Flux2Transformer2DModel` with one double- and one single-stream block (dev
    with, klein without a guidance embedding) on 16-channel tokens of an `AutoencoderKLFlux2` that downsamples by 2,
    and a dynamic-shift flow-matching scheduler. Images must be a multiple of 4 pixels a side.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

    tokenizer = build_tiny_chat_tokenizer(os.path.join(save_directory, "tokenizer"), mistral=not klein)
    if klein:
        text_encoder = _tiny_qwen3(len(tokenizer), num_layers=27, causal_lm=True, seed=seed)
    else:
        text_encoder = _tiny_mistral3(len(tokenizer), num_layers=30, seed=seed)
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=not klein,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    components = {
        "scheduler": scheduler,
        "vae": _tiny_flux2_vae(seed),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }
    pipeline = Flux2KleinPipeline(**components) if klein else Flux2Pipeline(**components)
    pipeline.save_pretrained(save_directory)
    return save_directory


def _tiny_qwen2_5_vl(vocab_size: int, hidden_size: int = 16, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 128,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vision_start_token_id=vocab_size - 3,
        vision_end_token_id=vocab_size - 2,
        image_token_id=vocab_size - 1,
        video_token_id=vocab_size - 1,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image(save_directory: str, seed: int = 0) -> str:
    """Save a tiny Qwen-Image pipeline and return its path.

    A two-layer, 16-wide `Qwen2_5_VLForConditionalGeneration` (one-layer vision tower) with a ChatML tokenizer, an
    `AutoencoderKLQwenImage` (a causal video VAE, one frame per image) with 4 latent channels that downsamples by 2,
    with non-trivial per-channel latent means and deviations, a two-layer `QwenImageTransformer2DModel` on 2x2-packed
    latents, and Qwen-Image's scheduler: dynamic shifting with ``base_shift = max_shift = ln 3`` (exponential).
    Images must be a multiple of 4 pixels a side.
    """
    import math

    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = build_tiny_chat_tokenizer(os.path.join(save_directory, "tokenizer"))
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=math.log(3),
        max_shift=math.log(3),
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipeline = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_tiny_qwen2_5_vl(len(tokenizer), seed=seed),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(save_directory)
    return save_directory


def build_tiny_z_image(save_directory: str, seed: int = 0) -> str:
    """Save a tiny Z-Image pipeline and return its path.

    A two-layer, 16-wide `Qwen3Model` with a ChatML tokenizer (the penultimate hidden states condition the image),
    a two-layer `ZImageTransformer2DModel` (32 wide, one noise- and one context-refiner layer, 2x2 patches), the
    `AutoencoderKL` of the other flow families with 4 latent channels and Flux.1's scaling and shift, and
    Z-Image-Turbo's scheduler: a static shift of 3. Images must be a multiple of 4 pixels a side.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = build_tiny_chat_tokenizer(os.path.join(save_directory, "tokenizer"))
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(seed, **_FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_tiny_qwen3(len(tokenizer), num_layers=2, causal_lm=False, seed=seed),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(save_directory)
    return save_directory


def build_tiny_wan(save_directory: str, seed: int = 0, ti2v: bool = False) -> str:
    """Save a tiny Wan 2.1-style text-to-video pipeline (`WanPipeline`) and return its path.

    A UMT5 encoder (``d_model`` 32) with the character-level T5 tokenizer; an `AutoencoderKLWan` with Wan 2.1's
    compression (8x spatially, 4x in time after the first frame: 9 frames of 32 x 32 pixels become latents of
    3 x 4 x 4) on 4 latent channels with non-trivial ``latents_mean``/``latents_std``; a two-block
    `WanTransformer3DModel` with Wan's ``(1, 2, 2)`` patches; and Wan 2.1's scheduler, `UniPCMultistepScheduler`
    with flow sigmas and ``flow_shift=3``. Frames must be ``4k + 1`` and sides multiples of 16.

    With ``ti2v`` it has the Wan 2.2 TI2V 5B layout instead: a residual VAE that patchifies 2 x 2 pixels first
    (16x spatially, so sides must be multiples of 32) and a pipeline with ``expand_timesteps`` (one timestep per
    latent token).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = build_tiny_t5_tokenizer(os.path.join(save_directory, "tokenizer"))
    torch.manual_seed(seed)
    wan22 = {"is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16}
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 2.0, 0.8, 1.2],
        **(wan22 if ti2v else {}),
    )
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    pipeline = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5_encoder(len(tokenizer), d_model=32, seed=seed, umt5=True),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        expand_timesteps=ti2v,
    )
    pipeline.save_pretrained(save_directory)
    return save_directory
