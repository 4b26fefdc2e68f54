import json
import os
import sys

import numpy as np
import pytest
import torch
from helpers.rows import make_pickapic
from helpers.trainers import make_trainer, wan_args
from helpers.videos import make_video_pairs
from peft import LoraConfig
from PIL import Image

from trl_diffusion import METHODS, DiffusionDPOConfig, DiffusionDPOTrainer
from trl_diffusion.evaluation import (
    CLIPScorer,
    EvaluationCallback,
    PickScoreScorer,
    bootstrap_mean_ci,
    evaluate_preference,
    evaluate_video_preference,
    redness_scorer,
    saturation_scorer,
    temporal_smoothness_scorer,
    video_redness_scorer,
    win_rate,
)
from trl_diffusion.testing.synthetic import HELD_OUT_COLOURS, TRAIN_COLOURS, add_frame, frame_scorer, render_squares
from trl_diffusion.testing.tiny_models import build_tiny_clip_tokenizer


def solid(rgb, size=8) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def test_win_rate_counts_ties_as_half():
    assert win_rate([3, 2, 1, 5], [1, 2, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError, match="equally long"):
        win_rate([1, 2], [1])


def test_bootstrap_interval_on_known_numbers():
    assert bootstrap_mean_ci([2.0] * 10) == (2.0, 2.0)
    values = np.random.default_rng(0).normal(1.0, 2.0, size=2000)
    low, high = bootstrap_mean_ci(values, num_samples=4000)
    half_width = 1.96 * values.std() / np.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half_width, abs=0.02)
    assert high == pytest.approx(values.mean() + half_width, abs=0.02)
    assert bootstrap_mean_ci(values, seed=3) == bootstrap_mean_ci(values, seed=3)


