"""Two measurements on the tiny offline pipelines (CPU, one thread), for docs/supported_models.md.

``--measure steps``: seconds per optimizer step of each method (median of ``--steps`` steps after one warm-up step;
batch 2 pairs, 16 px images, LoRA rank 4, encodings cached).

``--measure scale``: the error scale ``r`` of flow matching. Diffusion-DPO trains 40 LoRA steps (batch 4 pairs,
lr 3e-3, ``beta`` 300) on the bundled tiny Pick-a-Pic set, then 256 (pair, σ) draws of policy and reference errors
(the trainer's own ``prepare_step`` / ``denoising_errors``) give the ratio of the mean ε-equivalent error
(``(1 − σ)²`` times the velocity error) to the mean velocity error, and the same ratio of mean ``|ℓ|``.

    python benchmarks/tiny_families.py --measure steps --models tiny-flux2 tiny-qwen-image
"""

import argparse
import statistics
import tempfile

import torch
from common import StepTimer
from datasets import load_dataset
from peft import LoraConfig

from trl_diffusion import METHODS
from trl_diffusion.model_config import resolve_model_path


DATASET = "examples/data/pickapic_tiny"
BETAS = {"dpo": 2500.0, "mapo": 0.1, "adaptive": 1000.0, "kto": 1000.0}


def make_trainer(method: str, path: str, output_dir: str, **overrides):
    trainer_class, config_class = METHODS[method]
    settings = {
        "output_dir": output_dir,
        "per_device_train_batch_size": 2,
        "resolution": 16,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "bf16": False,
        "use_cpu": True,
        "seed": 0,
        "beta": BETAS[method],
        **overrides,
    }
    dataset = load_dataset(DATASET)["train"]
    return trainer_class(path, args=config_class(**settings), train_dataset=dataset, peft_config=LoraConfig(r=4))


def step_times(path: str, steps: int) -> dict[str, float]:
    medians = {}
    for method in METHODS:
        timer = StepTimer()
        trainer = make_trainer(method, path, tempfile.mkdtemp(), max_steps=steps + 1)
        trainer.add_callback(timer)
        trainer.train()
        medians[method] = statistics.median(timer.times[1:])
    return medians


def error_scale(path: str, draws: int = 64) -> tuple[float, float]:
    trainer = make_trainer(
        "dpo", path, tempfile.mkdtemp(), max_steps=40, learning_rate=3e-3, beta=300.0, per_device_train_batch_size=4
    )
    trainer.train()
    with torch.no_grad():
        return measure_scale(trainer, draws)


def measure_scale(trainer, draws: int) -> tuple[float, float]:
    """Ratios of mean ε-equivalent to mean velocity errors and margins over ``draws`` batches of a trained run."""
    model = trainer.model.eval()
    velocity, epsilon, margins_v, margins_e = [], [], [], []
    batches = iter(trainer.get_train_dataloader())
    for draw in range(draws):
        trainer.state.global_step = 1000 + draw  # a fresh noise and timestep per pair and draw
        try:
            inputs = next(batches)
        except StopIteration:
            batches = iter(trainer.get_train_dataloader())
            inputs = next(batches)
        step = trainer.prepare_step(inputs)
        policy = trainer.denoising_errors(model, step)
        with trainer.reference_model(model) as reference:
            ref = trainer.denoising_errors(reference, step)
        weight = (1 - step.timesteps.float() / trainer.family.num_train_timesteps) ** 2
        for errors, (policy_e, ref_e) in ((velocity, (policy, ref)), (epsilon, (policy * weight, ref * weight))):
            errors.append(torch.cat([policy_e, ref_e]))
        for margins, w in ((margins_v, 1.0), (margins_e, weight)):
            p, r = (policy * w).chunk(2), (ref * w).chunk(2)
            margins.append(((r[0] - r[1]) - (p[0] - p[1])).abs())
    ratio_errors = torch.cat(epsilon).mean() / torch.cat(velocity).mean()
    ratio_margins = torch.cat(margins_e).mean() / torch.cat(margins_v).mean()
    return ratio_errors.item(), ratio_margins.item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=["steps", "scale"], required=True)
    parser.add_argument(
        "--models", nargs="+", default=["tiny-flux2", "tiny-flux2-klein", "tiny-qwen-image", "tiny-z-image"]
    )
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name in args.models:
        path = resolve_model_path(name)
        results[name] = step_times(path, args.steps) if args.measure == "steps" else error_scale(path)
        print(name, results[name], flush=True)
    return results


if __name__ == "__main__":
    main()
