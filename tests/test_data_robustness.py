"""Bad input to the data path (`trl_diffusion/data.py`): every cell either decodes into a correct pair or raises a
`ValueError` that names its row and column; filtering that leaves nothing explains itself.

A property-based fuzz test (hypothesis) throws random bytes, random types, wrong shapes and odd image modes at every
column; the fixed cases below pin what a user meets in practice (truncated JPEGs, CMYK, 16-bit PNGs, bombs...).
"""

import io
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers.rows import make_pickapic
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from trl_diffusion.data import DiffusionPreferenceCollator, PreferenceDataset, load_image, paired_transform


RESOLUTION = 8
ROW_AND_COLUMN = re.compile(r"Row \d+, column '(jpg_0|jpg_1|label_0|caption)'")
SUMMARIES = ("No usable preference pairs among", "The dataset is empty", "pairs of a batch had an unreadable image")
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr")


def encoded(mode: str, size: tuple[int, int], seed: int = 0, image_format: str | None = None) -> bytes:
    """An image of ``mode`` with seeded content, encoded as PNG (or JPEG/TIFF where PNG cannot hold the mode)."""
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = (
        Image.fromarray(array).convert(mode)
        if mode not in ("I;16",)
        else Image.fromarray(array[..., 0]).convert("I;16")
    )
    image_format = image_format or ("JPEG" if mode in ("CMYK", "YCbCr") else "TIFF" if mode in ("F", "I") else "PNG")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@st.composite
def image_cells(draw, kind: str):
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind in ("image", "valid image"):
        mode = draw(st.sampled_from(MODES))
        size = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
        data = encoded(mode, size, seed=draw(st.integers(0, 3)))
        truncate = kind == "image" and draw(st.booleans())
        return data[: draw(st.integers(0, len(data)))] if truncate else data
    if kind == "dict":
        return {
            "bytes": draw(st.one_of(st.none(), st.binary(max_size=32))),
            "path": draw(st.one_of(st.none(), st.text(max_size=8))),
        }
    if kind == "array":  # a wrong shape: nested lists of numbers instead of an encoded image
        shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        return np.zeros(shape, dtype=np.int64).tolist()
    return draw({"int": st.integers(), "float": st.floats(), "text": st.text(max_size=12), "none": st.none()}[kind])


IMAGE_KINDS = ("bytes", "image", "image", "image", "dict", "array", "int", "float", "text", "none")
LABELS = {
    "valid": st.sampled_from([0, 1, 0.5, 0.0, 1.0]),
    "float": st.floats(allow_nan=True, allow_infinity=True),
    "int": st.integers(-3, 3),
    "bool": st.booleans(),
    "text": st.text(max_size=4),
    "none": st.none(),
}
CAPTIONS = {
    "text": st.text(max_size=40),
    "int": st.integers(),
    "none": st.none(),
    "list": st.lists(st.text(max_size=3)),
}


@st.composite
def datasets_of_bad_cells(draw):
    """1-3 rows. One column (or all, or none) is fuzzed; each column holds one kind of value (an Arrow column has one
    type), drawn anew per row. The other columns hold valid values (images in any mode)."""
    num_rows = draw(st.integers(1, 3))
    fuzzed = draw(st.sampled_from(["jpg_0", "jpg_1", "label_0", "caption", "all", "none"]))

    def is_fuzzed(column: str) -> bool:
        return fuzzed in (column, "all")

    columns = {}
    for column in ("jpg_0", "jpg_1"):
        kind = draw(st.sampled_from(IMAGE_KINDS)) if is_fuzzed(column) else "valid image"
        columns[column] = [draw(image_cells(kind)) for _ in range(num_rows)]
    label_kind = draw(st.sampled_from(sorted(LABELS))) if is_fuzzed("label_0") else "valid"
    columns["label_0"] = [draw(LABELS[label_kind]) for _ in range(num_rows)]
    caption_kind = draw(st.sampled_from(sorted(CAPTIONS))) if is_fuzzed("caption") else "text"
    columns["caption"] = [draw(CAPTIONS[caption_kind]) for _ in range(num_rows)]
    return columns


def _expected_pixels(cell) -> torch.Tensor:
    """Independent decoding of the image a pair should hold (what PIL makes of the cell, in RGB)."""
    data = cell["bytes"] if isinstance(cell, dict) else cell
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return paired_transform([image], RESOLUTION)[0][0]


