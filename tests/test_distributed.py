"""Multi-process training on CPU (gloo): two processes give the weights of one process with the same global batch.

Each test trains the tiny model on the bundled tiny data for 4 steps with plain SGD, once in the test process
(`per_device_train_batch_size 4`) and once under `accelerate launch` with 2 processes (`per_device_train_batch_size 2`),
and compares the saved weights. The noise, timestep and caption dropout of a pair depend only on (seed, step, dataset
row) (see `pair_seed`), and accelerate shards each global batch of the seeded sampler over the processes, so the
two runs see the same pairs with the same noise.

How each engine runs on CPU processes:
- DDP: `accelerate launch --multi_gpu` (torchrun) with `--use_cpu true`, which selects accelerate's MULTI_CPU (gloo).
  (`accelerate launch --cpu --num_processes 2` starts one process unless an MPI hostfile is given.)
- FSDP2: accelerate only builds FSDP on accelerator devices and falls back to DDP on CPU; `tests/helpers/
  cpu_engine_shim.py` restores the FSDP type after accelerate's state is built (torch's `fully_shard` runs on gloo).
- DeepSpeed ZeRO-2/3: runs on DeepSpeed's CPU accelerator with `--ddp_backend gloo` (otherwise accelerate finds no
  backend and counts one process). Skipped when DeepSpeed is not installed (`pip install -e .[deepspeed]`).
"""

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from helpers.runs import STRICT, accelerate_launch, assert_same_weights, run, run_in_process, tiny_args


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e .[deepspeed]); its CPU accelerator runs ZeRO on gloo",
)
CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trl_diffusion", "accelerate_configs"
)
CPU_LAUNCH = ["--num_processes", "2", "--mixed_precision", "no"]


def _encoded_items_by_process(cache: Path, part: str) -> dict[int, int]:
    """Items of a cache part that each process encoded, from the shards' completion markers."""
    counts: dict[int, int] = {}
    for marker in cache.glob(f"*/{part}-*.arrow.done"):
        record = json.loads(marker.read_text())
        counts[record["process"]] = counts.get(record["process"], 0) + record["items"]
    return counts


def _assert_same_caches(one: Path, two: Path) -> None:
    """The caches of two runs hold the same folders (fingerprints) and the same shard files, byte for byte."""
    shards = sorted(path.relative_to(one) for path in one.glob("*/*.arrow"))
    assert shards and shards == sorted(path.relative_to(two) for path in two.glob("*/*.arrow"))
    for shard in shards:
        assert (one / shard).read_bytes() == (two / shard).read_bytes(), shard


def test_ddp_two_processes_through_the_cli_match_one_process(cache_dir, tmp_path):
    """`trl-diffusion dpo --config examples/scripts/sd15_dpo_tiny.yaml` relaunched on 2 processes (LoRA, DDP).

    Both processes encode the cache: each about half the pairs, and the combined cache is the one-process cache.
    """
    one = ["--per_device_train_batch_size", "4", "--encodings_cache_dir", str(tmp_path / "cache-one")]
    run_in_process("dpo", tiny_args(tmp_path / "one", *STRICT, *one))
    cli = [sys.executable, "-m", "trl_diffusion.scripts.cli", "dpo"]
    launcher_flags = ["--num_processes", "2", "--multi_gpu", "--use_cpu", "true"]
    two = ["--per_device_train_batch_size", "2", "--encodings_cache_dir", str(tmp_path / "cache-two")]
    output = run(cli + tiny_args(tmp_path / "two", *STRICT, *two, *launcher_flags), cache_dir)
    assert "Model saved to" in output
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    # Both processes trained (each logs its own progress); the main process alone wrote the model and its card.
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    _assert_same_caches(tmp_path / "cache-one", tmp_path / "cache-two")
    counts = _encoded_items_by_process(tmp_path / "cache-two", "pairs")
    assert sorted(counts) == [0, 1] and abs(counts[0] - counts[1]) <= 8  # about half each (shards of 8 pairs)
    assert _encoded_items_by_process(tmp_path / "cache-one", "pairs").keys() == {0}


