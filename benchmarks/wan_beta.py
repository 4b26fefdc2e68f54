"""β for Wan (velocity errors versus ε errors), and per-step CPU times of the three methods on the tiny Wan model.

    python benchmarks/wan_beta.py            # all three: analytic, tiny-model ratios, step times (~2 min, 1 thread)

The ratio ``r = ε-error / velocity-error`` (see docs/supported_models.md, "Choosing beta"):

1. analytic: ``E[(1 − σ)²]`` under Wan's training density (logit-normal(0, 1), then the scheduler's flow shift:
   3.0 for Wan 2.1 480p and 1.3B, 5.0 for 720p), by midpoint quadrature over 200 000 values of ``u``, and the same
   mean weighted by ``Var(v | x_t) = 1 / (1 − 2σ + 2σ²)``;
2. tiny model: the tiny Wan pipeline trained 40 LoRA steps with Diffusion-DPO on the bundled video pairs, then 256
   (pair, σ) draws of policy and reference errors: the ratio of mean ε-equivalent to mean velocity errors, and of
   the mean absolute implicit reward margins ``|ℓ|``;
3. the median CPU time of 8 optimizer steps of each method (batch 2 pairs of 9-frame 32 x 32 clips, LoRA rank 4).
"""

import argparse
import json
import os
import statistics
import tempfile

import torch
from common import StepTimer
from datasets import load_dataset
from peft import LoraConfig

from trl_diffusion import METHODS
from trl_diffusion.models.flow_matching import shift_sigmas, sigmas_from_uniform
from trl_diffusion.testing.tiny_models import build_tiny_wan


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DATASET = os.path.join(REPO, "examples", "data", "video_pairs_tiny")


def analytic_ratios(shift: float, num_points: int = 200_000) -> tuple[float, float]:
    """``(E[(1 − σ)²], the same weighted by 1 / (1 − 2σ + 2σ²))`` under logit-normal(0, 1) and ``shift``."""
    u = (torch.arange(num_points, dtype=torch.float64) + 0.5) / num_points
    sigmas = shift_sigmas(sigmas_from_uniform(u, "logit_normal").clamp(1e-3, 1.0), shift)
    ratio = (1 - sigmas) ** 2
    weights = 1 / (1 - 2 * sigmas + 2 * sigmas**2)
    return float(ratio.mean()), float((ratio * weights).sum() / weights.sum())


def config(method: str, output_dir: str, **overrides):
    _, config_class = METHODS[method]
    settings = {
        "output_dir": output_dir,
        "resolution": 32,
        "num_frames": 9,
        "per_device_train_batch_size": 2,
        "learning_rate": 3e-3,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1000,
        "bf16": False,
        "seed": 0,
        **overrides,
    }
    return config_class(**settings)


def trainer_for(method: str, model: str, output_dir: str, **overrides):
    trainer_class, _ = METHODS[method]
    dataset = load_dataset(DATASET, split="train")
    return trainer_class(
        model,
        args=config(method, output_dir, **overrides),
        train_dataset=dataset,
        peft_config=LoraConfig(r=4, lora_alpha=4),
    )


def tiny_model_ratios(model: str, output_dir: str, num_draws: int = 256) -> tuple[float, float]:
    trainer = trainer_for("dpo", model, output_dir, max_steps=40, beta=300, per_device_train_batch_size=4)
    trainer.train()
    with torch.no_grad():
        return _draw_ratios(trainer, num_draws)


def _draw_ratios(trainer, num_draws: int) -> tuple[float, float]:
    loader = trainer.get_train_dataloader()
    # Chosen and rejected share σ, so the ε-equivalent margin is (1 − σ)² times the velocity margin
    velocity, epsilon, margins_v, margins_e = [], [], [], []
    draw = 0
    while draw < num_draws:
        for inputs in loader:
            trainer.state.global_step = 10_000 + draw  # a new noise and σ per pair for every draw
            step = trainer.prepare_step(inputs)  # on the CPU the collated batch needs no device transfer
            with trainer.reference_model(trainer.model) as reference:
                ref_errors = trainer.denoising_errors(reference, step)
            policy_errors = trainer.denoising_errors(trainer.model, step)
            weight = (1 - step.timesteps / trainer.family.num_train_timesteps) ** 2
            velocity.append(policy_errors)
            epsilon.append(policy_errors * weight)
            e_w, e_l = policy_errors.chunk(2)
            r_w, r_l = ref_errors.chunk(2)
            w_w, _ = weight.chunk(2)
            margins_v.append((r_w - r_l) - (e_w - e_l))
            margins_e.append(w_w * ((r_w - r_l) - (e_w - e_l)))
            draw += len(e_w)
            if draw >= num_draws:
                break
    error_ratio = torch.cat(epsilon).mean() / torch.cat(velocity).mean()
    margin_ratio = torch.cat(margins_e).abs().mean() / torch.cat(margins_v).abs().mean()
    return float(error_ratio), float(margin_ratio)


def step_times(model: str, output_dir: str, num_steps: int = 8) -> dict[str, float]:
    betas = {"dpo": 300.0, "mapo": 0.1, "adaptive": 120.0}
    times = {}
    for method in METHODS:
        trainer = trainer_for(
            method, model, os.path.join(output_dir, method), max_steps=num_steps + 1, beta=betas[method]
        )
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
        times[method] = statistics.median(timer.times[1:])  # the first step warms up
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"analytic": {str(shift): analytic_ratios(shift) for shift in (3.0, 5.0)}}
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_wan(os.path.join(folder, "tiny-wan"))
        results["tiny_model"] = dict(zip(("errors", "margins"), tiny_model_ratios(model, folder), strict=True))
        results["step_seconds"] = step_times(model, folder)
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
