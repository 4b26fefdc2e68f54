"""Reward models that score generated images: ``scorer(images, prompts) -> scores``, one float per image.

A scorer is any callable that takes a list of PIL images and their prompts and returns one float per image, higher
meaning better. The evaluation ([`evaluate_preference`][trl_diffusion.evaluation.evaluate_preference]) and on-policy
pair generation ([`generate_preference_pairs`][trl_diffusion.generate_preference_pairs]) take any such callable. This
module holds the ones people use, each its published formula on top of a `transformers` model:

| scorer | score of image `x` for prompt `c` | weights (licence) |
| --- | --- | --- |
| [`CLIPScorer`][] | `100 · cos(E_img(x), E_txt(c))` | any `transformers` CLIP, e.g. `openai/clip-vit-large-patch14` (MIT) |
| [`PickScoreScorer`][] | `exp(logit_scale) · cos(E_img(x), E_txt(c))` | `yuvalkirstain/PickScore_v1` (MIT) |
| [`HPSv2Scorer`][] | `cos(E_img(x), E_txt(c))` of a fine-tuned CLIP ViT-H/14 | `xswu/HPSv2`, `HPS_v2.1_compressed.pt` (Apache-2.0) |
| [`AestheticScorer`][] | `MLP(E_img(x) / ‖E_img(x)‖)` on CLIP ViT-L/14 | improved-aesthetic-predictor head (Apache-2.0) |
| [`ImageRewardScorer`][] | `(MLP(BLIP_text(c ⨯ x)[CLS]) − μ) / σ` | `THUDM/ImageReward`, `ImageReward.pt` (Apache-2.0) |

`docs/building_preference_data.md` lists where each checkpoint comes from and what its licence allows.

Video scorers take clips, ``(F, H, W, 3)`` uint8 arrays, and score each: [`per_frame_scorer`][] turns any image scorer
above into one (the mean over frames spread across the clip); [`video_redness_scorer`][] and
[`temporal_smoothness_scorer`][] are rule-based.
"""

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image


if TYPE_CHECKING:
    from transformers import BlipConfig


logger = logging.getLogger(__name__)

Scorer = Callable[[list[Image.Image], list[str]], Sequence[float]]
# A video scorer takes clips as (F, H, W, 3) uint8 arrays and their prompts, and returns one float per clip
VideoScorer = Callable[[list[np.ndarray], list[str]], Sequence[float]]

HPS_REPO_ID = "xswu/HPSv2"
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])


