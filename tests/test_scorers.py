"""The reward models of `trl_diffusion.scorers`, each on a tiny local model against its published formula."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_clip import build_tiny_clip
from PIL import Image
from safetensors.torch import save_file

from trl_diffusion.scorers import (
    AestheticHead,
    AestheticScorer,
    HPSv2Scorer,
    get_scorer,
    open_clip_to_transformers,
    per_frame_scorer,
    redness_scorer,
    temporal_smoothness_scorer,
    video_redness_scorer,
)


IMAGES = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255), (30, 200, 90)]]
PROMPTS = ["a red square", "a blue square", "a green square"]


@pytest.fixture(scope="module")
def tiny_clip_gelu(tmp_path_factory) -> str:
    """ViT-H-14 (HPS v2's architecture) uses the exact GELU, where OpenAI's CLIPs use quick-GELU."""
    return build_tiny_clip(str(tmp_path_factory.mktemp("tiny-clip-gelu")), hidden_act="gelu")


def to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tiny transformers CLIP's weights under OpenCLIP's names (the layout of the published HPS files)."""
    out = {}
    for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
        layers = {key.split(".")[3] for key in state_dict if key.startswith(f"{tower}.encoder.layers.")}
        for i in layers:
            hf, oc = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for part in ("weight", "bias"):
                out[f"{oc}attn.in_proj_{part}"] = torch.cat(
                    [state_dict[f"{hf}self_attn.{p}_proj.{part}"] for p in "qkv"]
                )
                for hf_name, oc_name in (
                    ("self_attn.out_proj", "attn.out_proj"),
                    ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"),
                ):
                    out[f"{oc}{oc_name}.{part}"] = state_dict[f"{hf}{hf_name}.{part}"]  # fmt: skip
    v, t = "vision_model.", "text_model."
    out["visual.conv1.weight"] = state_dict[f"{v}embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = state_dict[f"{v}embeddings.class_embedding"]
    out["visual.positional_embedding"] = state_dict[f"{v}embeddings.position_embedding.weight"]
    out["token_embedding.weight"] = state_dict[f"{t}embeddings.token_embedding.weight"]
    out["positional_embedding"] = state_dict[f"{t}embeddings.position_embedding.weight"]
    for part in ("weight", "bias"):
        out[f"visual.ln_pre.{part}"] = state_dict[f"{v}pre_layrnorm.{part}"]
        out[f"visual.ln_post.{part}"] = state_dict[f"{v}post_layernorm.{part}"]
        out[f"ln_final.{part}"] = state_dict[f"{t}final_layer_norm.{part}"]
    out["visual.proj"] = state_dict["visual_projection.weight"].T.contiguous()
    out["text_projection"] = state_dict["text_projection.weight"].T.contiguous()
    out["logit_scale"] = state_dict["logit_scale"]
    return out


def _open_clip_blocks(x, sd, prefix, heads, mask=None):
    """OpenCLIP's pre-LayerNorm residual blocks, written out with `nn.MultiheadAttention`'s functional form."""
    width = x.shape[-1]
    for i in sorted({int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}):
        p = f"{prefix}{i}."
        h = F.layer_norm(x, (width,), sd[f"{p}ln_1.weight"], sd[f"{p}ln_1.bias"]).transpose(0, 1)
        h, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, sd[f"{p}attn.in_proj_weight"], sd[f"{p}attn.in_proj_bias"], None, None, False,
            0.0, sd[f"{p}attn.out_proj.weight"], sd[f"{p}attn.out_proj.bias"], need_weights=False, attn_mask=mask,
        )  # fmt: skip
        x = x + h.transpose(0, 1)
        h = F.layer_norm(x, (width,), sd[f"{p}ln_2.weight"], sd[f"{p}ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[f"{p}mlp.c_fc.weight"], sd[f"{p}mlp.c_fc.bias"])), sd[f"{p}mlp.c_proj.weight"], sd[f"{p}mlp.c_proj.bias"])  # fmt: skip
    return x


def open_clip_features(sd, pixels, tokens, heads=2):
    """OpenCLIP's ``encode_image`` and ``encode_text`` of a ViT CLIP, from its state dict (the reference)."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1]).flatten(2)
    x = x.transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _open_clip_blocks(x, sd, "visual.transformer.resblocks.", heads)
    image = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    image = image @ sd["visual.proj"]
    y = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]
    causal = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)
    y = _open_clip_blocks(y, sd, "transformer.resblocks.", heads, mask=causal)
    y = F.layer_norm(y, y.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    text = y[torch.arange(len(y)), tokens.argmax(dim=-1)] @ sd["text_projection"]
    return image, text


def test_hpsv2_scores_the_cosine_of_the_converted_open_clip_checkpoint(tiny_clip_gelu, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip_gelu), CLIPProcessor.from_pretrained(tiny_clip_gelu)
    open_clip_state = to_open_clip(model.state_dict())
    inputs = processor(text=PROMPTS, images=IMAGES, return_tensors="pt", padding=True)
    with torch.no_grad():
        image, text = open_clip_features(open_clip_state, inputs["pixel_values"], inputs["input_ids"])
        expected = F.cosine_similarity(image, text, dim=-1).numpy()
        hf = model(**inputs)
    # The reference OpenCLIP forward and transformers agree on these weights.
    np.testing.assert_allclose(F.cosine_similarity(hf.image_embeds, hf.text_embeds).numpy(), expected, atol=1e-5)
    # The published files hold {"state_dict": ...} under DDP's "module." prefix, read with weights_only=True.
    torch.save({"state_dict": {f"module.{k}": v for k, v in open_clip_state.items()}}, tmp_path / "hps.pt")
    scorer = HPSv2Scorer(str(tmp_path / "hps.pt"), config_name_or_path=tiny_clip_gelu)
    np.testing.assert_allclose(scorer(IMAGES, PROMPTS), expected, atol=1e-5)
    save_file(open_clip_state, tmp_path / "hps.safetensors")
    np.testing.assert_allclose(HPSv2Scorer(str(tmp_path / "hps.safetensors"), config_name_or_path=tiny_clip_gelu)(IMAGES, PROMPTS), expected, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="Unexpected OpenCLIP weight 'visual.attnpool.weight'"):
        open_clip_to_transformers({**open_clip_state, "visual.attnpool.weight": torch.zeros(1)})


def test_aesthetic_scorer_is_the_linear_head_on_the_normalised_image_embedding(tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel

    path = build_tiny_clip(str(tmp_path / "clip"))
    torch.manual_seed(1)
    head = AestheticHead(8)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    model, processor = CLIPModel.from_pretrained(path), CLIPImageProcessor.from_pretrained(path)
    with torch.no_grad():
        embeddings = model(
            **processor(images=IMAGES, return_tensors="pt"), input_ids=torch.ones(3, 1, dtype=torch.long)
        )
        x = embeddings.image_embeds / embeddings.image_embeds.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # five affine maps, no activation in between
            x = x @ head.layers[index].weight.T + head.layers[index].bias
    scorer = AestheticScorer(path, head=str(tmp_path / "head.pth"))
    np.testing.assert_allclose(scorer(IMAGES, PROMPTS), x.squeeze(-1).numpy(), rtol=1e-5, atol=1e-6)
    assert np.ptp(scorer(IMAGES)) > 0  # the prompt is not needed


def test_get_scorer_builds_by_name_and_rejects_unknown_names(tiny_clip_gelu):
    np.testing.assert_allclose(get_scorer("redness")(IMAGES, PROMPTS), redness_scorer(IMAGES))
    clip = get_scorer("clip", model_name_or_path=tiny_clip_gelu)
    assert clip(IMAGES, PROMPTS).shape == (3,)
    with pytest.raises(ValueError, match="Unknown scorer 'hps'; available"):
        get_scorer("hps")
    with pytest.raises(ValueError, match="takes no arguments"):
        get_scorer("redness", device="cpu")


def build_tiny_blip(path):
    """A tiny BLIP config and a character-level BERT tokenizer with BLIP's [DEC]/[ENC] tokens, saved in ``path``."""
    import string

    from transformers import BertTokenizer, BlipConfig

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"), tokenize_chinese_chars=False)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tokenizer.save_pretrained(str(path))
    common = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    return BlipConfig(
        text_config={**common, "vocab_size": len(tokenizer), "encoder_hidden_size": 24, "max_position_embeddings": 40},
        vision_config={**common, "hidden_size": 24, "image_size": 8, "patch_size": 4, "layer_norm_eps": 1e-6},
    )


def to_blip_repository(vision: dict, text: dict, head: dict) -> dict[str, torch.Tensor]:
    """transformers BLIP weights under the BLIP repository's names, as ImageReward.pt stores them."""
    names = [("embeddings.patch_embedding", "patch_embed.proj"), ("embeddings.class_embedding", "cls_token"),
             ("embeddings.position_embedding", "pos_embed"), ("encoder.layers.", "blocks."), ("layer_norm1", "norm1"),
             ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"), ("self_attn.projection", "attn.proj"),
             ("post_layernorm", "norm")]  # fmt: skip
    out = {}
    for key, value in vision.items():
        for new, old in names:
            key = key.replace(new, old)
        out[f"blip.visual_encoder.{key}"] = value
    out.update({f"blip.text_encoder.{k}": v for k, v in text.items()})
    out.update({f"mlp.{k}": v for k, v in head.items()})
    out["blip.vision_proj.weight"] = torch.zeros(4, 24)  # pre-training heads the scorer leaves out
    return out


def blip_vit_reference(sd, pixels, heads=2, eps=1e-6):
    """BLIP's timm-style ViT forward (``models/vit.py``), on its own weight names."""
    p = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[f"{p}patch_embed.proj.weight"], sd[f"{p}patch_embed.proj.bias"], stride=4)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{p}cls_token"].expand(len(x), -1, -1), x], dim=1) + sd[f"{p}pos_embed"]
    width, blocks = x.shape[-1], {int(k.split(".")[3]) for k in sd if k.startswith(f"{p}blocks.")}
    for i in sorted(blocks):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (width,), sd[f"{b}norm1.weight"], sd[f"{b}norm1.bias"], eps)
        q, k, v = F.linear(h, sd[f"{b}attn.qkv.weight"], sd[f"{b}attn.qkv.bias"]).reshape(
            len(x), -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # fmt: skip
        attention = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1)
        h = (attention @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(h, sd[f"{b}attn.proj.weight"], sd[f"{b}attn.proj.bias"])
        h = F.layer_norm(x, (width,), sd[f"{b}norm2.weight"], sd[f"{b}norm2.bias"], eps)
        x = x + F.linear(F.gelu(F.linear(h, sd[f"{b}mlp.fc1.weight"], sd[f"{b}mlp.fc1.bias"])), sd[f"{b}mlp.fc2.weight"], sd[f"{b}mlp.fc2.bias"])  # fmt: skip
    return F.layer_norm(x, (width,), sd[f"{p}norm.weight"], sd[f"{p}norm.bias"], eps)


def test_image_reward_is_the_standardised_head_on_blip_cross_attention(tmp_path, caplog):
    from transformers import AutoTokenizer, CLIPImageProcessor
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from trl_diffusion.scorers import ImageRewardScorer

    config = build_tiny_blip(tmp_path)
    torch.manual_seed(0)
    vision, text = BlipVisionModel(config.vision_config).eval(), BlipTextModel(config.text_config, False).eval()
    head = AestheticHead(16)
    with torch.no_grad():
        for parameter in vision.parameters():  # away from the initialisation's zeros and ones
            parameter.add_(0.05 * torch.randn_like(parameter))
    checkpoint = to_blip_repository(vision.state_dict(), text.state_dict(), head.state_dict())
    torch.save(checkpoint, tmp_path / "ImageReward.pt")
    with caplog.at_level("INFO", logger="trl_diffusion.scorers"):
        scorer = ImageRewardScorer(
            str(tmp_path / "ImageReward.pt"), config=config, tokenizer_name_or_path=str(tmp_path)
        )
    assert "1 checkpoint weights outside the scorer were not loaded" in caplog.text
    pixels = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})(
        images=IMAGES, return_tensors="pt"
    )["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(str(tmp_path))(
        PROMPTS, padding="max_length", max_length=35, return_tensors="pt"
    )
    with torch.no_grad():
        image_tokens = blip_vit_reference(checkpoint, pixels)
        np.testing.assert_allclose(vision(pixels).last_hidden_state.numpy(), image_tokens.numpy(), atol=1e-5)
        cls = text(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long),
        ).last_hidden_state[:, 0]  # fmt: skip
        for index in (0, 2, 4, 6, 7):
            cls = cls @ head.layers[index].weight.T + head.layers[index].bias
    expected = (cls.squeeze(-1).numpy() - 0.16717362830052426) / 1.0333394966054072
    np.testing.assert_allclose(scorer(IMAGES, PROMPTS), expected, rtol=1e-5, atol=1e-6)
    assert tokens["input_ids"][0, 0] == scorer.tokenizer.cls_token_id  # [CLS] first, as ImageReward tokenises


def test_rule_based_video_scorers_on_known_clips():
    red = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    flicker = red.copy()
    flicker[1::2] = 0  # every other frame black
    np.testing.assert_allclose(video_redness_scorer([red, flicker]), [255, 127.5])
    np.testing.assert_allclose(temporal_smoothness_scorer([red, flicker, red[:1]]), [0, -1 / 3, 0])
    # An image scorer averaged over frames spread across the clip: frames 0, 1, 2, 3 of 4 -> 255, 0, 255, 0
    np.testing.assert_allclose(per_frame_scorer(redness_scorer)([red, flicker], ["a", "b"]), [255, 127.5])
    np.testing.assert_allclose(per_frame_scorer(redness_scorer, num_frames=2)([flicker], ["a"]), [127.5])