@pytest.mark.slow
def test_fsdp2_precomputed_reference_errors_on_every_process_match_one_process(cache_dir, tmp_path):
    """FSDP2 full fine-tuning with `precompute_ref_errors`: every process runs the sharded reference on its shards of
    the pairs (the collective forward in lockstep); the stored errors and the trained weights are those of one
    process, and the released reference is not rebuilt."""
    full = ["--use_peft", "false", "--learning_rate", "0.05", "--precompute_ref_errors", "true"]
    # The reference pass runs per_device_train_batch_size pairs at once: 2 in both runs, so their errors are bit-equal
    one = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    one += ["--encodings_cache_dir", str(tmp_path / "cache-one")]
    run_in_process("dpo", tiny_args(tmp_path / "one", *STRICT, *full, *one))
    launch = ["--config_file", os.path.join(CONFIGS, "fsdp2.yaml"), *CPU_LAUNCH]
    two = ["--per_device_train_batch_size", "2", "--encodings_cache_dir", str(tmp_path / "cache-two")]
    output = accelerate_launch(
        launch, "dpo", tiny_args(tmp_path / "two", *STRICT, *full, *two, "--use_cpu", "true"), cache_dir
    )
    assert output.count("[engine-probe] prepare_fsdp(UNet2DConditionModel)") == 1  # the reference
    _assert_same_caches(tmp_path / "cache-one", tmp_path / "cache-two")
    errors = _encoded_items_by_process(tmp_path / "cache-two", "errors")
    assert sorted(errors) == [0, 1] and min(errors.values()) > 0
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_fsdp2_full_finetune_with_a_synced_reference_matches_one_process(cache_dir, tmp_path):
    """FSDP2: policy sharded by accelerate, the frozen reference by TRL's `prepare_fsdp`, refreshed by TR-DPO."""
    sync = ["--use_peft", "false", "--learning_rate", "0.05", "--sync_ref_model", "true"]
    sync += ["--ref_model_sync_steps", "2", "--ref_model_mixup_alpha", "0.5"]
    run_in_process("dpo", tiny_args(tmp_path / "one", *STRICT, *sync, "--per_device_train_batch_size", "4"))
    launch = ["--config_file", os.path.join(CONFIGS, "fsdp2.yaml"), *CPU_LAUNCH]
    args = tiny_args(tmp_path / "two", *STRICT, *sync, "--per_device_train_batch_size", "2", "--use_cpu", "true")
    output = accelerate_launch(launch, "dpo", args, cache_dir)
    assert output.count("[engine-probe] prepare_fsdp(UNet2DConditionModel)") == 1  # the reference
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    # The reference refresh changed the result: without it the weights differ.
    plain = ["--use_peft", "false", "--learning_rate", "0.05", "--per_device_train_batch_size", "4"]
    run_in_process("dpo", tiny_args(tmp_path / "plain", *STRICT, *plain))
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "one", tmp_path / "plain")


def _minority_scores(path) -> dict[tuple[int, int], float]:
    with open(os.path.join(path, "minority_scores.csv")) as f:
        return {
            (int(row["global_step"]), int(row["row_index"])): float(row["minority_score"]) for row in csv.DictReader(f)
        }


@needs_deepspeed
@pytest.mark.slow
def test_zero2_adaptive_dpo_full_finetune_matches_one_process(cache_dir, tmp_path):
    """ZeRO-2: the reference and the EMA annotator prepared by TRL's `prepare_deepspeed` (replicas, stage 0).

    Per-pair minority scores (no batch normalisation, no batch-mean margin) keep the loss independent of how the
    global batch is split, so the weights and every pair's score must match.
    """
    adaptive = ["--use_peft", "false", "--learning_rate", "0.05", "--annotator_ema_decays", "0.5"]
    adaptive += ["--minority_warmup_steps", "1", "--normalize_margins", "false", "--margin_type", "none"]
    adaptive += ["--save_minority_scores", "true"]
    run_in_process(
        "adaptive-dpo", tiny_args(tmp_path / "one", *STRICT, *adaptive, "--per_device_train_batch_size", "4")
    )
    launch = ["--config_file", os.path.join(CONFIGS, "zero2.yaml"), *CPU_LAUNCH]
    args = tiny_args(
        tmp_path / "two", *STRICT, *adaptive, "--per_device_train_batch_size", "2", "--ddp_backend", "gloo"
    )
    output = accelerate_launch(launch, "adaptive-dpo", args, cache_dir)
    assert output.count("[engine-probe] prepare_deepspeed(UNet2DConditionModel) -> DeepSpeedEngine") == 2
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    expected, actual = _minority_scores(tmp_path / "one"), _minority_scores(tmp_path / "two")
    assert expected.keys() == actual.keys()
    assert max(abs(expected[key] - actual[key]) for key in expected) < 1e-5
    assert any(score > 0 for score in expected.values())