def redness_scorer(images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
    """Rule-based: mean of ``R − (G + B)/2`` over the image, in ``[−255, 255]``."""
    pixels = _pixels(images)
    return (pixels[..., 0] - (pixels[..., 1] + pixels[..., 2]) / 2).mean(axis=(1, 2))


def saturation_scorer(images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
    """Rule-based: mean HSV saturation ``(max − min) / max`` over the image, in ``[0, 1]``."""
    pixels = _pixels(images)
    high, low = pixels.max(axis=-1), pixels.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0).mean(axis=(1, 2))


def _as_tensor(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor, or a model output holding the pooled projection in recent transformers."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class CLIPScorer:
    """CLIP similarity of image and prompt: ``scale · cos(image embedding, text embedding)``.

    Args:
        model_name_or_path: a `transformers.CLIPModel` folder or Hub id.
        processor_name_or_path: its `CLIPProcessor` (defaults to ``model_name_or_path``).
        scale: multiplies the cosine; 100 gives the usual CLIP-score range.
        device: where the model runs.
        dtype: the precision the model runs in.
    """

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        processor_name_or_path: str | None = None,
        scale: float = 100.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model_name_or_path, dtype=dtype).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor_name_or_path or model_name_or_path)
        self.scale = scale
        self.device = device

    def _logit_scale(self) -> float:
        return self.scale

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        inputs = self.processor(
            text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        text_embeds = self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
        image_embeds = torch.nn.functional.normalize(_as_tensor(image_embeds).float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(_as_tensor(text_embeds).float(), dim=-1)
        return (self._logit_scale() * (image_embeds * text_embeds).sum(dim=-1)).cpu().numpy()


class PickScoreScorer(CLIPScorer):
    """PickScore (Kirstain et al. 2023): a CLIP model fine-tuned on Pick-a-Pic, scored as ``exp(logit_scale) · cos``.

    Defaults name the public PickScore checkpoint and its processor; pass local folders to run offline.
    """

    def __init__(
        self,
        model_name_or_path: str = "yuvalkirstain/PickScore_v1",
        processor_name_or_path: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(model_name_or_path, processor_name_or_path, device=device, dtype=dtype)

    def _logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP ViT checkpoint's weights to those of `transformers.CLIPModel` (same architecture).

    OpenCLIP fuses each attention's query, key and value into one ``in_proj`` (split here in that order), names the
    MLP ``c_fc``/``c_proj``, and stores the two projections as ``x @ proj`` matrices (transposed here into linear
    weights). A leading ``module.`` (a DDP checkpoint) is dropped; an unknown weight raises a `ValueError`.
    """
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        tower, rest = (
            ("vision_model", key.removeprefix("visual.")) if key.startswith("visual.") else ("text_model", key)
        )
        if rest.startswith("transformer.resblocks."):
            index, name = rest.removeprefix("transformer.resblocks.").split(".", 1)
            prefix = f"{tower}.encoder.layers.{index}."
            if name.startswith("attn.in_proj_"):
                parameter = name.removeprefix("attn.in_proj_")
                for projection, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    converted[f"{prefix}self_attn.{projection}.{parameter}"] = part
                continue
            module, parameter = name.rsplit(".", 1)
            if module not in _OPEN_CLIP_BLOCK_NAMES:
                raise ValueError(f"Unexpected OpenCLIP weight {key!r}.")
            converted[f"{prefix}{_OPEN_CLIP_BLOCK_NAMES[module]}.{parameter}"] = value
        elif key in _OPEN_CLIP_NAMES:
            converted[_OPEN_CLIP_NAMES[key]] = value.reshape(()) if key == "logit_scale" else value
        elif key in ("visual.proj", "text_projection"):
            converted["visual_projection.weight" if tower == "vision_model" else "text_projection.weight"] = value.T
        else:
            raise ValueError(f"Unexpected OpenCLIP weight {key!r}.")
    return converted


_OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_NAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
    **{
        f"{old}.{parameter}": f"{new}.{parameter}"
        for old, new in (
            ("visual.ln_pre", "vision_model.pre_layrnorm"),
            ("visual.ln_post", "vision_model.post_layernorm"),
            ("ln_final", "text_model.final_layer_norm"),
        )
        for parameter in ("weight", "bias")
    },
}


class HPSv2Scorer(CLIPScorer):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): ``cos(E_img(x), E_txt(c))`` of a fine-tuned CLIP ViT-H/14.

    HPS v2 is OpenCLIP ViT-H-14 fine-tuned on the HPD v2 comparisons. Its score is the plain cosine of the normalised
    image and text features (the ``image_features @ text_features.T`` diagonal of the authors' code, no logit
    scale). The authors publish an OpenCLIP checkpoint; it is converted here into a
    `transformers.CLIPModel` of the same architecture ([`open_clip_to_transformers`][]), so no OpenCLIP install is
    needed.

    Args:
        checkpoint: a local checkpoint file (``.pt`` or ``.safetensors``), or ``None`` to download the one of
            ``version`` from the Hub repo ``xswu/HPSv2``. ``.pt`` files are read with ``torch.load(weights_only=True)``,
            which refuses arbitrary pickled objects.
        version: ``"v2.1"`` (default) or ``"v2.0"``: the checkpoint fetched when ``checkpoint`` is ``None``.
        config_name_or_path: the `CLIPModel` config and processor of the architecture: OpenCLIP's ViT-H-14 as LAION
            publishes it in transformers format (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; only its config,
            tokenizer and preprocessing are used, not its weights).
        device: where the model runs.
        dtype: the precision the model runs in.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        version: str = "v2.1",
        config_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor

        if checkpoint is None:
            if version not in HPS_CHECKPOINTS:
                raise ValueError(f"version must be one of {sorted(HPS_CHECKPOINTS)}, got {version!r}.")
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download(HPS_REPO_ID, HPS_CHECKPOINTS[version])
        state_dict = _load_state_dict(checkpoint)
        state_dict = state_dict.get("state_dict", state_dict)
        self.model = CLIPModel(CLIPConfig.from_pretrained(config_name_or_path))
        result = self.model.load_state_dict(open_clip_to_transformers(state_dict), strict=False)
        missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{checkpoint} does not match the CLIP architecture of {config_name_or_path}: missing "
                f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}."
            )
        self.model.to(device=device, dtype=dtype).eval()
        self.processor = CLIPProcessor.from_pretrained(config_name_or_path)
        self.scale = 1.0
        self.device = device


class AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head: five linear layers (768→1024→128→64→16→1), no activations.

    Its dropouts (0.2, 0.2, 0.1) are kept so the state-dict keys (``layers.0``, ``layers.2``, ``layers.4``,
    ``layers.6``, ``layers.7``) match the published file; they do nothing in eval mode.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def _load_state_dict(path_or_url: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or from a ``.pt``/``.pth`` file or URL read without arbitrary
    unpickling (``torch.load(weights_only=True)``)."""
    if path_or_url.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path_or_url)
    if path_or_url.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu", weights_only=True)
    return torch.load(path_or_url, map_location="cpu", weights_only=True)


class AestheticScorer:
    """LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann): ``MLP(E_img(x) / ‖E_img(x)‖)``.

    The image embedding of CLIP ViT-L/14, L2-normalised, through the linear head trained on SAC, LOGOS and AVA
    ratings (a 1–10 scale; LAION-Aesthetics' "6+" subsets use 6 as the threshold). The prompt is ignored.

    Args:
        model_name_or_path: the CLIP model the head was trained on (`openai/clip-vit-large-patch14`).
        head: the head's weights: a local ``.pth``/``.safetensors`` file or a URL (default: the published
            ``sac+logos+ava1-l14-linearMSE.pth``). ``.pth`` files are read with ``torch.load(weights_only=True)``.
        device: where the model runs.
        dtype: the precision the CLIP model runs in (the head runs in float32).
    """

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        head: str = AESTHETIC_HEAD_URL,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import CLIPImageProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(model_name_or_path, dtype=dtype).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(model_name_or_path)
        self.head = AestheticHead(self.model.config.projection_dim)
        self.head.load_state_dict(_load_state_dict(head))
        self.head.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        embeddings = _as_tensor(self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)))
        embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        return self.head(embeddings).squeeze(-1).cpu().numpy()


