"""Folders of pairs: chosen/NAME.png and rejected/NAME.png matched by name, captions beside them."""

import logging
import os

import pytest
from helpers.pair_folders import write_pair_folder
from helpers.runs import run_in_process, tiny_args

from trl_diffusion import load_pair_folder
from trl_diffusion.data import PreferenceDataset


def _is_red(pixels) -> bool:
    return bool(pixels[0].mean() > pixels[2].mean())


@pytest.mark.parametrize("captions", ["files", "jsonl"])
def test_a_folder_loads_as_trl_style_pairs(tmp_path, captions):
    folder = write_pair_folder(tmp_path, ["b", "a", "c"], captions=captions)
    dataset = load_pair_folder(folder)
    assert dataset.column_names == ["name", "chosen", "rejected", "prompt"]
    assert dataset["name"] == ["a", "b", "c"] and dataset["prompt"] == ["a pair a", "a pair b", "a pair c"]
    pairs = PreferenceDataset(dataset, resolution=8)
    example = pairs[1]
    assert _is_red(example["chosen_pixel_values"]) and not _is_red(example["rejected_pixel_values"])
    assert example["prompt"] == "a pair b"


def test_an_unmatched_image_is_named_or_left_out_and_counted(tmp_path, caplog):
    folder = write_pair_folder(tmp_path, ["a", "b", "c"])
    os.remove(os.path.join(folder, "rejected", "b.png"))
    with pytest.raises(ValueError, match=r"chosen/b\.png has no rejected image of the same name"):
        load_pair_folder(folder)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion.pair_folders"):
        dataset = load_pair_folder(folder, skip_invalid_rows=True)
    assert dataset["name"] == ["a", "c"]
    assert "Left out 1 pairs" in caplog.text and "1 with an image on one side only" in caplog.text


def test_a_missing_caption_is_named(tmp_path):
    folder = write_pair_folder(tmp_path, ["a", "b"])
    os.remove(os.path.join(folder, "captions", "a.txt"))
    with pytest.raises(ValueError, match=r"captions/a\.txt has no caption of pair 'a'"):
        load_pair_folder(folder)
    assert load_pair_folder(folder, skip_invalid_rows=True)["name"] == ["b"]


def test_an_unreadable_image_is_named(tmp_path):
    folder = write_pair_folder(tmp_path, ["a", "b"])
    with open(os.path.join(folder, "rejected", "b.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ValueError, match=r"rejected/b\.png is not a readable image"):
        load_pair_folder(folder)
    assert load_pair_folder(folder, skip_invalid_rows=True)["name"] == ["a"]


def test_ambiguous_folders_are_errors(tmp_path):
    folder = write_pair_folder(tmp_path / "dup", ["a"])
    with open(os.path.join(folder, "chosen", "a.jpg"), "wb") as f:
        f.write(b"")
    with pytest.raises(ValueError, match=r"Several images share a name .*\['a\.jpg', 'a\.png'\]"):
        load_pair_folder(folder)
    both = write_pair_folder(tmp_path / "both", ["a"])
    write_pair_folder(tmp_path / "both", ["a"], captions="jsonl")
    with pytest.raises(ValueError, match="both captions/ and metadata.jsonl"):
        load_pair_folder(both)
    bad = write_pair_folder(tmp_path / "bad", ["a"], captions="jsonl")
    with open(os.path.join(bad, "metadata.jsonl"), "a") as f:
        f.write('{"file": "b"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 2: expected"):
        load_pair_folder(bad)
    with pytest.raises(ValueError, match="is not a folder of pairs"):
        load_pair_folder(tmp_path)


def test_the_scripts_train_on_a_folder(cache_dir, tmp_path):
    """`trl-diffusion dpo --dataset_name path/to/folder` trains on the pairs of the folder."""
    folder = write_pair_folder(tmp_path / "pairs", [f"pair{i}" for i in range(4)])
    args = tiny_args(tmp_path / "out", "--max_steps", "1", "--per_device_train_batch_size", "2")
    args[args.index("--dataset_name") + 1] = folder
    trainer = run_in_process("dpo", args)
    assert trainer.state.global_step == 1
    assert trainer.train_dataset.source.dataset["name"] == ["pair0", "pair1", "pair2", "pair3"]
