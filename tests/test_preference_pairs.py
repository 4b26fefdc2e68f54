"""On-policy pair generation: sampling with fixed seeds, scoring, pairing, the gap threshold, the outputs."""

import io
import os
import sys

import numpy as np
import pytest
from datasets import load_dataset, load_from_disk
from diffusers import DiffusionPipeline
from helpers.fake_hub import fake_hub_client
from helpers.runs import REPO, run
from PIL import Image

from trl_diffusion import PreferenceDataset, generate_preference_pairs
from trl_diffusion.evaluation import generate_paired
from trl_diffusion.preference_pairs import form_pairs, save_preference_pairs
from trl_diffusion.scorers import redness_scorer


PROMPTS = ["a red square", "a blue square", "a green square"]
TINY_YAML = os.path.join(REPO, "examples", "pairs", "generate_pairs_tiny.yaml")


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_form_pairs_best_worst_all_and_the_gap():
    scores = [0.3, 0.9, 0.1, 0.5]
    assert form_pairs(scores, "best_worst") == ([(1, 2)], 0)
    assert form_pairs(scores, "best_worst", min_reward_gap=0.81) == ([], 1)
    pairs, dropped = form_pairs(scores, "all", min_reward_gap=0.25)
    # gaps: (0,1) .6, (0,2) .2, (0,3) .2, (1,2) .8, (1,3) .4, (2,3) .4
    assert pairs == [(0, 1), (1, 2), (1, 3), (2, 3)] and dropped == 2
    assert form_pairs([1.0, 1.0], "best_worst") == ([], 1)  # a tie has no winner, even with no threshold
    assert form_pairs([2.0, 1.0, 2.0], "all") == ([(0, 1), (1, 2)], 1)
    with pytest.raises(ValueError, match="pairing"):
        form_pairs(scores, "ranked")


@pytest.fixture(scope="module")
def pipeline(tiny_sd):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_pairs_hold_the_seeded_images_their_scores_and_labels(pipeline):
    pairs = generate_preference_pairs(
        pipeline, PROMPTS, redness_scorer, images_per_prompt=3, pairing="all", seed=10, num_inference_steps=2
    )
    dataset = pairs.dataset
    assert dataset.column_names == [
        "jpg_0", "jpg_1", "label_0", "caption", "score_0", "score_1", "seed_0", "seed_1", "prompt_index"
    ]  # fmt: skip
    # Image j of prompt i comes from seed 10 + 3i + j, as generate_paired makes it.
    expected = generate_paired(
        pipeline, [p for p in PROMPTS for _ in range(3)], list(range(10, 19)), 3, num_inference_steps=2
    )
    expected_scores = redness_scorer(expected)
    assert pairs.num_candidate_pairs == 9 and pairs.num_pairs + pairs.num_dropped == 9 and pairs.num_images == 9
    for row in dataset:
        i, j = row["seed_0"] - 10, row["seed_1"] - 10
        assert row["prompt_index"] == i // 3 == j // 3 and row["caption"] == PROMPTS[i // 3] and i < j
        np.testing.assert_array_equal(decode(row["jpg_0"]), np.asarray(expected[i]))
        np.testing.assert_array_equal(decode(row["jpg_1"]), np.asarray(expected[j]))
        assert (row["score_0"], row["score_1"]) == pytest.approx((expected_scores[i], expected_scores[j]))
        assert row["label_0"] == float(row["score_0"] > row["score_1"])
    assert set(dataset["label_0"]) == {0.0, 1.0}
    # The trainers read the dataset as it is.
    prepared = PreferenceDataset(dataset, resolution=16)
    assert len(prepared) == pairs.num_pairs and prepared[0]["chosen_pixel_values"].shape[-1] == 16


@pytest.mark.parametrize("model_fixture", ["tiny_sdxl", "tiny_sd3", "tiny_flux"])
def test_every_family_samples_the_seeded_images(model_fixture, request):
    pipeline = DiffusionPipeline.from_pretrained(request.getfixturevalue(model_fixture))
    kwargs = {"num_inference_steps": 2, "height": 16, "width": 16}
    pairs = generate_preference_pairs(pipeline, ["a red square"], redness_scorer, 2, seed=5, **kwargs)
    (row,) = pairs.dataset
    expected = generate_paired(pipeline, ["a red square"] * 2, [5, 6], **kwargs)
    assert (row["seed_0"], row["seed_1"]) == (5, 6)
    np.testing.assert_array_equal(decode(row["jpg_0"]), np.asarray(expected[0]))
    np.testing.assert_array_equal(decode(row["jpg_1"]), np.asarray(expected[1]))


def test_pairs_below_the_reward_gap_are_dropped_and_counted(pipeline, caplog):
    all_pairs = generate_preference_pairs(pipeline, PROMPTS, redness_scorer, 4, num_inference_steps=2).dataset
    spreads = {row["caption"]: abs(row["score_0"] - row["score_1"]) for row in all_pairs}  # best minus worst
    assert sorted(spreads) == sorted(PROMPTS)
    gap = sorted(spreads.values())[1]  # the middle spread: one prompt falls below it
    with caplog.at_level("INFO", logger="trl_diffusion.preference_pairs"):
        pairs = generate_preference_pairs(pipeline, PROMPTS, redness_scorer, 4, gap, num_inference_steps=2)
    assert (pairs.num_candidate_pairs, pairs.num_dropped, pairs.num_pairs) == (3, 1, 2)
    assert pairs.dataset["caption"] == [p for p in PROMPTS if spreads[p] >= gap]
    assert "dropped 1 of 3 candidate pairs" in caplog.text