def blip_to_transformers(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, list[str]]:
    """Split an ImageReward checkpoint (the BLIP repository's names) into `transformers` BLIP state dicts.

    Returns ``(vision, text, head, ignored)``: the ``blip.visual_encoder`` weights renamed for `BlipVisionModel`
    (BLIP's timm-style ViT: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.{norm1, attn.qkv,
    attn.proj, norm2, mlp}``, ``norm``), the ``blip.text_encoder`` weights for `BlipTextModel` (BERT names, kept),
    the ``mlp`` head, and the keys of everything else the checkpoint holds (projections and heads of BLIP
    pre-training, which ImageReward does not use).
    """
    vision, text, head, ignored = {}, {}, {}, []
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            if name.startswith("norm."):  # the final LayerNorm
                name = "post_layernorm." + name.removeprefix("norm.")
            for old, new in _BLIP_VISION_NAMES:
                name = name.replace(old, new)
            vision[name] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        else:
            ignored.append(key)
    return vision, text, head, ignored


_BLIP_VISION_NAMES = (
    ("patch_embed.proj", "embeddings.patch_embedding"),
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("blocks.", "encoder.layers."),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
    ("attn.qkv", "self_attn.qkv"),
    ("attn.proj", "self_attn.projection"),
)


def image_reward_config():
    """ImageReward's architecture as a `transformers.BlipConfig`: BLIP's ViT-L/16 at 224 pixels and BERT-base with
    cross-attention to it (BLIP's ``med_config``, vocabulary 30524 with ``[DEC]`` and ``[ENC]``)."""
    from transformers import BlipConfig

    text = {
        "vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512, "layer_norm_eps": 1e-12,
    }  # fmt: skip
    vision = {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6,
    }  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision)


