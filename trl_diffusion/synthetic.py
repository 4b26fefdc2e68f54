"""A synthetic text-to-image preference task with a known true reward, small enough to train on a CPU.

Images are 16-pixel squares of one colour with a little texture. Captions name the hue (``"a teal square"``);
saturation and brightness vary at random, independently of the caption. The true reward is a style property that the
prompt does not ask for: the image's saturation. A tiny Stable Diffusion model pre-trained on these images follows
its prompt loosely and makes squares of every saturation, so preference pairs can be self-generated from it and
labelled by the true reward, as the MaPO paper built Pick-Style. The demo (`make demo`) and the efficacy benchmark
(`benchmarks/efficacy.py`) use this module.
"""

import colorsys
import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from .evaluation import generate_paired, saturation_scorer
from .tiny_models import build_tiny_stable_diffusion


SIZE = 16
HUES = {
    "red": 0,
    "orange": 30,
    "yellow": 55,
    "lime": 90,
    "green": 125,
    "teal": 165,
    "cyan": 190,
    "blue": 225,
    "purple": 275,
    "pink": 320,
}
TRAIN_COLOURS = ["red", "orange", "yellow", "lime", "green", "cyan", "blue", "purple"]
HELD_OUT_COLOURS = ["teal", "pink"]


def caption(colour: str) -> str:
    return f"a {colour} square"


