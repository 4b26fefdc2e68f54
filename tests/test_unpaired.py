"""Unpaired feedback rows (prompt, image, desirable): unpairing pairs, validation, collation."""

import logging

import pytest
import torch
from datasets import Dataset
from helpers.rows import make_pickapic, png_bytes

from trl_diffusion.data import DiffusionPreferenceCollator
from trl_diffusion.unpaired import UnpairedPreferenceDataset, unpair_preference_dataset


def _is_red(pixels: torch.Tensor) -> bool:
    return pixels[0].mean() > pixels[2].mean()


def test_each_pair_becomes_a_desirable_and_an_undesirable_row_and_ties_are_dropped():
    data = make_pickapic(6).to_dict()
    data["label_0"][3] = 0.5
    pairs = Dataset.from_dict(data)
    unpaired = unpair_preference_dataset(pairs)
    assert sorted(unpaired.column_names) == ["image", "label", "pair_index", "prompt"]
    assert len(unpaired) == 10
    assert unpaired["label"] == [True, False] * 5
    assert unpaired["pair_index"] == [0, 0, 1, 1, 2, 2, 4, 4, 5, 5]
    for i, row in enumerate(unpaired["pair_index"]):
        assert unpaired[i]["prompt"] == f"a square number {row}"
        # the red image is the preferred one, whichever column held it
        chosen_column = "jpg_0" if data["label_0"][row] == 1.0 else "jpg_1"
        rejected_column = "jpg_1" if chosen_column == "jpg_0" else "jpg_0"
        expected = data[chosen_column if unpaired[i]["label"] else rejected_column][row]
        assert unpaired[i]["image"] == expected


def test_trl_style_pairs_unpair_too():
    red, blue = png_bytes((200, 0, 0)), png_bytes((0, 0, 200))
    unpaired = unpair_preference_dataset(Dataset.from_dict({"chosen": [red], "rejected": [blue], "prompt": ["p"]}))
    assert unpaired["image"] == [red, blue] and unpaired["label"] == [True, False]


def test_unpaired_rows_load_as_one_image_examples_and_collate():
    red, blue = png_bytes((200, 0, 0)), png_bytes((0, 0, 200))
    rows = Dataset.from_dict({"prompt": ["a", "b", "c"], "image": [red, blue, red], "label": [1, 0, 1]})
    dataset = UnpairedPreferenceDataset(rows, resolution=8)
    assert len(dataset) == 3 and dataset.num_desirable == 2
    example = dataset[1]
    assert example["pixel_values"].shape == (1, 3, 8, 8) and not _is_red(example["pixel_values"][0])
    assert example["desirable"] is False and example["row_index"] == 1 and example["prompt"] == "b"
    batch = DiffusionPreferenceCollator()([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["original_sizes"].shape == (3, 2) and batch["row_index"].tolist() == [0, 1, 2]


def test_trl_completion_column_is_accepted():
    rows = Dataset.from_dict({"prompt": ["a"], "completion": [png_bytes((200, 0, 0))], "label": [False]})
    dataset = UnpairedPreferenceDataset(rows, resolution=8)
    assert dataset[0]["desirable"] is False and _is_red(dataset[0]["pixel_values"][0])


def test_missing_columns_and_bad_rows_are_named():
    red = png_bytes((200, 0, 0))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\]"):
        UnpairedPreferenceDataset(Dataset.from_dict({"prompt": ["a"], "image": [red]}))
    bad_label = Dataset.from_dict({"prompt": ["a", "b"], "image": [red, red], "label": [1.0, 0.5]})
    with pytest.raises(ValueError, match=r"Row 1, column 'label': expected True/False"):
        UnpairedPreferenceDataset(bad_label)
    bad_prompt = Dataset.from_dict({"prompt": ["a", None], "image": [red, red], "label": [True, False]})
    with pytest.raises(ValueError, match=r"Row 1, column 'prompt'"):
        UnpairedPreferenceDataset(bad_prompt)


def test_bad_rows_are_skipped_and_counted_on_request(caplog):
    red = png_bytes((200, 0, 0))
    rows = Dataset.from_dict(
        {"prompt": ["a", None, "c", "d"], "image": [red, red, b"not an image", red], "label": [1, 0, 1, 2]}
    )
    with caplog.at_level(logging.WARNING, logger="trl_diffusion.unpaired"):
        dataset = UnpairedPreferenceDataset(rows, resolution=8, skip_invalid_rows=True)
    assert [row for row, _ in dataset.rows] == [0, 2]
    assert dataset.stats.num_invalid_labels == 1 and dataset.stats.num_invalid_captions == 1
    assert dataset[1] is None  # the unreadable image is skipped when it is loaded
    batch = DiffusionPreferenceCollator()([dataset[0], dataset[1]])
    assert batch["num_skipped"].item() == 1 and batch["pixel_values"].shape[0] == 1