class ImageRewardScorer:
    """ImageReward (Xu et al. 2023): ``(MLP(h_CLS) − μ) / σ`` of BLIP's text encoder attending to the image.

    The prompt (BERT tokens, padded to 35) runs through BLIP's text encoder with cross-attention to the ViT's image
    tokens; its ``[CLS]`` state goes through a five-layer linear head (the LAION aesthetic head's shape, 768 inputs)
    and is standardised with the authors' constants ``μ = 0.16717362830052426``, ``σ = 1.0333394966054072``. The
    published checkpoint (BLIP-repository names) is converted into `transformers`' BLIP modules
    ([`blip_to_transformers`][]), so neither the ``image-reward`` package nor its BLIP code is needed.

    Args:
        checkpoint: a local ``ImageReward.pt`` (or ``.safetensors``), or ``None`` to download ``ImageReward.pt`` from
            the Hub repo ``THUDM/ImageReward``; ``.pt`` is read with ``torch.load(weights_only=True)``.
        config: a `transformers.BlipConfig` or a folder/Hub id holding one; ``None`` is `image_reward_config`.
        tokenizer_name_or_path: BLIP's BERT tokenizer (``[DEC]``/``[ENC]`` added): ``Salesforce/blip-itm-large-coco``.
        device: where the model runs.
        dtype: the precision the model runs in (the head runs in float32).
    """

    mean, std, max_length = 0.16717362830052426, 1.0333394966054072, 35

    def __init__(
        self,
        checkpoint: str | None = None,
        config: "BlipConfig | str | None" = None,
        tokenizer_name_or_path: str = "Salesforce/blip-itm-large-coco",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoTokenizer, BlipConfig, CLIPImageProcessor
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download("THUDM/ImageReward", "ImageReward.pt")
        config = BlipConfig.from_pretrained(config) if isinstance(config, str) else config or image_reward_config()
        vision, text, head, ignored = blip_to_transformers(_load_state_dict(checkpoint))
        if ignored:
            logger.info("ImageReward: %d checkpoint weights outside the scorer were not loaded.", len(ignored))
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.head = AestheticHead(config.text_config.hidden_size)
        for module, weights in ((self.vision_model, vision), (self.text_encoder, text), (self.head, head)):
            module.load_state_dict(weights)
        self.vision_model.to(device=device, dtype=dtype).eval()
        self.text_encoder.to(device=device, dtype=dtype).eval()
        self.head.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
        size = config.vision_config.image_size  # the authors' preprocessing: bicubic resize, centre crop, CLIP norm
        self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        image_embeds = self.vision_model(pixels["pixel_values"].to(self.device, self.dtype)).last_hidden_state
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        ).last_hidden_state
        rewards = self.head(hidden[:, 0].float()).squeeze(-1)
        return ((rewards - self.mean) / self.std).cpu().numpy()


# ----- video -----


def video_redness_scorer(videos: list[np.ndarray], prompts: list[str] | None = None) -> np.ndarray:
    """Rule-based, per video: mean of ``R − (G + B)/2`` over all frames and pixels, in ``[−255, 255]``."""
    scores = []
    for video in videos:
        video = np.asarray(video, dtype=np.float32)
        scores.append(float(np.mean(video[..., 0] - (video[..., 1] + video[..., 2]) / 2)))
    return np.array(scores)


def temporal_smoothness_scorer(videos: list[np.ndarray], prompts: list[str] | None = None) -> np.ndarray:
    """Rule-based, per video: ``−mean |x_{t+1} − x_t| / 255`` over consecutive frames, in ``[−1, 0]`` (0: static)."""
    scores = []
    for video in videos:
        video = np.asarray(video, dtype=np.float32)
        scores.append(-float(np.abs(np.diff(video, axis=0)).mean()) / 255 if len(video) > 1 else 0.0)
    return np.array(scores)


def per_frame_scorer(image_scorer: Scorer, num_frames: int | None = 4) -> VideoScorer:
    """A video scorer from an image scorer (CLIP, PickScore...): the mean score of ``num_frames`` frames spread
    evenly over each video (all frames with ``None``), each scored with the video's prompt."""

    def score(videos: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        frames, frame_prompts, counts = [], [], []
        for video, prompt in zip(videos, prompts, strict=True):
            video = np.asarray(video)
            count = len(video) if num_frames is None else min(num_frames, len(video))
            for index in np.linspace(0, len(video) - 1, count).round().astype(int):
                frames.append(Image.fromarray(video[index]))
                frame_prompts.append(prompt)
            counts.append(count)
        scores = np.asarray(image_scorer(frames, frame_prompts), dtype=np.float64)
        return np.array([chunk.mean() for chunk in np.split(scores, np.cumsum(counts)[:-1])])

    return score


def _frame_scorer() -> Scorer:
    from .testing.synthetic import frame_scorer

    return frame_scorer


SCORERS: dict[str, Callable[..., Scorer]] = {
    "clip": CLIPScorer,
    "pickscore": PickScoreScorer,
    "hpsv2": HPSv2Scorer,
    "aesthetic": AestheticScorer,
    "imagereward": ImageRewardScorer,
    "redness": lambda: redness_scorer,
    "saturation": lambda: saturation_scorer,
    "frame": _frame_scorer,
}


def get_scorer(name: str, **kwargs) -> Scorer:
    """Build the scorer ``name`` (a key of ``SCORERS``) with ``kwargs`` for its constructor."""
    if name not in SCORERS:
        raise ValueError(f"Unknown scorer {name!r}; available: {sorted(SCORERS)}.")
    if kwargs and name in ("redness", "saturation", "frame"):
        raise ValueError(f"The rule-based scorer {name!r} takes no arguments; got {sorted(kwargs)}.")
    return SCORERS[name](**kwargs)
