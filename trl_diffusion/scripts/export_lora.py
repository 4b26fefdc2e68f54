"""`trl-diffusion export-lora PATH`: write a diffusers LoRA in the kohya key format (ComfyUI, Forge, kohya).

```bash
trl-diffusion export-lora sdxl-dpo                      # writes sdxl-dpo/pytorch_lora_weights_kohya.safetensors
trl-diffusion export-lora sdxl-dpo/pytorch_lora_weights.safetensors --output ~/ComfyUI/models/loras/sdxl-dpo.safetensors
```
Trainers write the same file at every save with `save_lora_format: [diffusers, kohya]`.
"""

import argparse
import os


def make_parser(prog: str | None = "trl-diffusion export-lora") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a saved diffusers LoRA in the kohya key format (ComfyUI, Forge, kohya's scripts).",
    )
    parser.add_argument("path", help="A saved LoRA folder, or its pytorch_lora_weights.safetensors file.")
    parser.add_argument(
        "--output",
        default=None,
        help="Output file (default: pytorch_lora_weights_kohya.safetensors beside the input).",
    )
    parser.add_argument("--format", default="kohya", choices=["kohya"], help="Key format to write.")
    return parser


def main(argv: list[str] | None = None) -> str:
    from trl_diffusion.lora_formats import KOHYA_WEIGHT_NAME, export_kohya_lora
    from trl_diffusion.trainer.base_trainer import LORA_WEIGHT_NAME

    args = make_parser().parse_args(argv)
    source = os.path.join(args.path, LORA_WEIGHT_NAME) if os.path.isdir(args.path) else args.path
    if not os.path.isfile(source):
        raise FileNotFoundError(f"No LoRA file at {source}.")
    output = args.output or os.path.join(os.path.dirname(source), KOHYA_WEIGHT_NAME)
    tensors = export_kohya_lora(source, output)
    print(f"Wrote {sum(key.endswith('.alpha') for key in tensors)} LoRA modules in the kohya format to {output}.")
    return output


if __name__ == "__main__":
    main()
