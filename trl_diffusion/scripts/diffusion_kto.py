"""
Diffusion-KTO (Li et al. 2024) on unpaired rows (prompt, image, label), or on a pairwise dataset it unpairs.

# LoRA on Stable Diffusion 1.5 from Pick-a-Pic pairs (each pair becomes a like and a dislike), 8 GPUs
```bash
accelerate launch --config_file multi_gpu.yaml trl_diffusion/scripts/diffusion_kto.py \
    --model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
    --dataset_name data-is-better-together/open-image-preferences-v1-binarized \
    --dataset_train_split train \
    --use_peft --lora_r 8 --lora_alpha 8 \
    --beta 1000 \
    --learning_rate 1e-5 \
    --per_device_train_batch_size 16 \
    --max_steps 2000 \
    --output_dir sd15-diffusion-kto
```

# A CPU smoke run on the bundled tiny data and the offline tiny model
```bash
trl-diffusion kto --config examples/scripts/sd15_kto_tiny.yaml
```
"""

import argparse


def main(script_args, training_args, model_args):
    from trl_diffusion import DiffusionKTOTrainer
    from trl_diffusion.scripts.utils import run_training

    return run_training(DiffusionKTOTrainer, script_args, training_args, model_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl_diffusion import DiffusionKTOConfig
    from trl_diffusion.scripts.utils import make_script_parser

    return make_script_parser(DiffusionKTOConfig, "kto", "Run Diffusion-KTO training", subparsers, prog)


def cli_main(argv: list[str] | None = None):
    """Parse ``argv`` (the command line when `None`) as the script's command line and run it: trains Diffusion-KTO.

    Tests and other programs call this rather than copy the ``__main__`` block. Returns the trainer.
    """
    from trl_diffusion.scripts.utils import run_script

    return run_script(make_parser, main, argv)


if __name__ == "__main__":
    cli_main()
