"""A small training run that can be killed and resumed, for the fault tests (tests/test_checkpoints.py).

``build_trainer`` makes the same trainer in the test process and in a child process. Run as a script, it trains
(or resumes, ``--resume``) and prints ``STEP n`` after each optimizer step, so the parent can SIGKILL it at a step;
``--kill-while-saving N`` makes it SIGKILL itself in the middle of writing ``checkpoint-N`` (its weights written,
its optimizer state and manifest not).

    python tests/helpers/resumable.py METHOD MODEL_DIR DATASET_DIR OUTPUT_DIR [--full] [--resume] [--kill-while-saving N]
"""

import argparse
import os
import signal
import sys

import torch
from datasets import load_from_disk
from peft import LoraConfig
from transformers import TrainerCallback


MAX_STEPS = 6


def build_trainer(method: str, model: str, dataset_dir: str, output_dir: str, peft: bool = True, **overrides):
    """A deterministic run: plain SGD (every step's update is exactly reproducible), a checkpoint every step."""
    from trl_diffusion import METHODS

    trainer_class, config_class = METHODS[method]
    settings = {
        "output_dir": str(output_dir), "per_device_train_batch_size": 2, "max_steps": MAX_STEPS,
        "learning_rate": 1e-2 if peft else 5e-2, "optim": "sgd", "lr_scheduler_type": "constant", "resolution": 16,
        "dataloader_num_workers": 0, "report_to": "none", "save_strategy": "steps", "save_steps": 1,
        "logging_steps": 1, "seed": 0, "disable_tqdm": True, **overrides,
    }  # fmt: skip
    if method == "adaptive":  # two EMA annotators, and minority scores from step 2 on: their state must resume too
        settings.update(annotator_ema_decays=[0.5, 0.9], minority_warmup_steps=1)
    return trainer_class(
        model=model,
        args=config_class(**settings),
        train_dataset=load_from_disk(str(dataset_dir)),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian") if peft else None,
    )


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    """Everything a resumed run must reproduce: the trainable weights, and the EMA annotators if any."""
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    for i, annotator in enumerate(getattr(trainer, "ema_annotators", [])):
        weights.update({f"annotator{i}.{name}": p.detach().clone() for name, p in annotator.named_parameters()})
    if trainer.is_peft:  # LoRA annotators are frozen adapters on the same network
        weights.update({name: p.detach().clone() for name, p in trainer.model.named_parameters() if ".ema_" in name})
    return weights


class _PrintSteps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {state.global_step}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    for name in ("method", "model", "dataset_dir", "output_dir"):
        parser.add_argument(name)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-while-saving", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = build_trainer(args.method, args.model, args.dataset_dir, args.output_dir, peft=not args.full)
    trainer.add_callback(_PrintSteps())
    if args.kill_while_saving is not None:
        save_model = trainer.save_model

        def save_then_die(output_dir=None, _internal_call=False):
            save_model(output_dir, _internal_call)
            if str(output_dir).endswith(f"checkpoint-{args.kill_while_saving}"):
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.save_model = save_then_die
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print("DONE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
