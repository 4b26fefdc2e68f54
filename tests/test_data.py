import logging
import random

import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from helpers.rows import make_pickapic, png_bytes
from PIL import Image

from trl_diffusion.data import DiffusionPreferenceCollator, PreferenceDataset, paired_transform


def _is_red(pixels: torch.Tensor) -> bool:
    return pixels[0].mean() > pixels[2].mean()


def test_pairs_are_ordered_chosen_first(pickapic):
    dataset = PreferenceDataset(pickapic, resolution=8)
    assert len(dataset) == len(pickapic)
    for i in range(len(dataset)):
        example = dataset[i]
        assert _is_red(example["chosen_pixel_values"]) and not _is_red(example["rejected_pixel_values"])
        assert example["row_index"] == i and example["prompt"] == f"a square number {i}"


def test_ties_are_dropped_counted_and_logged(caplog):
    data = make_pickapic(6).to_dict()
    data["label_0"][1] = 0.5
    data["label_0"][4] = 0.5
    with caplog.at_level(logging.WARNING, logger="trl_diffusion.data"):
        dataset = PreferenceDataset(Dataset.from_dict(data), resolution=8)
    assert len(dataset) == 4 and dataset.stats.num_ties == 2
    assert [dataset[i]["row_index"] for i in range(4)] == [0, 2, 3, 5]
    assert "Dropped 2 tied pairs" in caplog.text


def test_keeping_ties_is_rejected(pickapic):
    with pytest.raises(ValueError, match="drop_ties=False"):
        PreferenceDataset(pickapic, drop_ties=False)


def test_trl_style_columns():
    red, blue = png_bytes((200, 0, 0)), png_bytes((0, 0, 200))
    dataset = PreferenceDataset(
        Dataset.from_dict({"chosen": [red], "rejected": [blue], "prompt": ["p"]}), resolution=8
    )
    example = dataset[0]
    assert _is_red(example["chosen_pixel_values"]) and example["prompt"] == "p"


def test_pil_and_image_feature_columns():
    data = make_pickapic(2).to_dict()
    pil = Dataset.from_dict({**data, "jpg_0": [Image.open(__import__("io").BytesIO(b)) for b in data["jpg_0"]]})
    assert _is_red(PreferenceDataset(pil, resolution=8)[0]["chosen_pixel_values"])
    featured = make_pickapic(2).cast_column("jpg_0", ImageFeature()).cast_column("jpg_1", ImageFeature())
    assert _is_red(PreferenceDataset(featured, resolution=8)[1]["chosen_pixel_values"])


def test_missing_column_is_named(pickapic):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label_0'\]"):
        PreferenceDataset(pickapic.remove_columns("label_0"))


@pytest.mark.parametrize("bad_label", [2.0, None, float("nan")])
def test_bad_label_names_row_and_column(bad_label):
    data = make_pickapic(4).to_dict()
    data["label_0"] = [1.0, 0.0, bad_label, 1.0]
    with pytest.raises(ValueError, match=r"Row 2, column 'label_0'"):
        PreferenceDataset(Dataset.from_list([dict(zip(data, row)) for row in zip(*data.values())]))


def test_label_of_wrong_type_names_row_and_column():
    data = make_pickapic(2).to_dict()
    data["label_0"] = ["1", "0"]
    with pytest.raises(ValueError, match=r"Row 0, column 'label_0': expected a label of 1, 0 or 0.5, got '1'"):
        PreferenceDataset(Dataset.from_dict(data))


def test_missing_caption_names_row_and_column():
    data = make_pickapic(3).to_dict()
    data["caption"][1] = None
    with pytest.raises(ValueError, match=r"Row 1, column 'caption'"):
        PreferenceDataset(Dataset.from_dict(data))


def test_corrupt_image_fails_at_first_batch_with_row_and_column():
    data = make_pickapic(4).to_dict()
    data["jpg_1"][3] = b"not an image"
    dataset = PreferenceDataset(Dataset.from_dict(data), resolution=8)  # labels are fine: no error yet
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=DiffusionPreferenceCollator())
    batches = iter(loader)
    next(batches)
    with pytest.raises(ValueError, match=r"Row 3, column 'jpg_1': unreadable image"):
        next(batches)


def test_skip_invalid_rows_counts_and_logs(caplog):
    data = make_pickapic(4).to_dict()
    data["jpg_0"][1] = b"broken"
    data["label_0"][2] = 7
    with caplog.at_level(logging.WARNING, logger="trl_diffusion.data"):
        dataset = PreferenceDataset(Dataset.from_dict(data), resolution=8, skip_invalid_rows=True)
        batch = DiffusionPreferenceCollator()([dataset[i] for i in range(len(dataset))])
    assert dataset.stats.num_invalid_labels == 1 and len(dataset) == 3
    assert batch["num_skipped"].item() == 1 and batch["row_index"].tolist() == [0, 3]
    assert "Row 1, column 'jpg_0'" in caplog.text and "Row 2, column 'label_0'" in caplog.text


def test_collator_puts_chosen_first_and_keeps_metadata(pickapic):
    dataset = PreferenceDataset(pickapic, resolution=8)
    batch = DiffusionPreferenceCollator()([dataset[0], dataset[1], dataset[2]])
    assert batch["pixel_values"].shape == (6, 3, 8, 8)
    assert [_is_red(p) for p in batch["pixel_values"]] == [True] * 3 + [False] * 3
    assert batch["original_sizes"].tolist() == [[16, 20]] * 6
    assert batch["prompts"] == ["a square number 0", "a square number 1", "a square number 2"]


def test_pair_gets_the_same_crop_and_flip():
    # A left-to-right gradient: a flip or a different crop would change the column means.
    gradient = Image.fromarray((torch.arange(40).repeat(24, 1)[..., None].repeat(1, 1, 3) * 6).to(torch.uint8).numpy())
    for seed in range(10):
        tensors, sizes, crops = paired_transform(
            [gradient, gradient.copy()], 16, random_crop=True, random_flip=True, rng=random.Random(seed)
        )
        torch.testing.assert_close(tensors[0], tensors[1])
        assert crops[0] == crops[1] and sizes == [(24, 40), (24, 40)]
    flipped = [
        paired_transform([gradient], 16, random_flip=True, rng=random.Random(seed))[0][0][0, 0, 0] > 0
        for seed in range(10)
    ]
    assert any(flipped) and not all(flipped)


def test_resize_crop_records_original_size_and_crop():
    image = Image.new("RGB", (64, 32))
    tensors, sizes, crops = paired_transform([image], 16)
    assert tensors[0].shape == (3, 16, 16)
    assert sizes == [(32, 64)] and crops == [(0, 8)]  # resized to 16x32, centre crop starts at column 8
