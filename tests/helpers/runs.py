"""Running the training scripts in the test process and under `accelerate launch`, on the bundled tiny data."""

import importlib
import os
import subprocess
import sys

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from trl_diffusion.scripts.cli import COMMANDS, resolve_command, script_path
from trl_diffusion.trainer.base_trainer import LORA_WEIGHT_NAME


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_YAML = os.path.join(REPO, "examples", "scripts", "sd15_dpo_tiny.yaml")
TINY_DATASET = os.path.join(REPO, "examples", "data", "pickapic_tiny")
SHIM = os.path.join(REPO, "tests", "helpers", "cpu_engine_shim.py")

# Plain SGD: Adam normalises each update, so a gradient off by a constant factor (a wrong average over processes)
# would still give nearly the same weights. With SGD the weights are proportional to the summed gradients.
STRICT = [
    "--optim", "sgd", "--lr_scheduler_type", "constant", "--random_flip", "false", "--max_steps", "4",
    "--logging_steps", "1", "--validation_prompts", "a red square",
]  # fmt: skip


def tiny_args(output_dir, *overrides: str) -> list[str]:
    """Arguments of a script run on the tiny YAML, writing to ``output_dir``."""
    return ["--config", TINY_YAML, "--dataset_name", TINY_DATASET, "--output_dir", str(output_dir), *overrides]


def run_in_process(command: str, args: list[str]):
    """Run the script of the `trl-diffusion` ``command`` in this process, through its ``cli_main``; return the
    trainer."""
    module_name, _ = COMMANDS[resolve_command(command)]
    return importlib.import_module(f"trl_diffusion.scripts.{module_name}").cli_main(args)


def subprocess_env(cache_dir) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TRL_DIFFUSION_CACHE=str(cache_dir),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])),
    )
    return env


def run(command: list[str], cache_dir, timeout: int = 300) -> str:
    """Run a command from the repository root; fail with its output if it fails; return stdout and stderr."""
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output[-6000:]}"
    return output


def accelerate_launch(launch_args: list[str], command: str, args: list[str], cache_dir) -> str:
    """``accelerate launch LAUNCH_ARGS tests/helpers/cpu_engine_shim.py SCRIPT ARGS`` (see the shim)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, SHIM, script_path(command)]
    return run(launcher + args, cache_dir)


def load_weights(output_dir) -> dict[str, torch.Tensor]:
    for name in (LORA_WEIGHT_NAME, SAFETENSORS_WEIGHTS_NAME):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            return load_file(path)
    raise FileNotFoundError(f"No weights in {output_dir}: {os.listdir(output_dir)}")


def assert_same_weights(expected_dir, actual_dir, atol: float = 1e-5):
    expected, actual = load_weights(expected_dir), load_weights(actual_dir)
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=atol, msg=key)
