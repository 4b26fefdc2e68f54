import csv
import os

import pytest
import torch
from datasets import Dataset
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from helpers.rows import make_pickapic
from helpers.trainers import live_unets, make_trainer, snapshot
from huggingface_hub import ModelCard
from peft import LoraConfig
from transformers import TrainerCallback

from trl_diffusion import (
    AdaptiveDPOConfig,
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    MaPOConfig,
    MaPOTrainer,
)


@pytest.mark.parametrize(
    ("method", "model_fixture"),
    [
        ("dpo", "tiny_sd"),
        ("dpo", "tiny_sd_v"),
        ("mapo", "tiny_sd"),
        ("adaptive", "tiny_sd"),
        ("adaptive", "tiny_sd_v"),
    ],
)
def test_lora_trains_adapters_and_keeps_base_bit_identical(method, model_fixture, request, tmp_path):
    trainer = make_trainer(method, request.getfixturevalue(model_fixture), tmp_path)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    lora_keys = [k for k in before if "lora_" in k and ".default." in k]
    base_keys = [k for k in before if "lora_" not in k]
    assert lora_keys and base_keys
    assert all(torch.equal(before[k], after[k]) for k in base_keys)
    assert any(not torch.equal(before[k], after[k]) for k in lora_keys)
    assert trainer.ref_model is None


def test_full_finetune_trains_denoiser_and_keeps_reference_frozen(tiny_sd, tmp_path):
    trainer = make_trainer("dpo", tiny_sd, tmp_path, peft=False)
    initial = snapshot(trainer.model)
    trainer.train()
    trained = snapshot(trainer.model)
    reference = snapshot(trainer.ref_model)
    assert sum(not torch.equal(initial[k], trained[k]) for k in initial) > len(initial) // 2
    assert all(torch.equal(initial[k], reference[k]) for k in initial)
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_gradient_accumulation_matches_the_larger_batch(tiny_sd, tmp_path):
    """Batch 4 and batch 2 x accumulation 2 make the same SGD updates (uncached path; cached: tests/test_base_trainer.py).

    Plain SGD with a constant learning rate: each update is ``-lr * gradient``, so the weights differ only by the
    summation-order rounding of the two batchings (~1e-7 relative), on any CPU. Adam's first update is ``±lr`` for any
    non-zero gradient entry, so that rounding could flip the sign of near-zero entries (1 in 128 on an AMD EPYC).
    """
    common = {"precompute_encodings": False, "optim": "sgd", "lr_scheduler_type": "constant", "max_steps": 2}
    big = make_trainer("dpo", tiny_sd, tmp_path / "big", per_device_train_batch_size=4, **common)
    initial = _lora_state(big)
    big.train()
    accumulated = make_trainer(
        "dpo", tiny_sd, tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common
    )
    accumulated.train()
    big_state, acc_state = _lora_state(big), _lora_state(accumulated)
    assert big_state.keys() == initial.keys() and initial
    largest = max((big_state[k] - initial[k]).abs().max() for k in initial)
    assert largest > 1e-4  # the two steps moved the adapters
    for key in initial:
        # A wrong accumulation scaling (a sum instead of a mean) would double the updates.
        torch.testing.assert_close(
            acc_state[key] - initial[key], big_state[key] - initial[key], rtol=1e-3, atol=1e-3 * largest
        )
    first = [h["loss"] for h in big.state.log_history if "loss" in h][0]
    first_acc = [h["loss"] for h in accumulated.state.log_history if "loss" in h][0]
    assert first == pytest.approx(first_acc, rel=1e-4)


@pytest.mark.parametrize("method", ["dpo", "mapo", "adaptive"])
def test_saved_lora_loads_into_a_real_pipeline(method, tiny_sd, tmp_path):
    trainer = make_trainer(method, tiny_sd, tmp_path / "out", max_steps=3)
    trainer.train()
    trainer.save_model()
    assert sorted(os.listdir(tmp_path / "out")) == [
        "README.md",
        "pytorch_lora_weights.safetensors",
        "training_config.json",
    ]

    def generate(pipeline):
        generator = torch.Generator().manual_seed(0)
        return pipeline("a square", num_inference_steps=2, generator=generator, output_type="pt").images

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base_images = generate(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "out"))
    assert not torch.allclose(generate(pipeline), base_images)
    # The loaded UNet computes exactly what the trained policy computes.
    sample, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    hidden = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = trainer.model(sample, t, encoder_hidden_states=hidden).sample
        torch.testing.assert_close(pipeline.unet(sample, t, encoder_hidden_states=hidden).sample, expected)


