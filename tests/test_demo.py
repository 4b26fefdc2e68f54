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
