"""The encoding cache's mechanics (`trl_diffusion.encodings`): shards built by several processes and combined, resume
after an interruption, one embedding per distinct caption, sizes."""

import logging
import os

import pytest
import torch
from datasets import Dataset
from diffusers import DiffusionPipeline
from helpers.rows import png_bytes
from peft import LoraConfig

from trl_diffusion import DiffusionDPOConfig, DiffusionDPOTrainer
from trl_diffusion.data import PreferenceDataset
from trl_diffusion.encodings import (
    MANIFEST_NAME,
    CacheOptions,
    EncodedPreferenceDataset,
    Encoders,
    EncodingCacheBuilder,
    ProcessGroup,
    ShardedTable,
    ShardLayout,
    encode_dataset,
)
from trl_diffusion.models import FamilyOptions, get_family
from trl_diffusion.trainer.encoding_cache import encoders_of


def pairs_with_shared_captions(num_pairs: int = 12, num_captions: int = 3) -> Dataset:
    """Pick-a-Pic-shaped rows: several pairs per caption (pair ``i`` has caption ``i % num_captions``)."""
    rows = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
    for i in range(num_pairs):
        rows["jpg_0"].append(png_bytes((200, 40, 40), noise_seed=2 * i))
        rows["jpg_1"].append(png_bytes((40, 40, 200), noise_seed=2 * i + 1))
        rows["label_0"].append(float(i % 2))
        rows["caption"].append(f"caption {i % num_captions}")
    return Dataset.from_dict(rows)


class CountingEncoders:
    """A tiny SD family's encoders, counting the images and prompts they encode."""

    def __init__(self, model: str):
        self.family = get_family(DiffusionPipeline.from_pretrained(model), FamilyOptions(resolution=16))
        self.images = self.prompts = 0

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += len(pixels)
        return self.family.encode_images(pixels).float()

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.prompts += len(prompts)
        return self.family.encode_prompt(prompts)

    def encoders(self) -> Encoders:
        return Encoders(
            self.encode_images, self.encode_prompt, self.family.frozen_modules(), self.family.encoding_key()
        )


@pytest.fixture(scope="module")
def counting(tiny_sd):
    return CountingEncoders(tiny_sd)


@pytest.fixture(scope="module")
def pairs():
    return PreferenceDataset(pairs_with_shared_captions(), resolution=16)


def tables(encoded: EncodedPreferenceDataset):
    return encoded.encodings.data.table, encoded.prompt_embeddings.data.table


def assert_same_cache(first: EncodedPreferenceDataset, second: EncodedPreferenceDataset):
    for one, other in zip(tables(first), tables(second), strict=True):
        assert one.equals(other)  # bit for bit: every latent, embedding and per-pair field


def test_layout_cuts_whole_batches_independently_of_the_process_count():
    layout = ShardLayout.for_items(10, batch_size=4)
    assert layout.num_shards == 3 and [list(b) for b in layout.shard_batches(2)] == [[8, 9]]
    large = ShardLayout.for_items(1_000_000, batch_size=8)
    assert large.shard_size % 8 == 0 and large.shard_size <= 4096
    assert sum(len(large.shard_items(s)) for s in range(large.num_shards)) == 1_000_000


def test_two_processes_shards_combine_into_the_one_process_cache(counting, pairs, tmp_path):
    """Ranks 0 and 1 of 2 (called in turn here; `tests/test_distributed.py` runs them as processes) each encode about
    half the pairs and prompts; the combined cache equals the one-process cache bit for bit."""
    encoders = counting.encoders()
    one = encode_dataset(pairs, encoders, CacheOptions(str(tmp_path / "one"), batch_size=2))
    builder = EncodingCacheBuilder(pairs, encoders, CacheOptions(str(tmp_path / "two"), batch_size=2))
    images = []
    for rank in (0, 1):
        before = counting.images
        builder.write_shards(ProcessGroup(rank, 2))
        images.append(counting.images - before)
    assert not builder.complete
    builder.write_manifest()
    assert builder.complete
    assert_same_cache(builder.load(), one)
    assert images == [12, 12]  # 6 pairs of 2 images each
    assert builder.pairs.items_by_process() == {0: 6, 1: 6}
    assert sum(builder.prompt_table.items_by_process().values()) == 3


