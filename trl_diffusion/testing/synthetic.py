"""A synthetic text-to-image preference task with known true rewards, small enough to train on a CPU.

Images are 16-pixel pictures of one square on a dark, grey background. The caption names the square's hue (``"a teal
square"``); every other property is drawn at random, independently of the caption and of each other: the square's
saturation, brightness, size and position, the background's brightness and the amount of pixel noise (texture). A tiny
Stable Diffusion model pre-trained on these images follows its prompt loosely and reproduces that spread, so a
preference for any simple image property can be learned from pairs it generates itself, labelled by a true reward that
no prompt mentions (as the MaPO paper built Pick-Style). [`REWARDS`][] names the rule-based rewards this module offers;
[`self_generated_pairs`][] takes any ``scorer(images, prompts) -> scores``; [`train_on_task`][] trains a method on them
with the task's settings. The demo (`make demo`) and the efficacy and guard benchmarks (`benchmarks/efficacy.py`,
`benchmarks/guards.py`) use this module.
"""

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from PIL import Image
from transformers import PrinterCallback

from ..data import encode_png
from ..evaluation import Scorer, generate_paired, saturation_scorer
from ..trainer import METHODS, DiffusionPreferenceTrainer
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
# Ranges of the random properties of a rendered picture (fractions of full scale, sides in pixels).
SQUARE_VALUE_RANGE = (0.55, 1.0)
BACKGROUND_RANGE = (0.0, 0.4)
SIDE_RANGE = (4, 14)
TEXTURE_RANGE = (0.0, 0.05)
# Classifier-free guidance of the task's generations (see `docs/evaluation.md`).
GUIDANCE_SCALE = 1.0
# Weight of the colour error in the VAE's pre-training loss (see `_pretrain_vae`).
CHROMA_WEIGHT = 4.0
# Bump when the rendering or the pre-training changes, so cached base models are rebuilt.
TASK_VERSION = 2


def caption(colour: str) -> str:
    return f"a {colour} square"


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV to RGB: three arrays of shape ``(n,)`` in ``[0, 1]`` in, ``(n, 3)`` out."""
    sector = np.floor(hue * 6).astype(int) % 6
    fraction = hue * 6 - np.floor(hue * 6)
    p, q, t = value * (1 - saturation), value * (1 - fraction * saturation), value * (1 - (1 - fraction) * saturation)
    table = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    return np.stack([np.stack(channels, axis=-1) for channels in table])[sector, np.arange(len(hue))]


def render_squares(colours: list[str], rng: np.random.Generator, saturation_range=(0.05, 1.0)) -> np.ndarray:
    """One picture per colour name, uint8 ``(n, SIZE, SIZE, 3)``: a square of that hue (±10°) on a grey background.

    Drawn independently per picture: the square's saturation (``saturation_range``) and brightness
    (`SQUARE_VALUE_RANGE`), its side (`SIDE_RANGE`) and position (anywhere inside a 1-pixel margin, so the outer ring
    is always background), the background's grey level (`BACKGROUND_RANGE`) and the standard deviation of Gaussian
    pixel noise (`TEXTURE_RANGE`).
    """
    n = len(colours)
    hue = (np.asarray([HUES[colour] for colour in colours], dtype=float) + rng.uniform(-10, 10, n)) % 360 / 360
    rgb = hsv_to_rgb(hue, rng.uniform(*saturation_range, n), rng.uniform(*SQUARE_VALUE_RANGE, n))
    background = rng.uniform(*BACKGROUND_RANGE, n)
    side = rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, n)
    top, left = rng.integers(1, SIZE - side), rng.integers(1, SIZE - side)
    pixels = np.arange(SIZE)
    in_rows = (pixels >= top[:, None]) & (pixels < (top + side)[:, None])
    in_columns = (pixels >= left[:, None]) & (pixels < (left + side)[:, None])
    inside = in_rows[:, :, None] & in_columns[:, None, :]
    images = np.where(inside[..., None], rgb[:, None, None, :], background[:, None, None, None])
    noise = rng.uniform(*TEXTURE_RANGE, n)[:, None, None, None] * rng.standard_normal((n, SIZE, SIZE, 3))
    return np.clip(np.rint((images + noise) * 255), 0, 255).astype(np.uint8)


def add_frame(images: np.ndarray, width: int = 3) -> np.ndarray:
    """A white frame of ``width`` pixels: a style the base model never makes (for the reference-mismatch test)."""
    framed = images.copy()
    framed[:, :width], framed[:, -width:], framed[:, :, :width], framed[:, :, -width:] = 255, 255, 255, 255
    return framed


# ----- rule-based rewards -----


def _unit_pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images])


def frame_scorer(images: list[Image.Image], prompts: list[str] | None = None, width: int = 3) -> np.ndarray:
    """Rule-based: mean brightness of the outer ``width`` pixels minus that of the centre, in ``[−1, 1]``."""
    pixels = _unit_pixels(images).mean(-1)
    border = np.ones(pixels.shape[1:], dtype=bool)
    border[width:-width, width:-width] = False
    return pixels[:, border].mean(axis=1) - pixels[:, ~border].mean(axis=1)


def brightness_scorer(images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
    """Rule-based: mean of the RGB values over the image, in ``[0, 1]``."""
    return _unit_pixels(images).mean(axis=(1, 2, 3))


def square_mask(images: list[Image.Image], threshold: float = 0.1) -> np.ndarray:
    """Boolean ``(n, H, W)``: pixels whose largest channel difference from the background exceeds ``threshold``.

    The background colour of each image is the median of its outermost ring of pixels, which `render_squares` keeps
    free of the square.
    """
    pixels = _unit_pixels(images)
    ring = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)
    background = np.median(ring, axis=1)[:, None, None, :]
    return np.abs(pixels - background).max(axis=-1) > threshold


def size_scorer(images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
    """Rule-based: the fraction of the image the square covers (see [`square_mask`][]), in ``[0, 1]``."""
    return square_mask(images).mean(axis=(1, 2))


def texture_scorer(images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
    """Rule-based: mean absolute difference between horizontally and vertically neighbouring values, in ``[0, 1]``."""
    pixels = _unit_pixels(images)
    horizontal = np.abs(np.diff(pixels, axis=2)).mean(axis=(1, 2, 3))
    vertical = np.abs(np.diff(pixels, axis=1)).mean(axis=(1, 2, 3))
    return (horizontal + vertical) / 2


def rightness_scorer(images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
    """Rule-based: the square's horizontal centre (mean column of [`square_mask`][]), ``0`` left to ``1`` right."""
    mask = square_mask(images)
    columns = np.broadcast_to(np.linspace(0, 1, mask.shape[2]), mask.shape)
    counts = mask.sum(axis=(1, 2))
    return np.where(counts > 0, (columns * mask).sum(axis=(1, 2)) / np.maximum(counts, 1), 0.5)


