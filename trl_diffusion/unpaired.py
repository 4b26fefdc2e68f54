"""Unpaired (per-image) feedback: rows of (prompt, image, desirable), as Diffusion-KTO trains on.

The schema follows TRL's unpaired preference format (`prompt`, `completion`, `label`), with the image in place of the
completion:

- ``prompt``: the caption (a string);
- ``image``: the image (encoded bytes, a PIL image, a ``{"bytes", "path"}`` dict or a file path);
- ``label``: ``True`` where the image is desirable (a like), ``False`` where it is undesirable. ``1`` and ``0`` are
  accepted too.

The column names are options (`DiffusionKTOConfig`: ``prompt_column``, ``image_column``, ``desirable_column``), and
TRL's ``completion`` is accepted in place of ``image``. [`unpair_preference_dataset`][] turns a pairwise dataset
(Pick-a-Pic or TRL style) into such rows, one desirable and one undesirable row per pair, so an unpaired method
trains on the same data as the pairwise ones.
"""

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .data import (
    PICKAPIC_IMAGE_COLUMNS,
    TRL_COLUMNS,
    PreferenceDataset,
    PreparationStats,
)


if TYPE_CHECKING:
    from datasets import Dataset


logger = logging.getLogger(__name__)


def is_pairwise(dataset, image_columns=PICKAPIC_IMAGE_COLUMNS) -> bool:
    """Whether a `datasets.Dataset` holds pairs (the TRL-style or the Pick-a-Pic image columns)."""
    columns = set(dataset.column_names)
    return set(TRL_COLUMNS) <= columns or set(image_columns) <= columns


def unpair_preference_dataset(
    dataset: "Dataset",
    caption_column: str = "caption",
    image_columns: Sequence[str] = PICKAPIC_IMAGE_COLUMNS,
    label_column: str = "label_0",
    skip_invalid_rows: bool = False,
) -> "Dataset":
    """Turn a pairwise `datasets.Dataset` into unpaired rows: each pair gives a desirable and an undesirable row.

    The pairs are read as [`PreferenceDataset`][] reads them (Pick-a-Pic or TRL-style columns, labels checked, ties
    dropped and counted, rows with a bad label or caption raising an error that names them, or skipped and counted
    with ``skip_invalid_rows``). Pair ``i`` becomes rows ``2i`` (its chosen image, ``label=True``) and ``2i + 1``
    (its rejected image, ``label=False``), with columns ``prompt``, ``image``, ``label`` and ``pair_index`` (the
    source row). Images are copied as stored (not decoded), with a batched ``datasets.map``.

    Returns:
        A `datasets.Dataset` in the unpaired schema (see the module docstring).
    """
    pairs = PreferenceDataset(
        dataset,
        resolution=1,
        skip_invalid_rows=skip_invalid_rows,
        caption_column=caption_column,
        image_columns=image_columns,
        label_column=label_column,
    )
    first, second = pairs.image_columns
    caption = pairs.caption_column
    selected = pairs.dataset.select([row for row, _ in pairs.rows])
    selected = selected.add_column("pair_index", [row for row, _ in pairs.rows])
    selected = selected.add_column("_swap", [swap for _, swap in pairs.rows])

    def split(batch: dict[str, list]) -> dict[str, list]:
        output = {"prompt": [], "image": [], "label": [], "pair_index": []}
        for i, swap in enumerate(batch["_swap"]):
            chosen, rejected = (batch[second][i], batch[first][i]) if swap else (batch[first][i], batch[second][i])
            output["prompt"] += [batch[caption][i]] * 2
            output["image"] += [chosen, rejected]
            output["label"] += [True, False]
            output["pair_index"] += [batch["pair_index"][i]] * 2
        return output

    unpaired = selected.map(split, batched=True, remove_columns=selected.column_names, desc="Unpairing preferences")
    logger.info(
        "Unpaired %d preference pairs into %d rows (%d ties and %d invalid rows dropped).",
        len(pairs),
        len(unpaired),
        pairs.stats.num_ties,
        pairs.stats.num_invalid_labels + pairs.stats.num_invalid_captions,
    )
    return unpaired


