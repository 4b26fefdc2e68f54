"""On-policy preference pairs: sample a model several times per prompt, score the samples, pair the best with the worst.

[`generate_preference_pairs`][] samples ``images_per_prompt`` images for every prompt, each from its own fixed seed,
scores them with any scorer (``scorer(images, prompts) -> scores``, see `trl_diffusion/scorers.py`), forms pairs
and returns a Pick-a-Pic-format dataset: ``jpg_0``, ``jpg_1`` (PNG bytes), ``label_0`` (1 where image 0 scored
higher), ``caption``, plus ``score_0``, ``score_1``, ``seed_0``, ``seed_1`` and ``prompt_index``. Every trainer of
this library reads it as it is.

How pairs are formed from the ``N`` images of a prompt (``pairing``):

- ``"best_worst"`` (default): one pair, the highest-scoring image against the lowest-scoring one. This is the
  best-of-N/worst-of-N recipe of on-policy preference data: the widest reward gap the samples offer, and one pair
  per prompt, so no prompt dominates the data. With ``N = 2`` it is the official Diffusion-DPO code's AI-feedback
  mode (``--choice_model``), which lets a reward model decide which image of each pair wins.
- ``"all"``: every pair ``(a, b)``, ``a < b``, whose gap clears the threshold: up to ``N(N−1)/2`` pairs per prompt,
  more data from the same samples, but correlated pairs.

A pair whose reward gap ``|s_a − s_b|`` is below ``min_reward_gap``, or is zero (a tie has no winner), is dropped:
the count is logged and returned (`PreferencePairs.num_dropped`). Image 0 of a pair is always the one generated
first (the lower seed), so ``label_0`` records which one won and the column is not constant.

Under ``accelerate launch`` every process generates its own contiguous share of the prompts. A prompt's seeds
(``seed + prompt_index · N + j``) and its batch (the images of that prompt only) do not depend on the number of
processes, so N processes produce exactly the pairs of one. [`save_preference_pairs`][] writes each process's share
and the main process combines them (``save_to_disk``, parquet, or ``push_to_hub``).
"""

import itertools
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value
from diffusers import DiffusionPipeline

from .data import encode_png
from .evaluation import generate_paired
from .scorers import Scorer


logger = logging.getLogger(__name__)

PAIRINGS = ("best_worst", "all")
OUTPUT_FORMATS = ("disk", "parquet")
PAIR_FEATURES = Features(
    {
        "jpg_0": Value("binary"),
        "jpg_1": Value("binary"),
        "label_0": Value("float64"),
        "caption": Value("string"),
        "score_0": Value("float64"),
        "score_1": Value("float64"),
        "seed_0": Value("int64"),
        "seed_1": Value("int64"),
        "prompt_index": Value("int64"),
    }
)


