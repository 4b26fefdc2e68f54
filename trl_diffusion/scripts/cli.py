"""The `trl-diffusion` command: `trl-diffusion {dpo,mapo,adaptive,kto,generate-pairs} [--accelerate_config NAME]
ARGS`.

A method's command is its short name, the key of `trl_diffusion.trainer.METHODS` (`dpo`, `mapo`, `adaptive`, `kto`);
its script module is the method's full name (`diffusion_dpo.py`, `mapo.py`, `adaptive_dpo.py`, `diffusion_kto.py`).
`adaptive-dpo`, the command's former name, still works.

Like the `trl` command, it parses the script's arguments (flags and a YAML `--config`) once, hands everything that is
not a training argument (`--num_processes 2`, `--mixed_precision bf16`, ...) to `accelerate launch`, and relaunches
the script through it. `--accelerate_config` takes a YAML file or one of the names shipped in
`trl_diffusion/accelerate_configs` (`single_gpu`, `multi_gpu`, `zero2`, `zero3`, `fsdp2`), then TRL's own
(`zero1`, `fsdp1`). `trl-diffusion export-lora PATH` runs in the calling process.
"""

import importlib
import importlib.resources as resources
import sys
from argparse import ArgumentParser
from pathlib import Path


# CLI command (a method's short name, as in `METHODS`) -> script module in trl_diffusion.scripts
COMMANDS = {
    "dpo": ("diffusion_dpo", "Diffusion-DPO (Wallace et al. 2023)"),
    "mapo": ("mapo", "MaPO: margin-aware preference optimization, no reference (Hong et al. 2024)"),
    "adaptive": ("adaptive_dpo", "Minority-aware Adaptive-DPO (arXiv 2503.16921)"),
    "kto": ("diffusion_kto", "Diffusion-KTO: unpaired likes and dislikes (Li et al. 2024)"),
    "generate-pairs": ("generate_pairs", "On-policy preference pairs: sample a model, score with a reward model"),
}
# Other names a command answers to: alias -> command
COMMAND_ALIASES = {"adaptive-dpo": "adaptive"}
# Commands that run in this process, without `accelerate launch`: command -> (module, help)
LOCAL_COMMANDS = {"export-lora": ("export_lora", "Write a saved LoRA in the kohya format (ComfyUI, Forge, kohya)")}
ACCELERATE_CONFIG_PACKAGES = ("trl_diffusion.accelerate_configs", "trl.accelerate_configs")


def packaged_accelerate_configs() -> dict[str, str]:
    """Names and paths of the accelerate configs shipped with trl_diffusion (then TRL's, for names we lack)."""
    configs = {}
    for package in ACCELERATE_CONFIG_PACKAGES:
        try:
            folder = resources.files(package)
        except ModuleNotFoundError:
            continue
        for entry in folder.iterdir():
            if entry.name.endswith(".yaml"):
                configs.setdefault(entry.name.removesuffix(".yaml"), str(entry))
    return configs


def resolve_accelerate_config_argument(launch_args: list[str]) -> list[str]:
    """Turn ``--accelerate_config NAME_OR_PATH`` into accelerate's ``--config_file PATH``."""
    if "--accelerate_config" not in launch_args:
        return launch_args
    index = launch_args.index("--accelerate_config")
    if index + 1 >= len(launch_args):
        raise ValueError("Expected a file or a packaged config name after --accelerate_config.")
    name = launch_args[index + 1]
    if Path(name).is_file():
        path = name
    else:
        configs = packaged_accelerate_configs()
        if name not in configs:
            raise ValueError(
                f"Accelerate config {name!r} is neither a file nor a packaged config; packaged: {sorted(configs)}."
            )
        path = configs[name]
    return ["--config_file", path] + launch_args[:index] + launch_args[index + 2 :]


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` without the ordered ``subsequence`` (the launcher's flags, which the script must not see)."""
    remaining, pending = [], iter(subsequence)
    current = next(pending, None)
    for item in items:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            remaining.append(item)
    return remaining


def resolve_command(command: str) -> str:
    """The command an alias stands for (``adaptive-dpo`` is ``adaptive``); any other name unchanged."""
    return COMMAND_ALIASES.get(command, command)


def script_path(command: str) -> str:
    module, _ = COMMANDS[resolve_command(command)]
    return str(resources.files("trl_diffusion.scripts").joinpath(f"{module}.py"))


def split_arguments(command: str, args: list[str]) -> tuple[list[str], list[str]]:
    """``(accelerate launch arguments, script arguments)`` of a command line (``-h`` prints the help and exits)."""
    module = importlib.import_module(f"trl_diffusion.scripts.{COMMANDS[resolve_command(command)][0]}")
    parser = module.make_parser(prog=f"trl-diffusion {command}")
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        args, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    return launch_args, _subtract_subsequence(args, cli_remaining)


def launch(command: str, launch_args: list[str], training_args: list[str]) -> None:
    """Run the command's script through ``accelerate launch``."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    accelerate_args = launch_command_parser().parse_args(launch_args + [script_path(command)] + training_args)
    launch_command(accelerate_args)


def _build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="trl-diffusion",
        description="Align text-to-image diffusion models with pairwise preferences (TRL-style scripts).",
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(dest="command", help="available commands")
    aliases = {
        command: [alias for alias, target in COMMAND_ALIASES.items() if target == command] for command in COMMANDS
    }
    for name, (_, help_text) in {**COMMANDS, **LOCAL_COMMANDS}.items():
        subparsers.add_parser(name, aliases=aliases.get(name, []), help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.command is None:
        parser.print_help()
        return 0
    script_args = argv[argv.index(known.command) + 1 :]
    if known.command in LOCAL_COMMANDS:
        importlib.import_module(f"trl_diffusion.scripts.{LOCAL_COMMANDS[known.command][0]}").main(script_args)
        return 0
    launch_args, training_args = split_arguments(known.command, script_args)
    launch(known.command, launch_args, training_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