def test_interrupted_build_resumes_from_complete_shards_and_redoes_partial_ones(counting, pairs, tmp_path):
    encoders = counting.encoders()
    options = CacheOptions(str(tmp_path / "cache"), batch_size=2)
    encode_dataset(pairs, encoders, options)
    reference = encode_dataset(pairs, encoders, CacheOptions(str(tmp_path / "reference"), batch_size=2))
    builder = EncodingCacheBuilder(pairs, encoders, options)
    # An interruption: no manifest, shard 1 written but never marked (truncated), a temporary file left behind.
    os.remove(os.path.join(builder.folder, MANIFEST_NAME))
    shard = builder.pairs.shard_path(1)
    os.remove(shard + ".done")
    os.remove(shard)
    with open(shard, "wb") as f:
        f.write(b"half a shard")
    with open(shard + ".tmp-0-1234", "wb") as f:
        f.write(b"partial")
    with pytest.raises(RuntimeError, match="missing"):
        builder.write_manifest()  # a cache with a partial shard is never declared complete
    before_images, before_prompts = counting.images, counting.prompts
    resumed = encode_dataset(pairs, encoders, options)
    # Only the 2 pairs of shard 1 were encoded again (4 images), after the size estimate's one pair and prompt.
    assert counting.images - before_images == 2 + 4
    assert counting.prompts - before_prompts == 1
    assert_same_cache(resumed, reference)
    assert not any(".tmp-" in name for name in os.listdir(builder.folder))


def test_one_embedding_per_distinct_caption(counting, pairs, tmp_path, caplog):
    encoders = counting.encoders()
    with caplog.at_level(logging.INFO, logger="trl_diffusion.encodings"):
        deduplicated = encode_dataset(pairs, encoders, CacheOptions(str(tmp_path / "dedup"), batch_size=4))
    assert len(deduplicated) == 12 and len(deduplicated.prompt_embeddings) == 3
    per_pair = encode_dataset(
        pairs, encoders, CacheOptions(str(tmp_path / "per-pair"), batch_size=4, deduplicate_prompts=False)
    )
    assert len(per_pair.prompt_embeddings) == 12
    for first, second in zip(deduplicated.__getitems__(range(12)), per_pair.__getitems__(range(12)), strict=True):
        assert first["prompt"] == second["prompt"]
        torch.testing.assert_close(first["prompt_embeds"], second["prompt_embeds"], rtol=0, atol=0)
        assert torch.equal(first["latents"], second["latents"])
    # Each caption's embedding is the family's encoding of that caption.
    expected = counting.family.encode_prompt(["caption 1"])["encoder_hidden_states"][0]
    torch.testing.assert_close(deduplicated[4]["prompt_embeds"]["encoder_hidden_states"], expected)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "3 distinct prompts" in messages and "estimated size" in messages and "size on disk" in messages
    sizes = [EncodingCacheBuilder(pairs, encoders, encoded_options).size() for encoded_options in (
        CacheOptions(str(tmp_path / "dedup"), batch_size=4),
        CacheOptions(str(tmp_path / "per-pair"), batch_size=4, deduplicate_prompts=False),
    )]  # fmt: skip
    assert sizes[0].latents == sizes[1].latents and sizes[1].embeddings > 3 * sizes[0].embeddings


def test_training_from_the_deduplicated_cache_gives_the_per_pair_cache_losses(tiny_sd, tmp_path):
    """Bit-identical losses: one embedding per caption changes the storage, not a single value the step reads."""
    losses = []
    for deduplicate in (True, False):
        args = DiffusionDPOConfig(
            output_dir=str(tmp_path / str(deduplicate)), encodings_cache_dir=str(tmp_path / f"cache-{deduplicate}"),
            per_device_train_batch_size=3, max_steps=3, resolution=16, learning_rate=1e-2, optim="sgd",
            lr_scheduler_type="constant", proportion_empty_prompts=0.3, dataloader_num_workers=0, report_to="none",
            save_strategy="no", logging_steps=1, seed=0, bf16=False,
        )  # fmt: skip
        trainer = DiffusionDPOTrainer(
            model=tiny_sd,
            args=args,
            train_dataset=pairs_with_shared_captions(),
            peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
        )
        if not deduplicate:  # the old layout: one embedding per pair
            options = CacheOptions(str(tmp_path / "per-pair"), batch_size=3, deduplicate_prompts=False)
            trainer.train_dataset = encode_dataset(trainer.train_dataset.source, encoders_of(trainer), options)
        assert len(trainer.train_dataset.prompt_embeddings) == (3 if deduplicate else 12)
        trainer.train()
        losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_lockstep_processes_make_as_many_calls_as_the_busiest(tmp_path):
    """A sharded reference's forward is collective: with 3 shards over 2 processes, rank 1 (one shard) repeats a batch
    so that it calls as often as rank 0 (two shards), and the repeat is not stored."""
    layout = ShardLayout.for_items(6, batch_size=2)  # 3 shards of one batch
    calls = {0: [], 1: []}

    def encoder(rank):
        def encode(batches):
            for batch in batches:
                calls[rank].append(list(batch))
                yield {"value": [float(i) for i in batch]}

        return encode

    table = ShardedTable(str(tmp_path), "errors", layout)
    for rank in (1, 0):  # rank 1 first: it sees all 3 shards pending, as both ranks do when running at once
        assert table.write(encoder(rank), ProcessGroup(rank, 2), lockstep=True) == (4 if rank == 0 else 2)
    assert calls == {0: [[0, 1], [4, 5]], 1: [[2, 3], [0, 1]]}
    assert list(table.load()["value"]) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert table.items_by_process() == {0: 4, 1: 2}