def form_pairs(
    scores: Sequence[float], pairing: str = "best_worst", min_reward_gap: float = 0.0
) -> tuple[list[tuple[int, int]], int]:
    """Pairs ``(a, b)``, ``a < b``, of one prompt's images, and the number of candidate pairs dropped.

    A candidate is dropped when its gap ``|s_a − s_b|`` is zero or below ``min_reward_gap``.

    Args:
        scores: one score per image of the prompt.
        pairing: ``"best_worst"`` (one candidate: the first-best and the first-worst image) or ``"all"`` (every
            pair of images).
        min_reward_gap: the smallest gap a kept pair may have.

    Returns:
        ``(pairs, num_dropped)``.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}.")
    scores = np.asarray(scores, dtype=np.float64)
    if pairing == "best_worst":
        candidates = [tuple(sorted((int(np.argmax(scores)), int(np.argmin(scores)))))]
    else:
        candidates = list(itertools.combinations(range(len(scores)), 2))
    kept = [
        (a, b)
        for a, b in candidates
        if abs(scores[a] - scores[b]) > 0 and abs(scores[a] - scores[b]) >= min_reward_gap
    ]
    return kept, len(candidates) - len(kept)


@dataclass
class PreferencePairs:
    """What [`generate_preference_pairs`][] made.

    Attributes:
        dataset: the pairs this process generated (all of them in a single process), Pick-a-Pic columns.
        num_prompts: prompts sampled, over all processes.
        num_images: images generated and scored, over all processes.
        num_candidate_pairs: pairs considered before the gap threshold, over all processes.
        num_dropped: candidate pairs dropped for a gap below ``min_reward_gap`` (or a tie), over all processes.
    """

    dataset: Dataset
    num_prompts: int
    num_images: int
    num_candidate_pairs: int
    num_dropped: int

    @property
    def num_pairs(self) -> int:
        """Pairs kept, over all processes."""
        return self.num_candidate_pairs - self.num_dropped


def _check_scores(scores, num_images: int, prompt_index: int, seeds: list[int]) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape != (num_images,):
        raise ValueError(
            f"The scorer returned {scores.size} scores for the {num_images} images of prompt {prompt_index}; "
            "it must return one float per image."
        )
    for score, seed in zip(scores, seeds, strict=True):
        if not math.isfinite(score):
            raise ValueError(f"The scorer returned {score} for prompt {prompt_index}, seed {seed}.")
    return scores


def _prompt_rows(pipeline, prompt, prompt_index, scorer, seeds, pairing, min_reward_gap, batch_size, kwargs):
    """Generate, score and pair the images of one prompt: ``(rows, num_candidates, num_dropped)``."""
    images = generate_paired(pipeline, [prompt] * len(seeds), seeds, batch_size=batch_size, **kwargs)
    scores = _check_scores(scorer(images, [prompt] * len(images)), len(images), prompt_index, seeds)
    pairs, dropped = form_pairs(scores, pairing, min_reward_gap)
    rows = [
        {
            "jpg_0": encode_png(images[a]),
            "jpg_1": encode_png(images[b]),
            "label_0": float(scores[a] > scores[b]),
            "caption": prompt,
            "score_0": float(scores[a]),
            "score_1": float(scores[b]),
            "seed_0": seeds[a],
            "seed_1": seeds[b],
            "prompt_index": prompt_index,
        }
        for a, b in pairs
    ]
    return rows, len(pairs) + dropped, dropped


def _check_arguments(prompts, images_per_prompt: int, min_reward_gap: float, pairing: str) -> None:
    if images_per_prompt < 2:
        raise ValueError(f"images_per_prompt must be at least 2 to form a pair, got {images_per_prompt}.")
    if not min_reward_gap >= 0:
        raise ValueError(f"min_reward_gap must be a non-negative number, got {min_reward_gap}.")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}.")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"Prompt {index} is {type(prompt).__name__} {prompt!r}, not a string.")


def generate_preference_pairs(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    scorer: Scorer,
    images_per_prompt: int = 4,
    min_reward_gap: float = 0.0,
    pairing: str = "best_worst",
    seed: int = 0,
    batch_size: int = 8,
    **generation_kwargs: Any,
) -> PreferencePairs:
    """Sample ``images_per_prompt`` images per prompt with fixed seeds, score them and pair them (module docstring).

    Under ``accelerate launch`` each process takes a contiguous share of ``prompts`` (put the pipeline on the
    process's device first); the returned dataset holds this process's pairs and the counts are totals.

    Args:
        pipeline: the text-to-image pipeline to sample (the policy; load a LoRA into it to sample a tuned model).
        prompts: the prompts, the same list on every process.
        scorer: ``scorer(images, prompts) -> scores``, one float per image, higher is better.
        images_per_prompt: ``N``, the images sampled per prompt (at least 2).
        min_reward_gap: pairs whose score gap is below this are dropped (counted and logged); ties always are.
        pairing: ``"best_worst"`` or ``"all"``.
        seed: image ``j`` of prompt ``i`` is generated from seed ``seed + i · images_per_prompt + j``.
        batch_size: images generated at once (always of one prompt).
        generation_kwargs: passed to the pipeline (``num_inference_steps``, ``guidance_scale``, ``height``...).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    prompts = list(prompts)
    _check_arguments(prompts, images_per_prompt, min_reward_gap, pairing)
    state = PartialState()
    with state.split_between_processes(list(range(len(prompts)))) as local_indices:
        local_indices = list(local_indices)
    pipeline.set_progress_bar_config(disable=True)
    rows, candidates, dropped = [], 0, 0
    for index in local_indices:
        seeds = [seed + index * images_per_prompt + j for j in range(images_per_prompt)]
        prompt_rows, prompt_candidates, prompt_dropped = _prompt_rows(
            pipeline, prompts[index], index, scorer, seeds, pairing, min_reward_gap, batch_size, generation_kwargs
        )
        rows += prompt_rows
        candidates += prompt_candidates
        dropped += prompt_dropped
    counts = np.array([len(local_indices), candidates, dropped])
    if state.num_processes > 1:
        counts = np.sum(gather_object([counts]), axis=0)
    result = PreferencePairs(
        dataset=Dataset.from_list(rows, features=PAIR_FEATURES),
        num_prompts=int(counts[0]),
        num_images=int(counts[0]) * images_per_prompt,
        num_candidate_pairs=int(counts[1]),
        num_dropped=int(counts[2]),
    )
    if state.is_main_process:
        logger.info(
            "Generated %d pairs from %d prompts x %d images; dropped %d of %d candidate pairs with a reward gap "
            "below %g (or tied).",
            result.num_pairs, result.num_prompts, images_per_prompt, result.num_dropped,
            result.num_candidate_pairs, min_reward_gap,
        )  # fmt: skip
    return result


def save_preference_pairs(
    pairs: PreferencePairs,
    output_dir: str,
    output_format: str = "disk",
    push_to_hub: bool = False,
    hub_dataset_id: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> Dataset | None:
    """Write the pairs of every process as one dataset; on the main process return it (elsewhere ``None``).

    Each process writes its share as ``train-{rank}-of-{world}.parquet``. With ``output_format="parquet"`` those
    shards, in ``output_dir``, are the dataset (``load_dataset(output_dir)`` reads them as the ``train`` split).
    With ``"disk"`` the main process combines them in prompt order and writes ``Dataset.save_to_disk(output_dir)``
    (the training scripts take that folder as ``dataset_name``). ``push_to_hub`` also uploads the combined dataset
    to ``hub_dataset_id`` (the ``train`` split).
    """
    from accelerate import PartialState

    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}.")
    if push_to_hub and not hub_dataset_id:
        raise ValueError("push_to_hub needs hub_dataset_id, the Hub dataset repository (e.g. `me/my-pairs`).")
    state = PartialState()
    shard_dir = output_dir if output_format == "parquet" else f"{output_dir.rstrip(os.sep)}.shards"
    os.makedirs(shard_dir, exist_ok=True)
    shard_names = [f"train-{rank:05d}-of-{state.num_processes:05d}.parquet" for rank in range(state.num_processes)]
    pairs.dataset.to_parquet(os.path.join(shard_dir, shard_names[state.process_index]))
    state.wait_for_everyone()
    if not state.is_main_process:
        state.wait_for_everyone()
        return None
    shards = [os.path.join(shard_dir, name) for name in shard_names]
    dataset = Dataset.from_parquet(shards, features=PAIR_FEATURES)
    if output_format == "disk":
        dataset.save_to_disk(output_dir)
        shutil.rmtree(shard_dir)
    if push_to_hub:
        dataset.push_to_hub(hub_dataset_id, private=private, token=token)
    state.wait_for_everyone()
    return dataset
