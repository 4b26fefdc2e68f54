"""Streamed datasets: the same row checks as map-style data, split over processes and workers, training and resuming."""

import logging
import sys

import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from helpers.rows import make_pickapic
from helpers.runs import STRICT, assert_same_weights, run, run_in_process, tiny_args
from helpers.trainers import tiny_config
from peft import LoraConfig

from trl_diffusion import DiffusionDPOConfig, DiffusionDPOTrainer
from trl_diffusion.data import DiffusionPreferenceCollator, PreferenceDataset
from trl_diffusion.streaming import StreamingPreferenceDataset
from trl_diffusion.unpaired import UnpairedPreferenceDataset


def _with_bad_rows(num_rows: int = 8) -> Dataset:
    """Pick-a-Pic rows with ties at rows 1 and 4 and a missing caption at row 6."""
    data = make_pickapic(num_rows).to_dict()
    data["label_0"][1] = data["label_0"][4] = 0.5
    data["caption"][6] = None
    return Dataset.from_dict(data)


def test_a_stream_is_checked_and_counted_as_the_map_style_dataset():
    data = _with_bad_rows()
    mapped = PreferenceDataset(data, resolution=8, skip_invalid_rows=True)
    streamed = list(StreamingPreferenceDataset(data.to_iterable_dataset(), resolution=8, skip_invalid_rows=True))
    assert [e["prompt"] for e in streamed] == [mapped[i]["prompt"] for i in range(len(mapped))]
    for stream_example, i in zip(streamed, range(len(mapped)), strict=True):
        assert torch.equal(stream_example["chosen_pixel_values"], mapped[i]["chosen_pixel_values"])
        assert torch.equal(stream_example["rejected_pixel_values"], mapped[i]["rejected_pixel_values"])
    # Each drop is reported once, with the first pair read after it; the collator puts them in the batch counts
    batch = DiffusionPreferenceCollator()(streamed)
    assert int(batch["num_ties"]) == mapped.stats.num_ties == 2
    assert int(batch["num_skipped"]) == mapped.stats.num_invalid_captions == 1


def test_a_bad_streamed_row_raises_naming_its_position_and_column():
    stream = StreamingPreferenceDataset(_with_bad_rows().to_iterable_dataset(), resolution=8)
    with pytest.raises(ValueError, match=r"Row 6 of the stream, column 'caption': expected a string caption"):
        list(stream)


def test_image_features_confidences_and_trl_columns_stream_as_in_a_table():
    data = make_pickapic(4).cast_column("jpg_0", ImageFeature()).cast_column("jpg_1", ImageFeature())
    data = data.add_column("agreement", [1.0, 0.5, 0.75, 0.25])
    streamed = list(
        StreamingPreferenceDataset(data.to_iterable_dataset(), resolution=8, confidence_column="agreement")
    )
    mapped = PreferenceDataset(data, resolution=8, confidence_column="agreement")
    assert [e["confidence"] for e in streamed] == [mapped[i]["confidence"] for i in range(4)] == [1.0, 0.5, 0.75, 0.25]
    assert all(torch.equal(e["chosen_pixel_values"], mapped[i]["chosen_pixel_values"]) for i, e in enumerate(streamed))
    trl = Dataset.from_dict({"chosen": data["jpg_0"][:1], "rejected": data["jpg_1"][:1], "prompt": ["p"]})
    (example,) = StreamingPreferenceDataset(trl.to_iterable_dataset(), resolution=8)
    assert example["prompt"] == "p" and example["dropped_ties"] == 0


def test_processes_and_workers_read_disjoint_parts_that_cover_the_stream():
    """2 processes x 2 data-loader workers over a 4-shard stream: every pair once, with a unique row index."""
    stream = make_pickapic(16).to_iterable_dataset(num_shards=4)
    prompts, row_indices = [], []
    for process in range(2):
        part = StreamingPreferenceDataset(stream, process_index=process, num_processes=2, resolution=8)
        loader = torch.utils.data.DataLoader(
            part, batch_size=2, num_workers=2, collate_fn=DiffusionPreferenceCollator()
        )
        for batch in loader:
            prompts += batch["prompts"]
            row_indices += batch["row_index"].tolist()
    assert sorted(prompts) == sorted(f"a square number {i}" for i in range(16))
    assert len(set(row_indices)) == 16


def test_a_stream_that_is_not_split_evenly_by_shards_is_split_by_rows():
    stream = make_pickapic(6).to_iterable_dataset(num_shards=1)
    parts = [
        [e["prompt"] for e in StreamingPreferenceDataset(stream, process_index=p, num_processes=2, resolution=8)]
        for p in range(2)
    ]
    assert parts == [[f"a square number {i}" for i in (0, 2, 4)], [f"a square number {i}" for i in (1, 3, 5)]]


