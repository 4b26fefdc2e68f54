"""Does a tuned model beat its base on what the preferences ask for? Win rates with fixed seeds, and scorers.

A scorer is any callable ``scorer(images, prompts) -> scores``: a list of PIL images and their prompts in, one float
per image out (higher is better). [`evaluate_preference`][] generates images from the base and the tuned model with the
same prompts and seeds, scores both, and reports the win rate of tuned over base (ties count 1/2) and the mean score
difference with a bootstrap confidence interval. [`EvaluationCallback`][trl_diffusion.callbacks.EvaluationCallback]
runs the same check during training. [`evaluate_video_preference`][] does the same for text-to-video pipelines with
per-video scorers.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

# The scorers live in `scorers.py`; these names stay importable from here.
from .scorers import (  # noqa: F401
    CLIPScorer,
    PickScoreScorer,
    Scorer,
    VideoScorer,
    per_frame_scorer,
    redness_scorer,
    saturation_scorer,
    temporal_smoothness_scorer,
    video_redness_scorer,
)


logger = logging.getLogger(__name__)

# ----- statistics -----


def win_rate(tuned_scores: Sequence[float], base_scores: Sequence[float]) -> float:
    """Fraction of pairs where the tuned score beats the base score; a tie counts 1/2."""
    tuned, base = np.asarray(tuned_scores, dtype=np.float64), np.asarray(base_scores, dtype=np.float64)
    if tuned.shape != base.shape or tuned.size == 0:
        raise ValueError(f"Need two equally long, non-empty score lists; got {tuned.shape} and {base.shape}.")
    return float(np.mean((tuned > base) + 0.5 * (tuned == base)))


def bootstrap_mean_ci(
    values: Sequence[float], num_samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (resampling values with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("Cannot bootstrap an empty list of values.")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(num_samples, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


# ----- generation and evaluation -----


@dataclass
class PreferenceEvaluation:
    """The outcome of [`evaluate_preference`][].

    Attributes:
        win_rate: fraction of (prompt, seed) pairs where the tuned image scores higher (ties count 1/2).
        mean_difference: mean of ``tuned − base`` scores.
        ci_low, ci_high: bootstrap confidence interval of ``mean_difference``.
        rows: one dict per (prompt, seed): ``prompt``, ``seed``, ``base_score``, ``tuned_score``.
        base_images, tuned_images: the generated images (clips, for [`evaluate_video_preference`][]), in the order of
            ``rows``.
    """

    win_rate: float
    mean_difference: float
    ci_low: float
    ci_high: float
    rows: list[dict] = field(default_factory=list)
    base_images: list = field(default_factory=list, repr=False)
    tuned_images: list = field(default_factory=list, repr=False)


def generate_paired(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 16,
    **generation_kwargs: Any,
) -> list[Image.Image]:
    """One image per ``(prompts[i], seeds[i])``, each from its own seeded CPU generator, ``batch_size`` at a time."""
    if len(prompts) != len(seeds):
        raise ValueError(f"Need one seed per prompt; got {len(prompts)} prompts and {len(seeds)} seeds.")
    images = []
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start : start + batch_size]]
        output = pipeline(
            prompt=list(prompts[start : start + batch_size]),
            generator=generators,
            output_type="pil",
            **generation_kwargs,
        )
        images.extend(output.images)
    return images


def generate_images(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 16,
    **generation_kwargs: Any,
) -> list[Image.Image]:
    """One image per (prompt, seed), prompts outer and seeds inner: every prompt with every seed."""
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    return generate_paired(pipeline, [p for p, _ in jobs], [s for _, s in jobs], batch_size, **generation_kwargs)


def summarize(base_scores, tuned_scores, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float, float]:
    """``(win_rate, mean_difference, ci_low, ci_high)`` of paired scores."""
    base_scores, tuned_scores = np.asarray(base_scores, np.float64), np.asarray(tuned_scores, np.float64)
    differences = tuned_scores - base_scores
    low, high = bootstrap_mean_ci(differences, confidence=confidence, seed=seed)
    return win_rate(tuned_scores, base_scores), float(differences.mean()), low, high


def evaluate_preference(
    pipeline_or_path: DiffusionPipeline | str,
    prompts: Sequence[str],
    scorer: Scorer,
    lora: str | None = None,
    tuned: DiffusionPipeline | str | None = None,
    num_images_per_prompt: int = 4,
    seeds: Sequence[int] | None = None,
    confidence: float = 0.95,
    batch_size: int = 16,
    **generation_kwargs: Any,
) -> PreferenceEvaluation:
    """Generate from the base and the tuned model with the same prompts and seeds, score both, compare.

    Args:
        pipeline_or_path: the base pipeline, or its folder/Hub id.
        prompts: evaluation prompts (use prompts held out from training).
        scorer: ``scorer(images, prompts) -> scores`` (see the module docstring).
        lora: a LoRA folder/Hub id; the tuned model is the base with it loaded (unloaded again afterwards).
        tuned: instead of ``lora``, any other pipeline (or its folder) to compare with the base.
        num_images_per_prompt: images per prompt when ``seeds`` is not given (seeds ``0 … n−1``).
        seeds: explicit seeds, the same for every prompt and both models.
        confidence: level of the bootstrap interval of the mean score difference.
        batch_size: images generated at once.
        generation_kwargs: passed to the pipelines (``num_inference_steps``, ``guidance_scale``, ``height``...).
    """

    def generate(pipeline, seeds):
        return generate_images(pipeline, prompts, seeds, batch_size, **generation_kwargs)

    seeds = list(seeds) if seeds is not None else list(range(num_images_per_prompt))
    return _compare(pipeline_or_path, list(prompts), scorer, lora, tuned, seeds, confidence, generate)


def _compare(pipeline_or_path, prompts, scorer, lora, tuned, seeds, confidence, generate) -> PreferenceEvaluation:
    """Generate with ``generate(pipeline, seeds)`` from the base and the tuned model, score both, summarise."""
    if (lora is None) == (tuned is None):
        raise ValueError("Pass exactly one of `lora` (an adapter for the base pipeline) or `tuned` (a pipeline).")
    base = (
        DiffusionPipeline.from_pretrained(pipeline_or_path) if isinstance(pipeline_or_path, str) else pipeline_or_path
    )
    base_outputs = generate(base, seeds)
    if lora is not None:
        base.load_lora_weights(lora, adapter_name="evaluated")
        try:
            tuned_outputs = generate(base, seeds)
        finally:
            base.delete_adapters("evaluated")
    else:
        tuned = DiffusionPipeline.from_pretrained(tuned) if isinstance(tuned, str) else tuned
        tuned_outputs = generate(tuned, seeds)
    output_prompts = [prompt for prompt in prompts for _ in seeds]
    base_scores = np.asarray(scorer(base_outputs, output_prompts), dtype=np.float64)
    tuned_scores = np.asarray(scorer(tuned_outputs, output_prompts), dtype=np.float64)
    rate, mean, low, high = summarize(base_scores, tuned_scores, confidence)
    rows = [
        {"prompt": prompt, "seed": seed, "base_score": float(b), "tuned_score": float(t)}
        for (prompt, seed), b, t in zip(
            [(p, s) for p in prompts for s in seeds], base_scores, tuned_scores, strict=True
        )
    ]
    return PreferenceEvaluation(rate, mean, low, high, rows, base_outputs, tuned_outputs)


# ----- video -----


def generate_videos(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 4,
    **generation_kwargs: Any,
) -> list[np.ndarray]:
    """One clip per (prompt, seed), prompts outer and seeds inner, each from its own seeded CPU generator:
    ``(F, H, W, 3)`` uint8 frames (a video pipeline such as ``WanPipeline``, whose output is ``.frames``)."""
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    videos = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(int(seed)) for _, seed in batch]
        prompts_batch = [prompt for prompt, _ in batch]
        output = pipeline(prompt=prompts_batch, generator=generators, output_type="np", **generation_kwargs)
        videos.extend((np.clip(np.asarray(clip), 0, 1) * 255).round().astype(np.uint8) for clip in output.frames)
    return videos


def evaluate_video_preference(
    pipeline_or_path: DiffusionPipeline | str,
    prompts: Sequence[str],
    scorer: VideoScorer,
    lora: str | None = None,
    tuned: DiffusionPipeline | str | None = None,
    num_videos_per_prompt: int = 2,
    seeds: Sequence[int] | None = None,
    confidence: float = 0.95,
    batch_size: int = 4,
    **generation_kwargs: Any,
) -> PreferenceEvaluation:
    """[`evaluate_preference`][] for text-to-video: short clips from the base and the tuned model with the same
    prompts and seeds, scored per video by ``scorer(videos, prompts) -> scores`` (e.g. [`video_redness_scorer`][],
    [`temporal_smoothness_scorer`][], or an image scorer through [`per_frame_scorer`][]).

    The result's ``base_images`` and ``tuned_images`` hold the clips, ``(F, H, W, 3)`` uint8 arrays. Pass the clip
    shape in ``generation_kwargs`` (``num_frames``, ``height``, ``width``, ``num_inference_steps``...).
    """

    def generate(pipeline, seeds):
        return generate_videos(pipeline, prompts, seeds, batch_size, **generation_kwargs)

    seeds = list(seeds) if seeds is not None else list(range(num_videos_per_prompt))
    return _compare(pipeline_or_path, list(prompts), scorer, lora, tuned, seeds, confidence, generate)


def image_grid(rows: Sequence[Sequence[Image.Image]], scale: int = 1) -> Image.Image:
    """Paste equally sized images into a grid, one row per sequence, optionally upscaled (nearest neighbour)."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (c * width, r * height))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid


def __getattr__(name: str):
    # `EvaluationCallback` moved to `trl_diffusion.callbacks` (which imports this module): still importable from here.
    if name == "EvaluationCallback":
        from .callbacks import EvaluationCallback

        return EvaluationCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
