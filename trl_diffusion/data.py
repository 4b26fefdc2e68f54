"""Preference-data preparation: schema checks, pair ordering, ties, decoding, paired transforms and collation.

Two input schemas map to one internal form:

- Pick-a-Pic v2: ``jpg_0``, ``jpg_1`` (encoded image bytes, PIL images, ``{"bytes", "path"}`` dicts or file paths),
  ``label_0`` (1: image 0 preferred, 0: image 1 preferred, 0.5: tie) and ``caption``;
- TRL style: ``chosen``, ``rejected`` and ``prompt``.

Labels and captions are checked when the dataset is wrapped, so a bad one fails before training starts. Images are
decoded lazily, in data-loader workers, and a bad one fails at the first batch that meets it. Every error names the
row and the column. With ``skip_invalid_rows`` the bad row is dropped instead, and the count is logged.
"""

import io
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .image_urls import ImageURLOptions, UnreachableImageError, fetch_url, is_url


if TYPE_CHECKING:
    from datasets import Dataset


logger = logging.getLogger(__name__)

PICKAPIC_IMAGE_COLUMNS = ("jpg_0", "jpg_1")
TRL_COLUMNS = ("chosen", "rejected", "prompt")


@dataclass
class PreparationStats:
    """What preparation dropped, so nothing is lost silently."""

    num_rows: int = 0
    num_ties: int = 0
    num_invalid_labels: int = 0
    num_invalid_captions: int = 0

    @property
    def num_pairs(self) -> int:
        return self.num_rows - self.num_ties - self.num_invalid_labels - self.num_invalid_captions

    def explain_empty(self) -> str:
        """The error for a dataset left without pairs: what dropped each row, and what to change."""
        if self.num_rows == 0:
            return "The dataset is empty: it has no rows to train on."
        reasons = []
        if self.num_ties:
            reasons.append(
                f"{self.num_ties} were ties (label 0.5) dropped by drop_ties: a pairwise loss needs a preferred image, "
                "so give those pairs a 1 or a 0, or add pairs that have one"
            )
        if self.num_invalid_labels:
            reasons.append(
                f"{self.num_invalid_labels} had an invalid label or confidence, skipped by skip_invalid_rows "
                "(the warnings above name each row and column): fix the label column (1, 0 or 0.5)"
            )
        if self.num_invalid_captions:
            reasons.append(
                f"{self.num_invalid_captions} had a caption that is not a string, skipped by skip_invalid_rows: "
                "fix the caption column (or point caption_column at the right one)"
            )
        return f"No usable preference pairs among the {self.num_rows} rows of the dataset: " + "; ".join(reasons) + "."


def _column_values(dataset, column: str) -> list:
    return list(dataset[column])


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """Encode an image (PIL, or a ``(H, W, 3)`` uint8 array) as RGB PNG bytes: a cell that `load_image` reads back.

    Useful to build Pick-a-Pic-style datasets (``jpg_0``/``jpg_1`` columns) offline.
    """
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def load_image(value, row: int, column: str, url_options: ImageURLOptions | None = None) -> Image.Image:
    """Decode one image cell into an RGB PIL image, or raise a `ValueError` naming the row and column.

    A cell holding an http(s) URL is fetched first (see `trl_diffusion.image_urls`); one that stays unreachable
    raises an `UnreachableImageError`.
    """
    if is_url(value):
        value = fetch_url(value, url_options or ImageURLOptions(), row, column)
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        else:
            raise TypeError(
                f"expected image bytes, a PIL image, a path or a {{'bytes', 'path'}} dict, got {value!r:.80}"
            )
        return image.convert("RGB")
    except Exception as error:
        raise ValueError(f"Row {row}, column {column!r}: unreadable image ({error}).") from error