class UnpairedPreferenceDataset(PreferenceDataset):
    """A `datasets.Dataset` of (prompt, image, desirable) rows, seen as one-image examples for the trainers.

    Each example holds ``pixel_values`` ``(1, 3, H, W)``, ``prompt``, ``row_index``, ``desirable`` and SDXL's size and
    crop metadata; the collator stacks a batch of ``B`` rows into ``(B, 3, H, W)``. Labels and prompts are checked
    here, so a bad row fails before training with its row and column named (or is skipped and counted with
    ``skip_invalid_rows``). Images are decoded lazily, in data-loader workers.

    Args:
        dataset: a `datasets.Dataset` in the unpaired schema (see the module docstring).
        resolution: side of the square training images, as for [`PreferenceDataset`][].
        random_crop: crop each image at a random offset instead of the centre.
        random_flip: flip each image horizontally with probability 1/2.
        skip_invalid_rows: drop rows with a bad label, prompt or image (counted and logged) instead of raising.
        prompt_column: the prompt column.
        image_column: the image column; when it is missing and the dataset has TRL's ``completion`` column, that is
            used.
        desirable_column: the label column (``True``/1 desirable, ``False``/0 undesirable).

    Attributes:
        rows: ``(dataset row, desirable)`` of every usable row.
        stats: what was dropped (see [`PreparationStats`][]); ``num_ties`` counts ties dropped while unpairing.
    """

    def __init__(
        self,
        dataset: "Dataset",
        resolution: int = 512,
        random_crop: bool = False,
        random_flip: bool = False,
        skip_invalid_rows: bool = False,
        prompt_column: str = "prompt",
        image_column: str = "image",
        desirable_column: str = "label",
    ):
        columns = set(dataset.column_names)
        if image_column not in columns and "completion" in columns:
            image_column = "completion"
        missing = [column for column in (prompt_column, image_column, desirable_column) if column not in columns]
        if missing:
            raise ValueError(
                f"The dataset is missing column(s) {missing}. Expected unpaired rows with the columns "
                f"{[prompt_column, image_column, desirable_column]} (prompt, image, desirable: bool), or a pairwise "
                f"dataset to unpair with `unpair_preference_dataset`; found {sorted(columns)}."
            )
        self.dataset = dataset
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.skip_invalid_rows = skip_invalid_rows
        self.confidence_column, self.confidences = None, None
        self.image_columns, self.caption_column = (image_column,), prompt_column
        self.desirable_column = desirable_column
        self._undecode_image_columns()
        self.stats = PreparationStats(num_rows=len(dataset))
        self.rows: list[tuple[int, bool]] = []
        labels, prompts = list(dataset[desirable_column]), list(dataset[prompt_column])
        for row, (label, prompt) in enumerate(zip(labels, prompts, strict=True)):
            if not isinstance(prompt, str):
                self._invalid(row, prompt_column, f"expected a string prompt, got {prompt!r:.80}")
                self.stats.num_invalid_captions += 1
            elif isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1)):
                self.rows.append((row, bool(label)))
            else:
                self._invalid(row, desirable_column, f"expected True/False (or 1/0), got {label!r:.80}")
                self.stats.num_invalid_labels += 1
        if self.stats.num_invalid_labels or self.stats.num_invalid_captions:
            logger.warning(
                "Skipped %d rows with an invalid label and %d with an invalid prompt.",
                self.stats.num_invalid_labels,
                self.stats.num_invalid_captions,
            )
        if not self.rows:
            raise ValueError(f"No usable rows among the {len(dataset)} rows of the dataset.")
        self._desirable_by_row = dict(self.rows)
        self.num_desirable = sum(desirable for _, desirable in self.rows)

    @classmethod
    def from_config(cls, dataset, args) -> "UnpairedPreferenceDataset":
        """Wrap unpaired rows with a config's data options; a pairwise dataset is first unpaired (and logged)."""
        num_ties, image_column = 0, getattr(args, "image_column", "image")
        if is_pairwise(dataset, args.image_columns) and image_column not in dataset.column_names:
            if args.label_column in dataset.column_names:
                num_ties = sum(label == 0.5 for label in dataset[args.label_column])
            dataset = unpair_preference_dataset(
                dataset, args.caption_column, args.image_columns, args.label_column, args.skip_invalid_rows
            )
            logger.warning(
                "A pairwise dataset was given to an unpaired method: each pair became a desirable and an undesirable "
                "row (%d rows).",
                len(dataset),
            )
        wrapped = cls(
            dataset,
            resolution=args.resolution,
            random_crop=args.random_crop,
            random_flip=args.random_flip,
            skip_invalid_rows=args.skip_invalid_rows,
            prompt_column=getattr(args, "prompt_column", "prompt"),
            image_column=image_column,
            desirable_column=getattr(args, "desirable_column", "label"),
        )
        wrapped.stats.num_ties = num_ties
        return wrapped

    def row_fields(self, row: int) -> dict:
        return {"desirable": self._desirable_by_row[row]}

    def load_pair(self, index: int):
        """The dataset record of example ``index`` and its one decoded image, as a list (``None`` when the image is
        unreadable and ``skip_invalid_rows`` is set). Named as [`PreferenceDataset.load_pair`][], which the encoding
        cache calls."""
        row, _ = self.rows[index]
        record = self.dataset[row]
        (column,) = self.image_columns
        try:
            return record, [self.decode_cell(record[column], row, column)]
        except ValueError as error:
            if not self.skip_invalid_rows:
                raise
            logger.warning("Skipping invalid row. %s", error)
            return None

    def __getitem__(self, index: int) -> dict | None:
        loaded = self.load_pair(index)
        if loaded is None:
            return None
        record, images = loaded
        row = self.rows[index][0]
        tensors, original_sizes, crop_top_lefts = self.transform_pair(images)
        return {
            "pixel_values": torch.stack(tensors),
            "prompt": record[self.caption_column],
            "row_index": row,
            "original_sizes": original_sizes,
            "crop_top_lefts": crop_top_lefts,
            **self.row_fields(row),
        }