REWARDS: dict[str, Scorer] = {
    "saturation": saturation_scorer,
    "brightness": brightness_scorer,
    "size": size_scorer,
    "texture": texture_scorer,
    "rightness": rightness_scorer,
}
"""The rule-based true rewards of the task, by name (higher is preferred); any other scorer works as well."""


def is_mirror_invariant(scorer: Scorer, num_pictures: int = 64) -> bool:
    """Whether ``scorer`` gives each of ``num_pictures`` pictures of the task the same score as its left-right mirror
    image. Training with ``random_flip`` mirrors both images of a pair, so it keeps a preference only for such a
    reward: it erases `rightness_scorer`'s, for example."""
    rng = np.random.default_rng(0)
    pictures = render_squares(list(rng.choice(list(HUES), num_pictures)), rng)
    scores = np.asarray(scorer([Image.fromarray(p) for p in pictures]), np.float64)
    mirrored = np.asarray(scorer([Image.fromarray(np.ascontiguousarray(p[:, ::-1])) for p in pictures]), np.float64)
    return bool(np.allclose(scores, mirrored, rtol=0, atol=1e-6))


def get_reward(name: str) -> Scorer:
    """The reward called ``name``; a leading ``-`` negates it (``"-size"`` prefers small squares)."""
    sign, base_name = (-1.0, name[1:]) if name.startswith("-") else (1.0, name)
    if base_name not in REWARDS:
        raise ValueError(f"Unknown reward {name!r}; choose one of {sorted(REWARDS)}, optionally prefixed with '-'.")
    scorer = REWARDS[base_name]
    if sign > 0:
        return scorer
    return lambda images, prompts=None: -np.asarray(scorer(images, prompts))


# ----- the base model -----


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _fingerprint(steps: int, batch_size: int, seed: int, framed_fraction: float) -> dict:
    return {
        "task_version": TASK_VERSION,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "framed_fraction": framed_fraction,
    }