def test_full_finetune_saves_a_diffusers_denoiser(tiny_sd, tmp_path):
    trainer = make_trainer("dpo", tiny_sd, tmp_path / "out", peft=False)
    trainer.train()
    trainer.save_model()
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "out"))
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, trainer.model.state_dict()[key])
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(tmp_path / "out"))


def test_model_card_contents(tiny_sd, tmp_path):
    trainer = make_trainer("dpo", tiny_sd, tmp_path / "out", max_steps=1, beta=1234.0)
    trainer.train()
    trainer.save_model()
    card = ModelCard.load(str(tmp_path / "out" / "README.md"))
    for tag in ("trl", "trl-diffusion", "diffusion-dpo", "lora", "diffusers", "text-to-image"):
        assert tag in card.data.tags
    assert card.data.library_name == "diffusers"
    assert "| beta | 1234.0 |" in card.text and "| lora_rank | 4 |" in card.text
    assert "pipeline.load_lora_weights(" in card.text and "StableDiffusionPipeline" in card.text
    assert "2311.12908" in card.text and "@inproceedings{wallace2024diffusion" in card.text


def _lora_state(trainer):
    return {k: v for k, v in snapshot(trainer.model).items() if "lora_" in k}


@pytest.mark.parametrize("method", ["dpo", "adaptive"])
def test_resume_from_checkpoint_reaches_the_same_weights(method, tiny_sd, tmp_path):
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    full = make_trainer(method, tiny_sd, tmp_path / "full", **common)
    full.train()
    resumed = make_trainer(method, tiny_sd, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    expected, actual = _lora_state(full), _lora_state(resumed)
    assert expected.keys() == actual.keys()
    if method == "adaptive":  # the EMA annotators and their update count come back with the checkpoint
        assert any(".ema_1." in key for key in expected)
        assert resumed.annotator_updates == full.annotator_updates == 4
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-7)
    assert os.path.isfile(tmp_path / "full" / "checkpoint-2" / "pytorch_lora_weights.safetensors")


def test_full_finetune_resume_keeps_the_original_reference(tiny_sd, tmp_path):
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    full = make_trainer("dpo", tiny_sd, tmp_path / "full", peft=False, **common)
    full.train()
    resumed = make_trainer("dpo", tiny_sd, tmp_path / "resumed", peft=False, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    for key, value in resumed.ref_model.state_dict().items():
        assert torch.equal(value, base[key]), key
    for key, value in snapshot(full.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-7)


def test_metrics_use_trl_names_and_timestep_buckets(tiny_sd, tmp_path):
    trainer = make_trainer("dpo", tiny_sd, tmp_path, max_steps=2, logging_steps=2)
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "mse/policy_chosen",
        "mse/ref_rejected",
        "rewards/accuracies/t0-250",
        "rewards/accuracies/t750-1000",
    ):
        assert key in logs or key.startswith("rewards/accuracies/t"), key
    assert sum(key.startswith("rewards/accuracies/t") for key in logs) >= 1
    assert logs["rewards/margins"] == pytest.approx(logs["rewards/chosen"] - logs["rewards/rejected"], rel=1e-4)
    assert logs["data/dropped_ties"] == 0
    metrics = trainer.evaluate(make_pickapic(4))
    assert "eval_loss" in metrics and "eval_rewards/accuracies" in metrics


def test_mapo_never_builds_or_runs_a_reference(tiny_sd, tmp_path):
    for peft in (True, False):
        before = live_unets()
        trainer = make_trainer("mapo", tiny_sd, tmp_path / str(peft), peft=peft, max_steps=3)
        assert len(live_unets() - before) == 1 and trainer.ref_model is None
        calls = []
        trainer.model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        trainer.train()
        assert len(calls) == 3  # one forward per micro-batch, no reference pass
    before = live_unets()
    dpo = make_trainer("dpo", tiny_sd, tmp_path / "dpo", peft=False)
    assert len(live_unets() - before) == 2 and dpo.ref_model is not None  # the policy and its frozen copy
    with pytest.raises(ValueError, match="uses no reference model"):
        MaPOTrainer(model=tiny_sd, ref_model=tiny_sd, args=MaPOConfig(output_dir=str(tmp_path)))