def paired_transform(
    images: Sequence[Image.Image],
    resolution: int,
    random_crop: bool = False,
    random_flip: bool = False,
    rng: random.Random | None = None,
    flip: bool | None = None,
) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[tuple[int, int]]]:
    """Resize, crop and flip the images of one pair the same way; return tensors in ``[-1, 1]`` and SDXL metadata.

    Each image's shorter side is resized to ``resolution``; then all images are flipped together (or not) and cropped
    to a ``resolution`` square at the same relative offset (the centre, or one random offset for the pair). Returns
    the ``(3, resolution, resolution)`` tensors, each image's original ``(height, width)`` and each crop's top-left
    ``(top, left)`` in the resized image, as SDXL's micro-conditioning records them. ``flip`` forces the flip decision
    (the encoding cache stores both flips of a pair); by default it is drawn when ``random_flip`` is set.
    """
    rng = rng or random
    if flip is None:
        flip = random_flip and rng.random() < 0.5
    offset_y, offset_x = (rng.random(), rng.random()) if random_crop else (0.5, 0.5)
    tensors, original_sizes, crop_top_lefts = [], [], []
    for image in images:
        original_sizes.append((image.height, image.width))
        scale = resolution / min(image.height, image.width)
        height = max(resolution, round(image.height * scale))
        width = max(resolution, round(image.width * scale))
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top = round(offset_y * (height - resolution))
        left = round(offset_x * (width - resolution))
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        tensors.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
        crop_top_lefts.append((top, left))
    return tensors, original_sizes, crop_top_lefts


class PreferenceDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` of image pairs, seen as ordered ``(chosen, rejected, prompt)`` examples.

    Args:
        dataset: a `datasets.Dataset` in the Pick-a-Pic or the TRL-style schema (see the module docstring).
        resolution: side of the square training images.
        random_crop: crop the pair at one random offset instead of the centre.
        random_flip: flip the pair horizontally with probability 1/2.
        drop_ties: drop pairs labelled 0.5 (counted and logged). Ties cannot be kept: a pairwise loss needs a winner.
        skip_invalid_rows: drop rows with a bad label, caption or image (counted and logged) instead of raising.
        caption_column: prompt column of the Pick-a-Pic schema.
        image_columns: the two image columns of the Pick-a-Pic schema.
        label_column: label column of the Pick-a-Pic schema (1: the first image is preferred, 0: the second, 0.5: a
            tie).
        confidence_column: optional column of per-pair prior confidence in ``[0, 1]``.
        url_options: how image cells holding http(s) URLs are fetched (see `trl_diffusion.image_urls`).
    """

    url_options: ImageURLOptions = ImageURLOptions()

    def __init__(
        self,
        dataset: "Dataset",
        resolution: int = 512,
        random_crop: bool = False,
        random_flip: bool = False,
        drop_ties: bool = True,
        skip_invalid_rows: bool = False,
        caption_column: str = "caption",
        image_columns: Sequence[str] = PICKAPIC_IMAGE_COLUMNS,
        label_column: str = "label_0",
        confidence_column: str | None = None,
        url_options: ImageURLOptions | None = None,
    ):
        self._set_options(resolution, random_crop, random_flip, drop_ties, skip_invalid_rows, url_options)
        self._set_columns(set(dataset.column_names), caption_column, image_columns, label_column, confidence_column)
        self.dataset = dataset
        self._undecode_image_columns()
        self.stats = PreparationStats(num_rows=len(dataset))
        labels = _column_values(dataset, self.label_column) if self.label_column else [1] * len(dataset)
        captions = _column_values(dataset, self.caption_column)
        confidences = _column_values(dataset, confidence_column) if confidence_column else None
        self.rows: list[tuple[int, bool]] = []
        for row, (label, caption) in enumerate(zip(labels, captions, strict=True)):
            swap = self.check_row(row, label, caption, confidences[row] if confidences is not None else None)
            if swap is not None:
                self.rows.append((row, swap))
        self.confidences = confidences
        self.log_dropped(self.stats)
        if not self.rows:
            raise ValueError(self.stats.explain_empty())

    @classmethod
    def from_config(cls, dataset, args) -> "PreferenceDataset":
        """Wrap a `datasets.Dataset` with the data options of a trainer config (`DiffusionPreferenceConfig`)."""
        return cls(dataset, **cls.config_options(args))

    @staticmethod
    def config_options(args) -> dict:
        """The keyword arguments of [`PreferenceDataset`][] that a trainer config (`DiffusionPreferenceConfig`)
        sets."""
        return {
            "resolution": args.resolution,
            "random_crop": args.random_crop,
            "random_flip": args.random_flip,
            "drop_ties": args.drop_ties,
            "skip_invalid_rows": args.skip_invalid_rows,
            "caption_column": args.caption_column,
            "image_columns": args.image_columns,
            "label_column": args.label_column,
            "confidence_column": args.confidence_column,
            "url_options": ImageURLOptions.from_config(args),
        }

    @classmethod
    def for_columns(cls, column_names, **options) -> "PreferenceDataset":
        """A dataset of no rows with these columns: the schema, row checks, decoding and transforms that the rows of
        a stream go through one at a time (see `trl_diffusion.streaming`). ``options`` are those of the class."""
        columns = {
            key: options.pop(key) for key in ("caption_column", "image_columns", "label_column") if key in options
        }
        columns["confidence_column"] = options.pop("confidence_column", None)
        pairs = cls.__new__(cls)
        pairs._set_options(**options)
        pairs._set_columns(set(column_names), **columns)
        pairs.dataset, pairs.rows, pairs.confidences, pairs.stats = None, [], None, PreparationStats()
        return pairs

    def _set_options(
        self,
        resolution: int = 512,
        random_crop: bool = False,
        random_flip: bool = False,
        drop_ties: bool = True,
        skip_invalid_rows: bool = False,
        url_options: ImageURLOptions | None = None,
    ):
        if not drop_ties:
            raise ValueError("drop_ties=False is not supported: a tied pair has no chosen image for a pairwise loss.")
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.skip_invalid_rows = skip_invalid_rows
        if url_options is not None:
            self.url_options = url_options

    def _set_columns(
        self,
        columns: set,
        caption_column: str = "caption",
        image_columns: Sequence[str] = PICKAPIC_IMAGE_COLUMNS,
        label_column: str = "label_0",
        confidence_column: str | None = None,
    ):
        """Pick the schema from the column names (TRL style when ``chosen``, ``rejected`` and ``prompt`` are all
        there) and check that every column it needs is present."""
        self.confidence_column = confidence_column
        if set(TRL_COLUMNS) <= columns:
            self.image_columns, self.caption_column, self.label_column = ("chosen", "rejected"), "prompt", None
        else:
            self.image_columns, self.caption_column = tuple(image_columns), caption_column
            self.label_column = label_column
        if len(self.image_columns) != 2:
            raise ValueError(f"image_columns must name exactly two columns, got {list(self.image_columns)}.")
        required = [*self.image_columns, self.caption_column] + ([self.label_column] if self.label_column else [])
        required += [confidence_column] if confidence_column else []
        missing = [column for column in required if column not in columns]
        if missing:
            raise ValueError(
                f"The dataset is missing column(s) {missing}. Expected the Pick-a-Pic columns "
                f"{[*image_columns, label_column, caption_column]} or the TRL-style columns {list(TRL_COLUMNS)}; "
                f"found {sorted(columns)}."
            )

    def check_row(self, row, label, caption, confidence=None) -> bool | None:
        """Check one row's caption, confidence and label, and count it in ``self.stats`` if it is dropped.

        Returns:
            ``None`` when the row is dropped (a tie, or an invalid row under ``skip_invalid_rows``), else whether its
            images are swapped (``True`` when the second image is the chosen one).

        Raises:
            ValueError: an invalid row, naming ``row`` and the column, unless ``skip_invalid_rows`` is set.
        """
        if not isinstance(caption, str):
            self._invalid(row, self.caption_column, f"expected a string caption, got {caption!r:.80}")
            self.stats.num_invalid_captions += 1
            return None
        if self.confidence_column is not None and not _is_probability(confidence):
            self._invalid(row, self.confidence_column, f"expected a confidence in [0, 1], got {confidence!r:.80}")
            self.stats.num_invalid_labels += 1
            return None
        if self.label_column is None:
            return False
        is_number = isinstance(label, (int, float)) and not isinstance(label, bool)
        if is_number and label == 0.5:
            self.stats.num_ties += 1
            return None
        if is_number and label in (0, 1):
            return label == 0
        self._invalid(row, self.label_column, f"expected a label of 1, 0 or 0.5, got {label!r:.80}")
        self.stats.num_invalid_labels += 1
        return None

    @staticmethod
    def log_dropped(stats: PreparationStats) -> None:
        """Warn about the ties and invalid rows dropped so far (nothing is dropped silently)."""
        if stats.num_ties:
            logger.warning("Dropped %d tied pairs (label 0.5) of %d rows.", stats.num_ties, stats.num_rows)
        if stats.num_invalid_labels or stats.num_invalid_captions:
            logger.warning(
                "Skipped %d rows with an invalid label and %d with an invalid caption.",
                stats.num_invalid_labels,
                stats.num_invalid_captions,
            )

    def row_fields(self, row: int) -> dict:
        """Per-example values besides images and prompt, by the collator's key (here the optional confidence)."""
        return {} if self.confidences is None else {"confidence": float(self.confidences[row])}

    def _undecode_image_columns(self):
        self.dataset = self.undecoded(self.dataset)

    def undecoded(self, dataset):
        """``dataset`` with its `datasets.Image` columns read as bytes, so that decoding errors surface here, with
        their row and column (a `datasets.Dataset` or `datasets.IterableDataset`)."""
        from datasets import Image as ImageFeature

        features = getattr(dataset, "features", None) or {}
        for column in self.image_columns:
            if isinstance(features.get(column), ImageFeature) and features[column].decode:
                dataset = dataset.cast_column(column, ImageFeature(decode=False))
        return dataset

    def _invalid(self, row, column: str, reason: str):
        message = f"Row {row}, column {column!r}: {reason}."
        if not self.skip_invalid_rows:
            raise ValueError(message + " Fix the row or pass skip_invalid_rows=True to skip such rows.")
        logger.warning("Skipping invalid row. %s", message)

    def __len__(self) -> int:
        return len(self.rows)

    def load_pair(self, index: int) -> tuple[dict, list[Image.Image]] | None:
        """The dataset record of pair ``index`` and its decoded ``[chosen, rejected]`` images (``None`` when an image
        is unreadable and ``skip_invalid_rows`` is set)."""
        row, swap = self.rows[index]
        record = self.dataset[row]
        images = self.decode_pair(record, row, swap)
        return None if images is None else (record, images)

    def decode_pair(self, record: dict, row, swap: bool) -> list | None:
        """The decoded ``[chosen, rejected]`` images of a record, or ``None`` when one is unreadable and
        ``skip_invalid_rows`` is set (or it is an unreachable URL and ``url_options.skip_unreachable`` is)."""
        first, second = self.image_columns
        chosen_column, rejected_column = (second, first) if swap else (first, second)
        try:
            images = [self.decode_cell(record[chosen_column], row, chosen_column)]
            images.append(self.decode_cell(record[rejected_column], row, rejected_column))
        except ValueError as error:
            unreachable = isinstance(error, UnreachableImageError) and self.url_options.skip_unreachable
            if not (self.skip_invalid_rows or unreachable):
                raise
            logger.warning("Skipping invalid row. %s", error)
            return None
        return images

    def decode_cell(self, value, row: int, column: str):
        """Decode one image cell (see [`load_image`][]); video datasets decode videos here."""
        return load_image(value, row, column, self.url_options)

    def transform_pair(self, images: list, flip: bool | None = None) -> tuple[list[torch.Tensor], list, list]:
        """The pair's shared crop and flip (see [`paired_transform`][]); ``flip`` forces the flip decision."""
        return paired_transform(images, self.resolution, self.random_crop, self.random_flip, flip=flip)

    def transform_options(self) -> dict:
        """The settings that decide a pair's pixels, for the encoding cache's fingerprint."""
        return {"resolution": self.resolution, "random_crop": self.random_crop}

    @property
    def has_fixed_crops(self) -> bool:
        """Whether a pair's crop is the same every epoch (only then can its encoding be cached)."""
        return not self.random_crop

    def build_example(self, record: dict, row, swap: bool, row_index: int, fields: dict) -> dict | None:
        """The training example of one record: its ordered, transformed images, prompt, ``row_index`` (the row
        that seeds the pair's noise) and ``fields``; ``None`` when an image is unreadable and skipped. ``row``
        names the row in error messages."""
        images = self.decode_pair(record, row, swap)
        if images is None:
            return None
        tensors, original_sizes, crop_top_lefts = self.transform_pair(images)
        return {
            "chosen_pixel_values": tensors[0],
            "rejected_pixel_values": tensors[1],
            "prompt": record[self.caption_column],
            "row_index": row_index,
            "original_sizes": original_sizes,
            "crop_top_lefts": crop_top_lefts,
            **fields,
        }

    def __getitem__(self, index: int) -> dict | None:
        row, swap = self.rows[index]
        return self.build_example(self.dataset[row], row, swap, row, self.row_fields(row))


def _is_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


class DiffusionPreferenceCollator:
    """Stack examples of a [`PreferenceDataset`][] into one batch, chosen images first.

    The batch holds ``pixel_values`` of shape ``(2B, 3, H, W)`` (``[x_w ; x_l]``), ``prompts`` (``B`` strings),
    ``row_index`` (``B``), ``original_sizes`` and ``crop_top_lefts`` (``(2B, 2)``, same order as the pixels),
    ``confidence`` (``B``) where the dataset has one, and ``num_skipped``, the number of unreadable rows dropped
    from this batch under ``skip_invalid_rows``. Examples of a stream also count the rows dropped before them: the
    invalid ones go into ``num_skipped``, the ties into ``num_ties``.

    Examples of an encoding cache (see `trl_diffusion.encodings`) carry encodings instead of pixels: the batch then
    holds ``latents`` (``(2B, C, h, w)``, chosen first), ``latents_flipped`` where both flips are cached,
    ``prompt_embeds`` (the family's ``encode_prompt`` output, ``B`` rows per key) and, with precomputed reference
    errors, ``ref_errors`` (``2B``).

    Examples with ``pixel_values`` of shape ``(k, 3, H, W)`` (a group of ``k`` images sharing one prompt; ``k = 1``
    for the unpaired rows of [`UnpairedPreferenceDataset`][]) are stacked image-major into ``(kB, 3, H, W)``, and an
    example's ``desirable`` flag becomes a ``(B,)`` boolean ``desirable`` tensor.
    """

    def __call__(self, examples: list[dict | None]) -> dict:
        valid = [example for example in examples if example is not None]
        if not valid:
            raise ValueError(
                f"All {len(examples)} pairs of a batch had an unreadable image and were skipped (skip_invalid_rows): "
                "no pair is left to train on. The warnings above name each row and column; fix or remove those rows."
            )
        if "latents" in valid[0]:
            batch = _collate_encodings(valid)
        elif "pixel_values" in valid[0]:
            batch = {"pixel_values": _image_major(torch.stack([e["pixel_values"] for e in valid]))}
        else:
            batch = {"pixel_values": _chosen_then_rejected(valid, "chosen_pixel_values", "rejected_pixel_values")}
        group_size = len(valid[0]["original_sizes"])
        batch |= {
            "prompts": [e["prompt"] for e in valid],
            "row_index": torch.tensor([e["row_index"] for e in valid], dtype=torch.long),
            "original_sizes": torch.tensor([e["original_sizes"][i] for i in range(group_size) for e in valid]),
            "crop_top_lefts": torch.tensor([e["crop_top_lefts"][i] for i in range(group_size) for e in valid]),
            "num_skipped": torch.tensor(len(examples) - len(valid) + sum(e.get("dropped_invalid", 0) for e in valid)),
        }
        if "dropped_ties" in valid[0]:  # a stream's rows dropped before these (see `trl_diffusion.streaming`)
            batch["num_ties"] = torch.tensor(sum(e["dropped_ties"] for e in valid))
        if "confidence" in valid[0]:
            batch["confidence"] = torch.tensor([e["confidence"] for e in valid], dtype=torch.float32)
        if "desirable" in valid[0]:
            batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in valid], dtype=torch.bool)
        return batch


def _image_major(stacked: torch.Tensor) -> torch.Tensor:
    """``(B, k, ...)`` groups of ``k`` images to ``(kB, ...)``: image 0 of every example, then image 1, ..."""
    return torch.cat(list(stacked.unbind(1)))


def _chosen_then_rejected(examples: list[dict], chosen_key: str, rejected_key: str) -> torch.Tensor:
    return torch.stack([e[chosen_key] for e in examples] + [e[rejected_key] for e in examples])


def _collate_encodings(examples: list[dict]) -> dict:
    """The encoding part of a cached batch: group tensors ``(k, ...)`` become ``(kB, ...)``, image-major (for a pair,
    chosen rows first)."""

    def pairs(key: str) -> torch.Tensor:
        return _image_major(torch.stack([e[key] for e in examples]))  # (B, k, ...) -> (kB, ...)

    batch = {
        "latents": pairs("latents"),
        "prompt_embeds": {
            key: torch.stack([e["prompt_embeds"][key] for e in examples]) for key in examples[0]["prompt_embeds"]
        },
    }
    for key in ("latents_flipped", "ref_errors"):
        if key in examples[0]:
            batch[key] = pairs(key)
    return batch
