"""Building the tests' tiny training runs: one set of tiny-run settings, trainers of any method on it, the
snapshots the tests compare, and the checks every family's LoRA run must pass."""

import gc
import math
import os

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from helpers.rows import make_pickapic
from trl_diffusion import METHODS, DiffusionPreferenceConfig, MaPOConfig
from trl_diffusion.trainer.base_trainer import LORA_WEIGHT_NAME


# A tiny run: 2 pairs of 16 px images per step, 2 steps, every step logged, data in the main process, no
# checkpoints and no trackers.
TINY_RUN = {
    "per_device_train_batch_size": 2,
    "max_steps": 2,
    "resolution": 16,
    "dataloader_num_workers": 0,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
    "seed": 0,
}


def tiny_config(config_class, output_dir, **overrides):
    """``config_class`` with the tiny-run settings (`TINY_RUN`), writing to ``output_dir``; ``overrides`` win."""
    return config_class(**{"output_dir": str(output_dir), **TINY_RUN, **overrides})


def make_trainer(method, model, output_dir, peft=True, dataset=None, eval_dataset=None, **overrides):
    """A trainer of ``method`` (a key of `METHODS`) on the tiny run: LoRA r=4 (or full fine-tuning without
    ``peft``), 8 Pick-a-Pic rows unless ``dataset`` is given."""
    trainer_class, config_class = METHODS[method]
    args = tiny_config(config_class, output_dir, **{"learning_rate": 1e-2 if peft else 1e-3, **overrides})
    return trainer_class(
        model=model,
        args=args,
        train_dataset=dataset if dataset is not None else make_pickapic(8),
        eval_dataset=eval_dataset,
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian") if peft else None,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``module``'s state dict."""
    return {name: p.detach().clone() for name, p in module.state_dict().items()}


def live_unets() -> set[int]:
    """The ids of the UNets alive now (after a garbage collection): a test counts the new ones."""
    gc.collect()
    return {id(obj) for obj in gc.get_objects() if isinstance(obj, UNet2DConditionModel)}


def make_args(output_dir, config_class=DiffusionPreferenceConfig, **overrides):
    """A float32 tiny-run config of ``config_class`` at lr 1e-2, for the model-family tests."""
    return tiny_config(config_class, output_dir, **{"learning_rate": 1e-2, "bf16": False, **overrides})


def wan_args(output_dir, config_class=MaPOConfig, **overrides):
    """`make_args` for the tiny Wan pipeline: 9 frames of 32 x 32 pixels."""
    return make_args(output_dir, config_class, **{"resolution": 32, "num_frames": 9, **overrides})


def float32_trainer(model, tmp_path, method="dpo", peft=True, dataset=None, eval_dataset=None, **overrides):
    """`make_trainer` in float32 with its own encoding-cache folder, all under ``tmp_path``."""
    overrides = {"encodings_cache_dir": str(tmp_path / "cache"), "bf16": False, **overrides}
    output_dir = overrides.pop("output_dir", str(tmp_path / "out"))
    return make_trainer(method, model, output_dir, peft=peft, dataset=dataset, eval_dataset=eval_dataset, **overrides)


def perturb_lora(trainer, seed=0, scale=0.05):
    """Give the LoRA B matrices non-zero values, so the policy differs from its reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def collated_batch(trainer, indices, cached=True):
    """A collated batch of pairs ``indices``: from the encoding cache, or decoded from images (the uncached path)."""
    dataset = trainer.train_dataset if cached else trainer.train_dataset.source
    examples = [dataset[i] for i in indices]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def loss_history(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


class Counter:
    """Count calls of a class method (e.g. every VAE encode), wherever it is called from."""

    def __init__(self, monkeypatch, cls, name):
        self.calls = 0
        original = getattr(cls, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


def check_lora_training(trainer, model_path: str, generate) -> tuple[list[str], object]:
    """Train ``trainer`` (LoRA) and save it, then check what any family must give: bit-identical base weights, every
    adapter's B changed, finite losses, a saved adapter of the denoiser's keys only that the pipeline at
    ``model_path`` loads whole and whose output (``generate(pipeline)``) it changes.

    Returns:
        The adapter (``lora_B``) keys and the pipeline with the adapter loaded, for a family's own checks.
    """
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    base_keys = [name for name in before if "lora_" not in name]
    adapter_keys = [name for name in before if "lora_B" in name and ".default." in name]
    assert base_keys and adapter_keys
    assert all(torch.equal(before[name], after[name]) for name in base_keys)
    assert all(not torch.equal(before[name], after[name]) for name in adapter_keys)
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
    trainer.save_model()
    saved = load_file(os.path.join(trainer.args.output_dir, LORA_WEIGHT_NAME))

    pipeline = DiffusionPipeline.from_pretrained(model_path)
    without_lora = generate(pipeline)
    pipeline.load_lora_weights(trainer.args.output_dir)
    denoiser = getattr(pipeline, trainer.family.denoiser_name)
    (adapter_name,) = denoiser.peft_config
    assert len(get_peft_model_state_dict(denoiser, adapter_name=adapter_name)) == len(saved)
    assert all(name.startswith(f"{trainer.family.denoiser_name}.") for name in saved)
    assert np.abs(generate(pipeline) - without_lora).max() > 1e-5
    return adapter_keys, pipeline