def test_rule_based_scorers_on_known_images():
    images = [solid((255, 0, 0)), solid((0, 0, 255)), solid((128, 128, 128)), solid((255, 128, 128))]
    np.testing.assert_allclose(redness_scorer(images), [255, -127.5, 0, 127])
    np.testing.assert_allclose(saturation_scorer(images), [1, 1, 0, 127 / 255], rtol=1e-6)
    squares = render_squares(["red", "blue"], np.random.default_rng(0))
    framed = [Image.fromarray(image) for image in add_frame(squares)]
    plain = [Image.fromarray(image) for image in squares]
    assert (frame_scorer(framed) > frame_scorer(plain) + 0.5).all()  # the frame is white, the background at most 40%


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = str(tmp_path_factory.mktemp("tiny-clip"))
    tokenizer = build_tiny_clip_tokenizer(path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": len(tokenizer) - 2,
            "eos_token_id": len(tokenizer) - 1,
            "pad_token_id": len(tokenizer) - 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 8,
            "patch_size": 4,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_clip_and_pickscore_scorers_compute_scaled_cosines(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = [solid((255, 0, 0)), solid((0, 0, 255))], ["a red square", "a blue square"]
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model(**inputs)
    image = torch.nn.functional.normalize(outputs.image_embeds, dim=-1)
    text = torch.nn.functional.normalize(outputs.text_embeds, dim=-1)
    cosine = (image * text).sum(-1).numpy()
    np.testing.assert_allclose(CLIPScorer(tiny_clip)(images, prompts), 100 * cosine, rtol=1e-4, atol=1e-4)
    pick = PickScoreScorer(tiny_clip, tiny_clip)(images, prompts)
    np.testing.assert_allclose(pick, model.logit_scale.exp().item() * cosine, rtol=1e-4, atol=1e-4)


def test_evaluate_preference_with_lora_and_with_a_second_pipeline(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    trainer = make_trainer("dpo", tiny_sd, tmp_path / "lora", max_steps=2, learning_rate=5e-2)
    trainer.train()
    trainer.save_model()
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base.set_progress_bar_config(disable=True)
    same = evaluate_preference(base, ["a", "b"], redness_scorer, tuned=tiny_sd, seeds=[1, 2], num_inference_steps=2)
    assert same.win_rate == 0.5 and same.mean_difference == 0.0 and (same.ci_low, same.ci_high) == (0.0, 0.0)
    result = evaluate_preference(
        base, ["a", "b"], redness_scorer, lora=str(tmp_path / "lora"), seeds=[1, 2, 3], num_inference_steps=2
    )
    assert [(row["prompt"], row["seed"]) for row in result.rows] == [(p, s) for p in "ab" for s in (1, 2, 3)]
    differences = [row["tuned_score"] - row["base_score"] for row in result.rows]
    assert result.mean_difference == pytest.approx(np.mean(differences))
    assert result.win_rate == win_rate([r["tuned_score"] for r in result.rows], [r["base_score"] for r in result.rows])
    assert any(d != 0 for d in differences)
    # The adapter was unloaded: the base pipeline generates what it generated before.
    again = evaluate_preference(base, ["a", "b"], redness_scorer, tuned=base, seeds=[1, 2, 3], num_inference_steps=2)
    assert [r["base_score"] for r in again.rows] == [r["base_score"] for r in result.rows]
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_preference(base, ["a"], redness_scorer)


def test_evaluation_callback_logs_win_rate_and_grid_to_tensorboard(tiny_sd, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = make_trainer(
        "mapo",
        tiny_sd,
        tmp_path / "out",
        max_steps=2,
        report_to="tensorboard",
        dataset=make_pickapic(4),
    )
    callback = EvaluationCallback(
        trainer, ["a square"], redness_scorer, seeds=[0, 1], eval_every_steps=1, num_inference_steps=2
    )
    trainer.add_callback(callback)
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/preference_eval/win_rate" in scalars or "preference_eval/win_rate" in scalars
    tag = (
        "train/preference_eval/win_rate" if "train/preference_eval/win_rate" in scalars else "preference_eval/win_rate"
    )
    assert [event.step for event in events.Scalars(tag)] == [1, 2]
    assert all(0.0 <= event.value <= 1.0 for event in events.Scalars(tag))
    images = events.Images("preference_eval/base_vs_tuned")
    assert len(images) == 2 and images[0].width == 2 * 16 and images[0].height == 2 * 16
    # The training metrics were not swallowed by the callback's log call.
    assert any("mapo/accuracy" in entry for entry in trainer.state.log_history)


@pytest.mark.slow  # about 70 s: every stage of the benchmark, on a few steps
def test_efficacy_benchmark_smoke(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import efficacy

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept\n")
    records = efficacy.main(["--quick", "--output_dir", str(tmp_path / "out"), "--results", str(results)])
    # Per seed (2): every registered method on clean pairs, the noise arms at 40%, DPO and MaPO under mismatch, and
    # every method again on pairs labelled by another reward.
    clean = [r for r in records if r["experiment"] == "flips" and r["flip_rate"] == 0.0]
    assert {r["arm"] for r in clean} == set(METHODS)
    noisy = [r for r in records if r["experiment"] == "flips" and r["flip_rate"] == 0.4]
    assert sorted(r["arm"] for r in noisy) == ["adaptive", "adaptive", "dpo", "dpo"]
    assert all("auroc_u" in r for r in noisy if r["arm"] == "adaptive")
    assert {r["arm"] for r in records if r["experiment"] == "mismatch"} == {"dpo", "mapo"}
    assert {r["arm"] for r in records if r["experiment"] == "reward:-size"} == set(METHODS)
    assert len(records) == 2 * (len(METHODS) + 2 + 2 + len(METHODS))
    assert all(0 <= r["win_rate"] <= 1 and r["seconds_per_step"] > 0 for r in records)
    assert {r["eval_protocol"] for r in records} == {efficacy.EVAL_PROTOCOL}
    assert {r["settings"].get("beta") for r in records if r["method"] in ("dpo", "adaptive")} == {1000.0}
    text = results.read_text()
    assert "kept" in text and "| adaptive |" in text and "| adaptive − dpo |" in text and "MaPO − DPO" in text
    assert "by true reward" in text and "| saturation | -size |" in text and "images with the frame" in text
    # Text, not values: an AUROC is NaN when the two quick steps leave no scored flipped pair (NaN != NaN).
    assert (tmp_path / "out" / "efficacy.json").read_text() == json.dumps(records, indent=1)
    efficacy.main(["--quick", "--output_dir", str(tmp_path / "out"), "--results", str(results)])
    assert results.read_text().count("<!-- efficacy:start -->") == 1  # a rerun replaces its section


def test_efficacy_statistics_on_known_values():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import efficacy

    assert efficacy.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert efficacy.auroc([0.1, 0.5, 0.5, 0.9], [True, True, False, False]) == 0.5 / 4  # one tie in four pairs
    mean, low, high, ci_low, ci_high = efficacy.mean_interval([0.6, 0.7, 0.8, 0.9, 1.0])
    half = 2.776 * np.std([0.6, 0.7, 0.8, 0.9, 1.0], ddof=1) / np.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert (mean, low, high) == pytest.approx((0.8, 0.6, 1.0)) and (ci_low, ci_high) == pytest.approx(
        (0.8 - half, 0.8 + half)
    )


def test_efficacy_evaluation_seeds_are_distinct_and_resume_keeps_one_protocol(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import efficacy

    splits = efficacy.Evaluator(None, num_eval_seeds=3).splits
    prompts, seeds = splits[""]
    held_out_prompts, held_out_seeds = splits["heldout_"]
    assert len(prompts) == 3 * len(TRAIN_COLOURS) and len(held_out_prompts) == 12 * len(HELD_OUT_COLOURS)
    assert {prompts.count(p) for p in prompts} == {3}
    # No seed is shared between two images: not across prompts, nor between the training and held-out prompts.
    assert len(set(seeds + held_out_seeds)) == len(seeds) + len(held_out_seeds)

    path = tmp_path / "records.jsonl"
    old, new = {"arm": "dpo"}, {"arm": "mapo", "eval_protocol": efficacy.EVAL_PROTOCOL}
    path.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    assert efficacy.resumed_records(str(path), resume=True) == [new]
    assert path.read_text() == json.dumps(new) + "\n"  # the stale run is gone from the file, to be trained again
    assert efficacy.resumed_records(str(path), resume=False) == [] and not path.exists()


# ----- video -----


def test_evaluate_video_preference_with_fixed_seeds(tiny_wan, tmp_path):
    clip = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 2}
    same = evaluate_video_preference(tiny_wan, ["a", "b"], video_redness_scorer, tuned=tiny_wan, seeds=[1, 2], **clip)
    assert same.win_rate == 0.5 and same.mean_difference == 0.0
    assert [row["seed"] for row in same.rows] == [1, 2, 1, 2] and [row["prompt"] for row in same.rows][:2] == ["a"] * 2
    assert same.base_images[0].shape == (5, 32, 32, 3) and same.base_images[0].dtype == np.uint8
    assert not np.array_equal(same.base_images[0], same.base_images[1])  # different seeds, different clips
    args = wan_args(tmp_path / "run", DiffusionDPOConfig, learning_rate=0.05, max_steps=3)
    trainer = DiffusionDPOTrainer(
        tiny_wan, args=args, train_dataset=make_video_pairs(2), peft_config=LoraConfig(r=4, lora_alpha=4)
    )
    trainer.train()
    trainer.save_model()
    result = evaluate_video_preference(
        tiny_wan, ["a", "b"], temporal_smoothness_scorer, lora=str(tmp_path / "run"), seeds=[1, 2], **clip
    )
    assert len(result.rows) == 4 and 0 <= result.win_rate <= 1
    # The base clips are the same generations as before (fixed seeds); the tuned ones differ
    for base_clip, again in zip(same.base_images, result.base_images, strict=True):
        np.testing.assert_array_equal(base_clip, again)
    assert any(not np.array_equal(b, t) for b, t in zip(result.base_images, result.tuned_images, strict=True))
    assert result.ci_low <= result.mean_difference <= result.ci_high