def pretrain_base_model(
    path: str, steps: int = 600, batch_size: int = 32, seed: int = 0, framed_fraction: float = 0.0
) -> str:
    """Build a tiny SD pipeline at ``path`` and pre-train it on captioned pictures from `render_squares`.

    The VAE is trained first to reconstruct pictures (``2 * steps // 3`` steps), then the UNet to denoise their latents
    conditioned on the captions (``steps`` steps, 10% of captions dropped for classifier-free guidance). With
    ``framed_fraction`` > 0 that share of the VAE's (never the UNet's) pictures carry the white frame of `add_frame`,
    so the reference-mismatch style survives encoding (without them the frame is lost in latent space and no method
    can learn it). A model already at ``path`` is reused only if it was pre-trained with the same arguments and task
    version (recorded in ``path/.pretrained``); otherwise it is rebuilt. Returns ``path``.
    """
    marker = os.path.join(path, ".pretrained")
    fingerprint = _fingerprint(steps, batch_size, seed, framed_fraction)
    if os.path.isfile(marker) and os.path.isfile(os.path.join(path, "model_index.json")):
        with open(marker) as f:
            recorded = f.read().strip()
        if recorded and json.loads(recorded) == fingerprint:
            return path
        os.remove(marker)  # a model pre-trained otherwise: rebuild it, and never reuse a half-rebuilt one
    build_tiny_stable_diffusion(path, sample_size=SIZE // 2, seed=seed)
    pipeline = StableDiffusionPipeline.from_pretrained(path)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    _pretrain_vae(pipeline, 2 * steps // 3, batch_size, rng, framed_fraction)
    _pretrain_unet(pipeline, steps, batch_size, rng)
    pipeline.save_pretrained(path)
    with open(marker, "w") as f:
        json.dump(fingerprint, f)
    return path


def _pretrain_vae(
    pipeline: StableDiffusionPipeline, steps: int, batch_size: int, rng: np.random.Generator, framed_fraction: float
) -> None:
    """Train the VAE to reconstruct pictures, then set its latent scaling factor to ``1 / std`` of the latents.

    It trains as a plain autoencoder on the posterior's mode (which is what the trainers and the pre-training of the
    UNet encode with), with a tiny KL term, and the error of the colour (each pixel minus its grey level) counts
    `CHROMA_WEIGHT` times more: colour is a small part of the pixel variance, and without that weight a few hundred
    steps learn a grey-scale autoencoder, whose base model then makes no saturated pictures at all.
    """
    vae, names = pipeline.vae, list(HUES)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=4e-3)
    for _ in range(steps):
        images = render_squares(list(rng.choice(names, batch_size)), rng)
        if framed_fraction > 0:
            framed = rng.random(batch_size) < framed_fraction
            images[framed] = add_frame(images[framed])
        pixels = _to_tensor(images)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        chroma_error = F.mse_loss(
            reconstruction - reconstruction.mean(1, keepdim=True), pixels - pixels.mean(1, keepdim=True)
        )
        loss = F.mse_loss(reconstruction, pixels) + CHROMA_WEIGHT * chroma_error + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(_to_tensor(render_squares(list(rng.choice(names, 256)), rng))).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1 / latents.std()))


def _pretrain_unet(pipeline: StableDiffusionPipeline, steps: int, batch_size: int, rng: np.random.Generator) -> None:
    """Train the UNet to predict the noise on latents of captioned pictures (the text encoder stays as built)."""
    vae, unet, names = pipeline.vae, pipeline.unet, list(HUES)
    with torch.no_grad():
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