def test_dpo_with_lora_runs_the_network_twice_per_step_without_a_copy(tiny_sd, tmp_path):
    trainer = make_trainer("dpo", tiny_sd, tmp_path, max_steps=1)
    calls = []
    trainer.model.register_forward_hook(lambda *_: calls.append(1))
    trainer.train()
    assert len(calls) == 2 and trainer.ref_model is None
    with pytest.raises(ValueError, match="adapters disabled"):
        DiffusionDPOTrainer(
            model=tiny_sd,
            ref_model=tiny_sd,
            args=DiffusionDPOConfig(output_dir=str(tmp_path)),
            peft_config=LoraConfig(),
        )


def test_caption_dropout_drops_both_halves(tiny_sd, tmp_path):
    # The per-step (uncached) path; the cached path substitutes the empty-prompt encoding (tests/test_encoding_cache.py).
    trainer = make_trainer(
        "dpo", tiny_sd, tmp_path, max_steps=1, proportion_empty_prompts=1.0, precompute_encodings=False
    )
    seen = []
    encode = trainer.family.encode_prompt
    trainer.family.encode_prompt = lambda prompts: seen.append(list(prompts)) or encode(prompts)
    trainer.train()
    assert seen == [["", ""]]


# push_to_hub and the model card's metadata: tests/test_hub.py (the Hub's HTTP endpoints mocked).


def test_adaptive_dpo_gives_flipped_pairs_a_higher_minority_score(tiny_sd, tmp_path):
    """A quarter of the labels are flipped (blue preferred); after a short run those pairs get a higher mean u."""
    data = make_pickapic(32).to_dict()
    flipped = set(range(0, 32, 4))
    for row in flipped:
        data["label_0"][row] = 1.0 - data["label_0"][row]
    trainer = make_trainer(
        "adaptive",
        tiny_sd,
        tmp_path,
        dataset=Dataset.from_dict(data),
        per_device_train_batch_size=8,
        max_steps=48,
        save_minority_scores=True,
        logging_steps=8,
    )
    trainer.train()
    with open(tmp_path / "minority_scores.csv") as f:
        rows = [row for row in csv.DictReader(f) if int(row["global_step"]) >= 40]  # the last two epochs
    assert len(rows) == 64
    flipped_u = [float(row["minority_score"]) for row in rows if int(row["row_index"]) in flipped]
    clean_u = [float(row["minority_score"]) for row in rows if int(row["row_index"]) not in flipped]
    assert sum(flipped_u) / len(flipped_u) > sum(clean_u) / len(clean_u) + 0.1


class _DiffusersEMAAlongside(TrainerCallback):
    """Steps a real diffusers ``EMAModel`` per decay on the policy's trainable parameters after every optimizer step."""

    def __init__(self, parameters, decays):
        self.parameters = list(parameters)
        self.emas = [EMAModel(self.parameters, decay=decay) for decay in decays]

    def on_step_end(self, args, state, control, **kwargs):
        for ema in self.emas:
            ema.step(self.parameters)


def test_adaptive_dpo_lora_annotators_match_diffusers_ema_model(tiny_sd, tmp_path):
    """The annotators are LoRA adapters (no copy of the network) on the authors' schedule: diffusers ``EMAModel``
    with its defaults, stepped alongside on the same parameters, holds the same weights after every step."""
    before = live_unets()
    decays = [0.5, 0.9999]
    # 12 steps: the 0.5 annotator reaches its cap at update 9, the 0.9999 one follows (1 + s)/(10 + s) throughout.
    trainer = make_trainer("adaptive", tiny_sd, tmp_path, max_steps=12, annotator_ema_decays=decays)
    assert len(live_unets() - before) == 1
    assert set(trainer.model.peft_config) == {"default", "ema_0", "ema_1"}
    names = [n for n, p in trainer.model.named_parameters() if ".default." in n and p.requires_grad]
    named = dict(trainer.model.named_parameters())
    reference = _DiffusersEMAAlongside([named[n] for n in names], decays)
    trainer.add_callback(reference)
    trainer.train()
    assert trainer.annotator_updates == 12
    for i, ema in enumerate(reference.emas):
        assert ema.optimization_step == 12
        for name, expected in zip(names, ema.shadow_params, strict=True):
            annotator = named[name.replace(".default.", f".ema_{i}.")]
            torch.testing.assert_close(annotator, expected, rtol=1e-6, atol=1e-8)
            assert not annotator.requires_grad
    # The trailing 0.9999 annotator is neither the policy nor the reference (LoRA's B starts at zero).
    b_name = next(n for n in names if "lora_B" in n)
    slow = named[b_name.replace(".default.", ".ema_1.")]
    assert slow.abs().max() > 0 and not torch.equal(slow, named[b_name])