@settings(max_examples=200, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(columns=datasets_of_bad_cells(), skip_invalid_rows=st.booleans())
def test_fuzzed_cells_decode_correctly_or_raise_a_value_error_naming_row_and_column(columns, skip_invalid_rows):
    try:
        dataset = Dataset.from_dict(columns)
    except Exception:  # noqa: BLE001 - a column Arrow cannot hold is no input the trainer can receive
        event("not a datasets.Dataset")
        return
    try:
        prepared = PreferenceDataset(dataset, resolution=RESOLUTION, skip_invalid_rows=skip_invalid_rows)
        examples = [prepared[i] for i in range(len(prepared))]
        batch = DiffusionPreferenceCollator()(examples)
    except ValueError as error:
        message = str(error)
        assert ROW_AND_COLUMN.search(message) or message.startswith(SUMMARIES) or SUMMARIES[2] in message, message
        event("ValueError")
        return
    event("decoded")
    # Decoded: every pair is the right one, chosen first, in [-1, 1].
    pixels = batch["pixel_values"]
    num_pairs = len(batch["row_index"])
    assert pixels.shape == (2 * num_pairs, 3, RESOLUTION, RESOLUTION)
    assert torch.isfinite(pixels).all() and pixels.abs().max() <= 1
    for i, row in enumerate(batch["row_index"].tolist()):
        label = columns["label_0"][row]
        assert label in (0, 1) and not isinstance(label, bool)
        chosen, rejected = ("jpg_0", "jpg_1") if label == 1 else ("jpg_1", "jpg_0")
        torch.testing.assert_close(pixels[i], _expected_pixels(dataset[row][chosen]))
        torch.testing.assert_close(pixels[num_pairs + i], _expected_pixels(dataset[row][rejected]))
        assert batch["prompts"][i] == columns["caption"][row]


# ----- what already worked, pinned -----


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "1", "LA", "F"])
def test_images_in_odd_modes_decode_to_rgb(mode):
    data = make_pickapic(2).to_dict()
    data["jpg_0"][0] = encoded(mode, (12, 10), seed=1)
    example = PreferenceDataset(Dataset.from_dict(data), resolution=RESOLUTION)[0]
    pixels = example["chosen_pixel_values"]
    assert pixels.shape == (3, RESOLUTION, RESOLUTION) and pixels.abs().max() <= 1


def test_a_truncated_jpeg_names_its_row_and_column():
    data = make_pickapic(3).to_dict()
    jpeg = encoded("RGB", (32, 32), image_format="JPEG")
    data["jpg_1"][2] = jpeg[: len(jpeg) // 2]
    prepared = PreferenceDataset(Dataset.from_dict(data), resolution=RESOLUTION)
    with pytest.raises(ValueError, match=r"Row 2, column 'jpg_1': unreadable image \(.*truncated"):
        prepared[2]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (a decompression bomb, without the memory)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_refused_with_row_and_column():
    with pytest.raises(ValueError, match=r"Row 4, column 'jpg_0': unreadable image \(.*decompression bomb"):
        load_image(_png_header_only(40000, 40000), 4, "jpg_0")


def test_an_empty_dataset_says_so():
    with pytest.raises(ValueError, match="The dataset is empty"):
        PreferenceDataset(make_pickapic(0), resolution=RESOLUTION)


def test_a_missing_caption_column_is_named():
    with pytest.raises(ValueError, match=r"missing column\(s\) \['caption'\]"):
        PreferenceDataset(make_pickapic(2).remove_columns("caption"))


def test_a_dataset_of_ties_explains_why_nothing_is_left():
    data = make_pickapic(4).to_dict()
    data["label_0"] = [0.5] * 4
    with pytest.raises(ValueError) as error:
        PreferenceDataset(Dataset.from_dict(data))
    message = str(error.value)
    assert message.startswith("No usable preference pairs among the 4 rows of the dataset: 4 were ties (label 0.5)")
    assert "dropped by drop_ties" in message and "give those pairs a 1 or a 0" in message


def test_rows_dropped_for_several_reasons_are_each_counted():
    data = make_pickapic(4).to_dict()
    data["label_0"] = [0.5, float("nan"), 7, 0.5]
    data["caption"][0] = None  # an invalid caption is found before the label is read
    with pytest.raises(ValueError) as error:
        PreferenceDataset(
            Dataset.from_list([dict(zip(data, row)) for row in zip(*data.values())]), skip_invalid_rows=True
        )
    message = str(error.value)
    assert "1 were ties" in message and "2 had an invalid label" in message and "1 had a caption" in message


def test_all_unreadable_images_in_a_batch_are_explained():
    data = make_pickapic(2).to_dict()
    data["jpg_0"] = [b"junk", b"junk"]
    prepared = PreferenceDataset(Dataset.from_dict(data), resolution=RESOLUTION, skip_invalid_rows=True)
    with pytest.raises(ValueError, match="All 2 pairs of a batch had an unreadable image and were skipped"):
        DiffusionPreferenceCollator()([prepared[0], prepared[1]])


def test_over_long_captions_are_truncated_by_the_tokenizer(tiny_sd, tmp_path):
    from helpers.trainers import make_trainer

    data = make_pickapic(4).to_dict()
    data["caption"] = [" ".join(["a very long caption"] * 500)] * 4
    trainer = make_trainer("dpo", tiny_sd, tmp_path, dataset=Dataset.from_dict(data), max_steps=1)
    trainer.train()
    assert 0 < trainer.state.log_history[0]["loss"] < 10