def _stream_trainer(tiny_sd, output_dir, stream, **overrides) -> DiffusionDPOTrainer:
    sgd = {"max_steps": 3, "learning_rate": 0.05, "optim": "sgd", "lr_scheduler_type": "constant"}
    return DiffusionDPOTrainer(
        model=tiny_sd,
        args=tiny_config(DiffusionDPOConfig, output_dir, **{**sgd, "dataloader_pin_memory": False, **overrides}),
        train_dataset=stream,
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
    )


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def test_training_on_a_stream_updates_the_adapter_and_logs_the_drops(tiny_sd, tmp_path):
    data = _with_bad_rows()
    trainer = _stream_trainer(tiny_sd, tmp_path, data.to_iterable_dataset(), skip_invalid_rows=True)
    assert isinstance(trainer.train_dataset, StreamingPreferenceDataset)  # uncached: the stream itself
    assert trainer.args.accelerator_config.dispatch_batches is False
    before = _lora(trainer)
    trainer.train()
    after = _lora(trainer)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    logs = [entry for entry in trainer.state.log_history if "data/dropped_ties" in entry]
    # Batches of 2 pairs: rows (0, 2) after the tie at 1; (3, 5) after the tie at 4; (7,) after row 6's caption
    assert [(e["data/dropped_ties"], e["data/skipped_rows"]) for e in logs] == [(1, 0), (2, 0), (2, 1)]


def test_loader_workers_read_their_own_shards_and_their_drops_add_up(tiny_sd, tmp_path):
    """2 workers over a 2-shard stream: worker 0 reads rows 0-3 (a tie at 1), worker 1 rows 4-7 (a tie at 4, a bad
    caption at 6); the 5 pairs take 3 steps (batches alternate between the workers), and the drops sum to the table's."""
    stream = _with_bad_rows().to_iterable_dataset(num_shards=2)
    trainer = _stream_trainer(tiny_sd, tmp_path, stream, skip_invalid_rows=True, dataloader_num_workers=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "data/dropped_ties" in entry]
    assert [(e["data/dropped_ties"], e["data/skipped_rows"]) for e in logs] == [(1, 0), (2, 1), (2, 1)]


def test_streams_of_unpaired_rows_or_videos_are_refused():
    stream = make_pickapic(2).to_iterable_dataset()
    args = DiffusionDPOConfig(output_dir="unused", report_to="none")
    with pytest.raises(NotImplementedError, match="streaming UnpairedPreferenceDataset rows is not supported"):
        StreamingPreferenceDataset.for_trainer(stream, args, UnpairedPreferenceDataset, is_video=False)
    with pytest.raises(NotImplementedError, match="streaming video pairs is not supported"):
        StreamingPreferenceDataset.for_trainer(stream, args, PreferenceDataset, is_video=True)


def test_resuming_a_stream_replays_it_to_the_uninterrupted_weights(tiny_sd, tmp_path):
    """A run resumed from checkpoint-2 of a 4-step run on a stream ends with the 4-step run's weights (plain SGD)."""
    stream = make_pickapic(8).to_iterable_dataset()
    checkpoints = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4}
    uninterrupted = _stream_trainer(tiny_sd, tmp_path / "full", stream, **checkpoints)
    uninterrupted.train()
    resumed = _stream_trainer(tiny_sd, tmp_path / "resumed", stream, **checkpoints)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    expected, actual = _lora(uninterrupted), _lora(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)
    # Without the replay, steps 3-4 would train on the first four pairs again and end elsewhere
    restarted = _stream_trainer(tiny_sd, tmp_path / "restarted", stream, **checkpoints, ignore_data_skip=True)
    restarted.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert any(not torch.equal(_lora(restarted)[name], expected[name]) for name in expected)


def test_options_that_need_the_whole_dataset_are_refused_for_a_stream(tiny_sd, tmp_path):
    stream = make_pickapic(4).to_iterable_dataset()
    with pytest.raises(ValueError, match="encoding cache, which does not apply to a streamed dataset"):
        _stream_trainer(tiny_sd, tmp_path, stream, precompute_encodings=True)
    with pytest.raises(ValueError, match="dispatch_batches and split_batches must be unset"):
        _stream_trainer(tiny_sd, tmp_path, stream, accelerator_config={"dispatch_batches": True})
    with pytest.raises(ValueError, match="eval_dataset is a streamed dataset"):
        DiffusionDPOTrainer(
            model=tiny_sd,
            args=DiffusionDPOConfig(output_dir=str(tmp_path), max_steps=1, resolution=16, report_to="none"),
            train_dataset=make_pickapic(4),
            eval_dataset=stream,
            peft_config=LoraConfig(r=4, lora_alpha=8),
        )


def test_the_uncached_path_is_said_once(tiny_sd, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trl_diffusion.streaming"):
        _stream_trainer(tiny_sd, tmp_path, make_pickapic(4).to_iterable_dataset())
    assert "encoded on the fly" in caplog.text


@pytest.mark.slow
def test_two_processes_on_a_stream_match_one_process(cache_dir, tmp_path):
    """`trl-diffusion dpo --dataset_streaming true` on 2 CPU processes (DDP, gloo) against 1 process, same global batch.

    The bundled data is one parquet shard, so each process keeps every other row: process 0 rows 0, 2, 4..., process
    1 rows 1, 3, 5... With no loader workers a row's index is its position in the stream, so both runs give the same
    pairs the same noise, and each global batch of 4 is the same 4 rows.
    """
    stream = [*STRICT, "--dataset_streaming", "true", "--dataloader_num_workers", "0"]
    run_in_process("dpo", tiny_args(tmp_path / "one", *stream, "--per_device_train_batch_size", "4"))
    cli = [sys.executable, "-m", "trl_diffusion.scripts.cli", "dpo"]
    launcher = ["--num_processes", "2", "--multi_gpu", "--use_cpu", "true"]
    output = run(
        cli + tiny_args(tmp_path / "two", *stream, "--per_device_train_batch_size", "2", *launcher), cache_dir
    )
    assert "Model saved to" in output
    assert_same_weights(tmp_path / "one", tmp_path / "two")