def render_squares(colours: list[str], rng: np.random.Generator, saturation_range=(0.05, 1.0)) -> np.ndarray:
    """One textured square per colour name, uint8 ``(n, SIZE, SIZE, 3)``, with random saturation and brightness."""
    images = np.empty((len(colours), SIZE, SIZE, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        hue = (HUES[colour] + rng.uniform(-10, 10)) % 360 / 360
        rgb = colorsys.hsv_to_rgb(hue, rng.uniform(*saturation_range), rng.uniform(0.55, 1.0))
        texture = rng.integers(-10, 11, size=(SIZE, SIZE, 3))
        images[i] = np.clip(np.asarray(rgb) * 255 + texture, 0, 255).astype(np.uint8)
    return images


def add_frame(images: np.ndarray, width: int = 3) -> np.ndarray:
    """A white frame of ``width`` pixels: a style the base model never makes (for the reference-mismatch test)."""
    framed = images.copy()
    framed[:, :width], framed[:, -width:], framed[:, :, :width], framed[:, :, -width:] = 255, 255, 255, 255
    return framed


def frame_scorer(images: list[Image.Image], prompts: list[str] | None = None, width: int = 3) -> np.ndarray:
    """Rule-based: mean brightness of the outer ``width`` pixels minus that of the centre, in ``[−1, 1]``."""
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images]).mean(-1)
    border = np.ones(pixels.shape[1:], dtype=bool)
    border[width:-width, width:-width] = False
    return pixels[:, border].mean(axis=1) - pixels[:, ~border].mean(axis=1)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def pretrain_base_model(path: str, steps: int = 600, batch_size: int = 32, seed: int = 0) -> str:
    """Build a tiny SD pipeline at ``path`` and pre-train it on captioned squares; reuse it if already there.

    The VAE is trained first to reconstruct squares, half of them framed (``steps // 2`` steps), then the UNet to
    denoise the latents of unframed squares conditioned on the captions (``steps`` steps). Returns ``path``.
    """
    if os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isfile(os.path.join(path, ".pretrained")):
        return path
    build_tiny_stable_diffusion(path, sample_size=SIZE // 2, seed=seed)
    pipeline = StableDiffusionPipeline.from_pretrained(path)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    names = list(HUES)
    vae, unet = pipeline.vae, pipeline.unet
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for _ in range(steps // 2):
        images = render_squares(list(rng.choice(names, batch_size)), rng)
        # The VAE (never the UNet) also learns framed squares, so that the reference-mismatch style (`add_frame`)
        # survives encoding: without them the frame is lost in latent space and no method can learn it.
        framed = rng.random(batch_size) < 0.5
        images[framed] = add_frame(images[framed])
        pixels = _to_tensor(images)
        posterior = vae.encode(pixels).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(_to_tensor(render_squares(list(rng.choice(names, 256)), rng))).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        ids = pipeline.tokenizer(
            [caption(name) for name in names],
            padding="max_length",
            max_length=pipeline.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        text = dict(zip(names, pipeline.text_encoder(ids)[0], strict=True))
        empty_text = text_of_empty_prompt(pipeline)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    for _ in range(steps):
        colours = list(rng.choice(names, batch_size))
        with torch.no_grad():
            x0 = vae.encode(_to_tensor(render_squares(colours, rng))).latent_dist.mode() * vae.config.scaling_factor
        conditioning = torch.stack([text[colour] for colour in colours])
        conditioning[torch.rand(batch_size) < 0.1] = empty_text  # caption dropout, for guidance
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        prediction = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=conditioning).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipeline.save_pretrained(path)
    open(os.path.join(path, ".pretrained"), "w").close()
    return path


def text_of_empty_prompt(pipeline: StableDiffusionPipeline) -> torch.Tensor:
    ids = pipeline.tokenizer(
        [""], padding="max_length", max_length=pipeline.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    return pipeline.text_encoder(ids)[0][0]


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def self_generated_pairs(
    pipeline: StableDiffusionPipeline,
    num_pairs: int,
    seed: int = 0,
    reward=saturation_scorer,
    num_inference_steps: int = 20,
) -> Dataset:
    """Pick-a-Pic-style pairs generated by ``pipeline`` on the training captions, labelled by the true ``reward``.

    Columns: ``jpg_0``, ``jpg_1``, ``label_0`` (1 where image 0 has the higher reward), ``caption``, ``user_id``
    (one of five simulated annotators, 0–4) and ``flipped`` (all ``False``; see [`flip_labels`]).
    """
    rng = np.random.default_rng(seed)
    captions = [caption(colour) for colour in rng.choice(TRAIN_COLOURS, num_pairs)]
    pipeline.set_progress_bar_config(disable=True)
    prompts = [c for c in captions for _ in range(2)]
    seeds = rng.integers(0, 2**31, size=len(prompts)).tolist()
    images = generate_paired(pipeline, prompts, seeds, batch_size=64, num_inference_steps=num_inference_steps)
    scores = np.asarray(reward(images, prompts)).reshape(num_pairs, 2)
    return Dataset.from_dict(
        {
            "jpg_0": [png_bytes(image) for image in images[0::2]],
            "jpg_1": [png_bytes(image) for image in images[1::2]],
            "label_0": (scores[:, 0] > scores[:, 1]).astype(float).tolist(),
            "caption": captions,
            "user_id": rng.integers(0, 5, num_pairs).tolist(),
            "flipped": [False] * num_pairs,
        }
    )


def flip_labels(dataset: Dataset, flip_rate: float, flip_mode: str = "scattered", seed: int = 0) -> Dataset:
    """Flip a fraction ``flip_rate`` of the labels: at random pairs (``"scattered"``), or all the labels of a minority
    annotator (``"minority"``: the flipped pairs are re-assigned to ``user_id`` 0, who prefers the opposite, and the
    other pairs to users 1–4). Sets the ``flipped`` column."""
    if flip_mode not in ("scattered", "minority"):
        raise ValueError(f"flip_mode must be 'scattered' or 'minority', got {flip_mode!r}.")
    rng = np.random.default_rng(seed + 1)
    flipped = rng.random(len(dataset)) < flip_rate
    labels = np.asarray(dataset["label_0"], dtype=float)
    columns = {"label_0": np.where(flipped, 1 - labels, labels).tolist(), "flipped": flipped.tolist()}
    if flip_mode == "minority":
        columns["user_id"] = np.where(flipped, 0, rng.integers(1, 5, len(dataset))).tolist()
    for name, values in columns.items():
        dataset = dataset.remove_columns(name).add_column(name, values)
    return dataset


def mismatched_pairs(pipeline: StableDiffusionPipeline, num_pairs: int, seed: int = 0) -> Dataset:
    """Pairs whose chosen image has a style the base never makes (a white frame); the rejected one is a base sample."""
    rng = np.random.default_rng(seed)
    colours = list(rng.choice(TRAIN_COLOURS, num_pairs))
    captions = [caption(colour) for colour in colours]
    chosen = add_frame(render_squares(colours, rng))
    pipeline.set_progress_bar_config(disable=True)
    seeds = rng.integers(0, 2**31, size=num_pairs).tolist()
    rejected = generate_paired(pipeline, captions, seeds, batch_size=64, num_inference_steps=20)
    return Dataset.from_dict(
        {
            "chosen": [png_bytes(image) for image in chosen],
            "rejected": [png_bytes(image) for image in rejected],
            "prompt": captions,
        }
    )