def text_of_empty_prompt(pipeline: StableDiffusionPipeline) -> torch.Tensor:
    ids = pipeline.tokenizer(
        [""], padding="max_length", max_length=pipeline.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    return pipeline.text_encoder(ids)[0][0]


# ----- preference pairs -----


def self_generated_pairs(
    pipeline: StableDiffusionPipeline,
    num_pairs: int,
    seed: int = 0,
    reward: Scorer = saturation_scorer,
    num_inference_steps: int = 20,
    guidance_scale: float = GUIDANCE_SCALE,
    pairing: str = "split",
) -> Dataset:
    """Pick-a-Pic-style pairs generated by ``pipeline`` on the training captions, labelled by the true ``reward``.

    ``2 * num_pairs`` images are generated, two per pair's caption, and scored by ``reward(images, prompts)``.
    With ``pairing="random"`` the two images of a pair are simply the two generated for it, and the one with the
    higher reward is preferred; with ``pairing="split"`` (the default) the images of each caption are ranked by
    reward and every pair matches, at random, one image of the upper half with one of the lower half, so every pair
    has a clear reward gap. Exact ties get ``label_0 = 0.5`` (which the trainers drop, and count).

    Columns: ``jpg_0``, ``jpg_1``, ``label_0`` (1 where image 0 has the higher reward), ``caption``, ``reward_0``,
    ``reward_1``, ``user_id`` (one of five simulated annotators, 0–4) and ``flipped`` (all ``False``; see
    [`flip_labels`][]).
    """
    if pairing not in ("split", "random"):
        raise ValueError(f"pairing must be 'split' or 'random', got {pairing!r}.")
    rng = np.random.default_rng(seed)
    captions = [caption(colour) for colour in rng.choice(TRAIN_COLOURS, num_pairs)]
    pipeline.set_progress_bar_config(disable=True)
    prompts = [c for c in captions for _ in range(2)]
    seeds = rng.integers(0, 2**31, size=len(prompts)).tolist()
    images = generate_paired(
        pipeline,
        prompts,
        seeds,
        batch_size=64,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )
    scores = np.asarray(reward(images, prompts), dtype=np.float64)
    if scores.shape != (len(images),):
        raise ValueError(f"The reward must return one score per image; got shape {scores.shape} for {len(images)}.")
    if pairing == "split":
        first, second = _split_pairs(np.asarray(prompts), scores, rng)
    else:
        first = np.arange(0, len(images), 2)
        second = first + 1
    return Dataset.from_dict(
        {
            "jpg_0": [encode_png(images[i]) for i in first],
            "jpg_1": [encode_png(images[i]) for i in second],
            "label_0": np.where(scores[first] == scores[second], 0.5, scores[first] > scores[second]).tolist(),
            "caption": [prompts[i] for i in first],
            "reward_0": scores[first].tolist(),
            "reward_1": scores[second].tolist(),
            "user_id": rng.integers(0, 5, num_pairs).tolist(),
            "flipped": [False] * num_pairs,
        }
    )


def _split_pairs(prompts: np.ndarray, scores: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(first, second)`` of pairs matching the upper half of each prompt's images (by score) with its lower
    half at random, the upper image placed first or second at random."""
    upper, lower = [], []
    for prompt in dict.fromkeys(prompts.tolist()):
        ranked = np.flatnonzero(prompts == prompt)[np.argsort(scores[prompts == prompt], kind="stable")]
        half = len(ranked) // 2
        upper.append(rng.permutation(ranked[half:]))
        lower.append(rng.permutation(ranked[:half]))
    upper, lower = np.concatenate(upper), np.concatenate(lower)
    order = rng.permutation(len(upper))
    upper, lower = upper[order], lower[order]
    swap = rng.random(len(upper)) < 0.5
    return np.where(swap, lower, upper), np.where(swap, upper, lower)


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


def mismatched_pairs(
    pipeline: StableDiffusionPipeline, num_pairs: int, seed: int = 0, guidance_scale: float = GUIDANCE_SCALE
) -> Dataset:
    """Pairs whose chosen image has a style the base never makes (a white frame); the rejected one is a base sample."""
    rng = np.random.default_rng(seed)
    colours = list(rng.choice(TRAIN_COLOURS, num_pairs))
    captions = [caption(colour) for colour in colours]
    chosen = add_frame(render_squares(colours, rng))
    pipeline.set_progress_bar_config(disable=True)
    seeds = rng.integers(0, 2**31, size=num_pairs).tolist()
    rejected = generate_paired(
        pipeline, captions, seeds, batch_size=64, num_inference_steps=20, guidance_scale=guidance_scale
    )
    return Dataset.from_dict(
        {
            "chosen": [encode_png(image) for image in chosen],
            "rejected": [encode_png(image) for image in rejected],
            "prompt": captions,
        }
    )


# ----- training on the task -----


def train_on_task(
    method: str,
    base_path: str,
    dataset: Dataset,
    output_dir: str,
    *,
    batch_size: int,
    max_steps: int,
    learning_rate: float,
    seed: int,
    peft_config: LoraConfig | None = None,
    num_logs: int = 10,
    print_logs: bool = True,
    **settings,
) -> tuple[DiffusionPreferenceTrainer, float]:
    """Train ``method`` (a key of `trl_diffusion.METHODS`) from the base model at ``base_path`` on ``dataset`` with
    the task's settings, and save the result (the LoRA adapter with ``peft_config``, else the model) to
    ``output_dir``.

    The task's settings: images of `SIZE` pixels, data loaded in the main process, ``num_logs`` logged steps, no
    checkpoints, trackers or progress bars. ``settings`` are further config fields (``beta``, ``random_flip``...);
    ``print_logs=False`` removes transformers' `PrinterCallback`, for a caller that prints the logs its own way.
    The demo, `benchmarks/efficacy.py` and `benchmarks/guards.py` train through this function.

    Returns:
        ``(trainer, seconds_per_step)``: the trained trainer and the mean wall time of its optimizer steps.
    """
    trainer_class, config_class = METHODS[method]
    config = config_class(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=learning_rate,
        resolution=SIZE,
        logging_steps=max(1, max_steps // num_logs),
        dataloader_num_workers=0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        **settings,
    )
    trainer = trainer_class(model=base_path, args=config, train_dataset=dataset, peft_config=peft_config)
    if not print_logs:
        trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds_per_step = (time.perf_counter() - start) / max_steps
    trainer.save_model()
    return trainer, seconds_per_step