def test_bad_arguments_and_bad_scores_fail_with_a_clear_error(pipeline):
    with pytest.raises(ValueError, match="images_per_prompt must be at least 2"):
        generate_preference_pairs(pipeline, PROMPTS, redness_scorer, images_per_prompt=1)
    with pytest.raises(ValueError, match="min_reward_gap"):
        generate_preference_pairs(pipeline, PROMPTS, redness_scorer, min_reward_gap=-1)
    with pytest.raises(ValueError, match="Prompt 1 is NoneType"):
        generate_preference_pairs(pipeline, ["a", None], redness_scorer)
    with pytest.raises(ValueError, match="returned 1 scores for the 2 images of prompt 0"):
        generate_preference_pairs(pipeline, ["a"], lambda images, prompts: [0.0], 2, num_inference_steps=1)
    with pytest.raises(ValueError, match="returned nan for prompt 0, seed 1"):
        generate_preference_pairs(
            pipeline, ["a"], lambda images, prompts: [0.0, float("nan")], 2, num_inference_steps=1
        )


def test_save_to_disk_parquet_and_push_to_hub(pipeline, tmp_path, monkeypatch):
    pairs = generate_preference_pairs(pipeline, PROMPTS, redness_scorer, 2, num_inference_steps=2)
    saved = save_preference_pairs(pairs, str(tmp_path / "disk"))
    assert load_from_disk(str(tmp_path / "disk")).to_dict() == pairs.dataset.to_dict() == saved.to_dict()
    assert not os.path.exists(f"{tmp_path / 'disk'}.shards")
    save_preference_pairs(pairs, str(tmp_path / "parquet"), output_format="parquet")
    assert os.listdir(tmp_path / "parquet") == ["train-00000-of-00001.parquet"]
    assert load_dataset(str(tmp_path / "parquet"))["train"].to_dict() == pairs.dataset.to_dict()

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    with fake_hub_client() as hub:
        save_preference_pairs(pairs, str(tmp_path / "hub"), push_to_hub=True, hub_dataset_id="me/tiny-pairs")
    assert ("POST", "/api/repos/create") in hub.requests
    (commit,) = hub.commits
    assert commit["repo"] == "me/tiny-pairs" and "README.md" in commit["files"]
    (name,) = commit["lfs"]
    (tmp_path / "uploaded.parquet").write_bytes(commit["lfs"][name])
    uploaded = load_dataset("parquet", data_files=str(tmp_path / "uploaded.parquet"))["train"]
    assert name.startswith("data/train-") and uploaded.to_dict() == pairs.dataset.to_dict()
    with pytest.raises(ValueError, match="hub_dataset_id"):
        save_preference_pairs(pairs, str(tmp_path / "x"), push_to_hub=True)


CLI_ARGS = ["--config", TINY_YAML, "--prompts", "a red square", "a blue square", "a teal square", "--pairing", "all"]


def run_script_in_process(output_dir):
    """`trl-diffusion generate-pairs` as the relaunched script runs it: parse the YAML and flags, call `main`."""
    from trl_diffusion.scripts import generate_pairs

    parser = generate_pairs.make_parser()
    parsed = parser.parse_args_and_config([*CLI_ARGS, "--output_dir", str(output_dir)], fail_with_unknown_args=False)
    return generate_pairs.main(*parsed)


def test_the_example_config_writes_a_dataset_the_trainers_read(cache_dir, tmp_path):
    pairs = run_script_in_process(tmp_path / "one")
    assert (pairs.num_prompts, pairs.num_candidate_pairs) == (3, 18)  # 4 images: 6 candidate pairs a prompt
    dataset = load_from_disk(str(tmp_path / "one"))
    assert len(dataset) == pairs.num_pairs > 0 and set(dataset["seed_0"]) <= set(range(12))
    assert len(PreferenceDataset(dataset, resolution=16)) == pairs.num_pairs


@pytest.mark.slow
def test_cli_on_two_processes_gives_the_pairs_of_one(cache_dir, tmp_path):
    """The same run in the test process, and relaunched by the CLI on 2 CPU processes (gloo)."""
    one = run_script_in_process(tmp_path / "one")
    cli = [sys.executable, "-m", "trl_diffusion.scripts.cli", "generate-pairs", *CLI_ARGS]
    launcher = ["--num_processes", "2", "--multi_gpu", "--use_cpu", "true"]
    output = run([*cli, "--output_dir", str(tmp_path / "two"), *launcher], cache_dir)
    assert f"dropped {one.num_dropped} of 18 candidate pairs" in output
    assert load_from_disk(str(tmp_path / "two")).to_dict() == load_from_disk(str(tmp_path / "one")).to_dict()
