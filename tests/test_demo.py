"""The demo's verdict: it reports an effect only when the interval of the mean gain lies above 0 (`make demo` itself
runs in CI, `.ci/run`, not here)."""

import importlib.util
import os

import pytest
from PIL import Image

from trl_diffusion.evaluation import PreferenceEvaluation


HERE = os.path.dirname(os.path.abspath(__file__))


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(HERE, "..", "examples", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluation(ci_low: float, ci_high: float, num_prompts: int = 2, num_seeds: int = 3) -> PreferenceEvaluation:
    rows = [
        {"prompt": str(p), "seed": s, "base_score": 0.0, "tuned_score": 0.1}
        for p in range(num_prompts)
        for s in range(num_seeds)
    ]
    images = [Image.new("RGB", (16, 16), (10 * i, 0, 0)) for i in range(len(rows))]
    return PreferenceEvaluation(0.9, 0.1, ci_low, ci_high, rows, images, images)


@pytest.mark.parametrize(("ci_low", "effect"), [(0.02, True), (0.0, False), (-0.01, False)])
def test_demo_reports_an_effect_only_when_the_interval_is_above_zero(tmp_path, ci_low, effect, capsys):
    demo = load_demo()
    args = demo.parse_args(["--output_dir", str(tmp_path), "--num_eval_seeds", "3", "--reward=-size"])
    assert demo.report(args, evaluation(ci_low, 0.2), str(tmp_path / "lora")) is effect
    grid = Image.open(tmp_path / "before_after.png")
    assert grid.size == (16 * 4 * 16, 16 * 4 * 2)  # 16 (prompt, seed) pairs, base above base + LoRA
    assert "Win rate of base + LoRA over the base model" in capsys.readouterr().out


def test_demo_rejects_an_unknown_reward_before_any_work():
    with pytest.raises(ValueError, match="Unknown reward 'sharpness'"):
        load_demo().parse_args(["--reward", "sharpness"])


def test_demo_evaluation_gives_every_prompt_its_own_seeds(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from trl_diffusion.evaluation import summarize
    from trl_diffusion.scorers import redness_scorer

    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base.set_progress_bar_config(disable=True)
    base.unet.add_adapter(LoraConfig(r=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=lora_layers)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base.set_progress_bar_config(disable=True)
    demo = load_demo()
    result = demo.evaluate(base, redness_scorer, str(tmp_path / "lora"), num_seeds=2)
    seeds = [row["seed"] for row in result.rows]
    assert len(result.rows) == 2 * len(demo.TRAIN_COLOURS) and len(set(seeds)) == len(seeds)
    assert [row["prompt"] for row in result.rows[::2]] == [demo.caption(colour) for colour in demo.TRAIN_COLOURS]
    base_scores, tuned_scores = [r["base_score"] for r in result.rows], [r["tuned_score"] for r in result.rows]
    assert (result.win_rate, result.mean_difference, result.ci_low, result.ci_high) == summarize(
        base_scores, tuned_scores
    )
    assert len(result.base_images) == len(result.tuned_images) == len(result.rows)