def test_adaptive_dpo_logs_stability_and_each_annotators_margin_norm(tiny_sd, tmp_path):
    trainer = make_trainer("adaptive", tiny_sd, tmp_path, max_steps=4, logging_steps=4)
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in ("adaptive/stability_mean", "adaptive/confidence_mean", "adaptive/u_mean"):
        assert 0 <= logs[key] <= 1, key
    norms = [logs[f"adaptive/margin_norm/{name}"] for name in ("policy", "ema_0", "ema_1")]
    assert all(norm > 0 for norm in norms), norms


def test_adaptive_dpo_policy_alone_scores_raw_margins_from_the_first_step(tiny_sd, tmp_path):
    """No EMA annotators: as in the authors' code, raw margins (rho = 1e4), no warm-up, no stability term."""
    trainer = make_trainer(
        "adaptive", tiny_sd, tmp_path, max_steps=2, annotator_ema_decays=[], save_minority_scores=True
    )
    assert trainer.args.normalize_margins is False and trainer.args.rho == 1e4
    trainer.train()
    with open(tmp_path / "minority_scores.csv") as f:
        first = [float(row["minority_score"]) for row in csv.DictReader(f) if row["global_step"] == "0"]
    # At step 0 the policy is the reference (LoRA's B starts at zero): l = 0, so u = 1 - sigma(0), not the warm-up's 0.
    assert first == [0.5, 0.5]
    logs = trainer.state.log_history[1]
    assert "adaptive/stability_mean" not in logs and logs["adaptive/margin_norm/policy"] > 0
    with_ema = make_trainer("adaptive", tiny_sd, tmp_path / "ema", max_steps=1)
    assert with_ema.args.normalize_margins is True and with_ema.args.rho == 15.0


def test_adaptive_dpo_full_finetune_keeps_ema_copies(tiny_sd, tmp_path):
    trainer = make_trainer("adaptive", tiny_sd, tmp_path, peft=False, max_steps=3, annotator_ema_decays=[0.5])
    reference = _DiffusersEMAAlongside(trainer.model.parameters(), [0.5])
    trainer.add_callback(reference)
    trainer.train()
    assert trainer.ref_model is not None and len(trainer.ema_annotators) == 1
    annotator = list(trainer.ema_annotators[0].parameters())
    assert len(annotator) == len(reference.emas[0].shadow_params)
    for actual, expected in zip(annotator, reference.emas[0].shadow_params, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-8)


def test_config_booleans_and_lists_parse_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(AdaptiveDPOConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--flip_minority_labels",
            "true",
            "--normalize_margins",
            "false",
            "--annotator_ema_decays",
            "0.9",
            "0.99",
            "--random_flip",
        ]
    )
    assert config.flip_minority_labels is True and config.normalize_margins is False and config.random_flip is True
    assert config.annotator_ema_decays == [0.9, 0.99]
    with pytest.raises(ValueError, match="annotator_ema_decays"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), annotator_ema_decays=[1.5])


def test_dpo_guards_reach_the_loss_the_logs_and_the_model_card(tiny_sd, tmp_path):
    from trl_diffusion.callbacks import CollapseWarningCallback

    trainer = make_trainer("dpo", tiny_sd, tmp_path, sft_weight=10.0, max_margin=1.0, collapse_warning_error_ratio=1.5)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert "guards/sft_loss" in logs[0] and "guards/capped_fraction" in logs[0]
    assert logs[0]["guards/sft_loss"] == pytest.approx(logs[0]["mse/policy_chosen"])
    (warnings,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, CollapseWarningCallback)]
    assert (warnings.accuracy, warnings.error_ratio) == (0.95, 1.5)
    hyperparameters = trainer.model_card_hyperparameters()
    assert hyperparameters["sft_weight"] == 10.0 and hyperparameters["max_margin"] == 1.0
    with pytest.raises(ValueError, match="max_margin must be positive"):
        DiffusionDPOConfig(output_dir=str(tmp_path), max_margin=0.0)