@needs_deepspeed
@pytest.mark.slow
def test_zero3_full_finetune_with_a_synced_reference_matches_one_process(cache_dir, tmp_path):
    """ZeRO-3: the reference is partitioned like the policy, and TR-DPO gathers both to refresh it."""
    sync = ["--use_peft", "false", "--learning_rate", "0.05", "--sync_ref_model", "true"]
    sync += ["--ref_model_sync_steps", "2", "--ref_model_mixup_alpha", "0.5"]
    run_in_process("dpo", tiny_args(tmp_path / "one", *STRICT, *sync, "--per_device_train_batch_size", "4"))
    launch = ["--config_file", os.path.join(CONFIGS, "zero3.yaml"), *CPU_LAUNCH]
    args = tiny_args(tmp_path / "two", *STRICT, *sync, "--per_device_train_batch_size", "2", "--ddp_backend", "gloo")
    output = accelerate_launch(launch, "dpo", args, cache_dir)
    assert output.count("[engine-probe] prepare_deepspeed(UNet2DConditionModel) -> DeepSpeedEngine") == 1
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_deepspeed_input_cast_lets_a_bf16_denoiser_take_float32_inputs(tiny_sd):
    """DeepSpeed runs the denoiser in bf16 without autocast; the trainer casts its float32 inputs (unit level: DeepSpeed
    cannot run bf16 on CPU processes, since transformers refuses bf16 without `use_cpu`, which disables DeepSpeed)."""
    import torch
    from diffusers import UNet2DConditionModel

    from trl_diffusion.trainer.distributed import _DeepSpeedFrozenModel, add_deepspeed_input_cast

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").to(torch.bfloat16)
    sample, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 32)
    with pytest.raises(RuntimeError):
        unet(sample, torch.tensor([10]), encoder_hidden_states=hidden)
    frozen = _DeepSpeedFrozenModel(torch.nn.ModuleDict({"module": unet}))  # stands in for a DeepSpeedEngine
    frozen.engine.forward = lambda *args, **kwargs: unet(*args, **kwargs)
    reference_output = frozen(sample, torch.tensor([10]), encoder_hidden_states=hidden).sample
    assert frozen.dtype == torch.bfloat16 and frozen.config is unet.config
    add_deepspeed_input_cast(unet)
    output = unet(sample, torch.tensor([10]), encoder_hidden_states=hidden).sample
    assert output.dtype == torch.bfloat16 and torch.equal(output, reference_output)


def test_sync_ref_model_refreshes_the_reference_and_needs_full_finetuning(tiny_sd, tmp_path):
    import torch
    from helpers.rows import make_pickapic
    from peft import LoraConfig

    from trl_diffusion import DiffusionDPOConfig, DiffusionDPOTrainer

    def config(**overrides):
        return DiffusionDPOConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, resolution=16, learning_rate=1e-3,
            dataloader_num_workers=0, report_to="none", save_strategy="no", sync_ref_model=True,
            ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, **overrides,
        )  # fmt: skip

    trainer = DiffusionDPOTrainer(model=tiny_sd, args=config(), train_dataset=make_pickapic(4))
    initial = {name: p.detach().clone() for name, p in trainer.ref_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    for name, parameter in trainer.ref_model.named_parameters():  # one refresh, at step 2: (initial + policy) / 2
        torch.testing.assert_close(parameter, 0.5 * initial[name] + 0.5 * policy[name].detach())
    with pytest.raises(ValueError, match="full fine-tuning"):
        DiffusionDPOTrainer(
            model=tiny_sd, args=config(), train_dataset=make_pickapic(4), peft_config=LoraConfig(r=4, lora_alpha=4)
        )
