"""The TRL-style scripts, their YAML configs, `DiffusionModelConfig`, dataset loading and the `trl-diffusion` CLI."""

import glob
import os
import sys

import pytest
import yaml
from datasets import IterableDataset, load_dataset
from helpers.runs import REPO, TINY_DATASET, TINY_YAML, run, run_in_process, tiny_args
from huggingface_hub import ModelCard

from trl_diffusion import DiffusionModelConfig
from trl_diffusion.model_config import get_peft_config, resolve_model_path
from trl_diffusion.scripts import cli
from trl_diffusion.scripts.utils import load_preference_dataset, select_split


CONFIGS = os.path.join(REPO, "trl_diffusion", "accelerate_configs")


@pytest.mark.parametrize(
    ("command", "overrides"),
    [
        ("dpo", []),
        ("mapo", ["--beta", "0.1"]),
        ("adaptive-dpo", ["--beta", "1000", "--save_minority_scores", "true"]),
        ("kto", ["--beta", "1000"]),
    ],
)
def test_each_script_trains_on_the_bundled_tiny_set(command, overrides, cache_dir, tmp_path):
    trainer = run_in_process(command, tiny_args(tmp_path, "--max_steps", "2", *overrides))
    assert trainer.state.global_step == 2
    assert trainer.train_dataset_stats.num_ties == 3  # the bundled set has 3 ties, dropped and counted
    files = set(os.listdir(tmp_path))
    assert {"pytorch_lora_weights.safetensors", "README.md", "training_config.json", "images"} <= files
    card = ModelCard.load(str(tmp_path / "README.md"))
    assert [entry["text"] for entry in card.data.widget] == ["a red square", "a blue square"]
    if command == "adaptive-dpo":
        assert "minority_scores.csv" in files


def test_the_documented_command_trains_on_cpu(cache_dir, tmp_path):
    """`trl-diffusion dpo --config examples/scripts/sd15_dpo_tiny.yaml`, from the repository root."""
    output = run(
        [sys.executable, "-m", "trl_diffusion.scripts.cli", "dpo", "--config", "examples/scripts/sd15_dpo_tiny.yaml"]
        + ["--output_dir", str(tmp_path / "out")],
        cache_dir,
    )
    assert "Training completed." in output and "Dropped 3 tied pairs" in output
    assert os.path.isfile(tmp_path / "out" / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "examples", "scripts", "*.yaml"))))
def test_example_configs_parse_with_their_script(path):
    name = os.path.basename(path)
    command = "mapo" if "mapo" in name else "adaptive" if "adaptive" in name else "kto" if "kto" in name else "dpo"
    module = __import__(f"trl_diffusion.scripts.{cli.COMMANDS[command][0]}", fromlist=["make_parser"])
    # bf16 needs a GPU: the CPU test machine overrides it from the command line, as a user would.
    *parsed, config_remaining, cli_remaining = module.make_parser().parse_args_and_config(
        ["--config", path, "--bf16", "false"], return_remaining_strings=True, separate_remaining_strings=True
    )
    script_args, training_args, model_args = parsed
    assert cli_remaining == []
    assert config_remaining in ([], ["--num_processes", "1"])  # only launcher keys may be left to accelerate
    assert model_args.model_name_or_path and script_args.dataset_name
    with open(path) as f:
        keys = set(yaml.safe_load(f))
    assert "beta" in keys and "output_dir" in keys


def test_cli_splits_launcher_and_script_arguments():
    args = ["--config", TINY_YAML, "--accelerate_config", "zero2", "--num_processes", "2", "--beta", "100"]
    launch_args, script_args = cli.split_arguments("dpo", args)
    assert launch_args[:2] == ["--config_file", os.path.join(CONFIGS, "zero2.yaml")]
    # The YAML's `num_processes: 1` goes to accelerate too; the command line's value comes later and wins.
    assert launch_args[2:] == ["--num_processes", "1", "--num_processes", "2"]
    assert script_args == ["--config", TINY_YAML, "--beta", "100"]
    with pytest.raises(ValueError, match="neither a file nor a packaged config"):
        cli.split_arguments("dpo", ["--config", TINY_YAML, "--accelerate_config", "zero9"])


def test_cli_relaunches_the_script_through_accelerate(monkeypatch):
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    assert (
        cli.main(["adaptive-dpo", "--config", TINY_YAML, "--accelerate_config", "fsdp2", "--num_processes", "4"]) == 0
    )
    (args,) = launched
    assert args.config_file == os.path.join(CONFIGS, "fsdp2.yaml") and args.num_processes == 4
    assert args.training_script == os.path.join(REPO, "trl_diffusion", "scripts", "adaptive_dpo.py")
    assert args.training_script_args == ["--config", TINY_YAML]


def test_cli_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("dpo", "mapo", "adaptive-dpo", "kto"))


def test_packaged_accelerate_configs():
    from accelerate.commands.config.config_args import ClusterConfig

    expected = {
        "single_gpu": "NO",
        "multi_gpu": "MULTI_GPU",
        "zero2": "DEEPSPEED",
        "zero3": "DEEPSPEED",
        "fsdp2": "FSDP",
    }
    packaged = cli.packaged_accelerate_configs()
    for name, distributed_type in expected.items():
        assert packaged[name] == os.path.join(CONFIGS, f"{name}.yaml")
        config = ClusterConfig.from_yaml_file(packaged[name])
        assert str(config.distributed_type).split(".")[-1] == distributed_type, name
    assert ClusterConfig.from_yaml_file(packaged["zero3"]).deepspeed_config["zero_stage"] == 3
    assert ClusterConfig.from_yaml_file(packaged["fsdp2"]).fsdp_config["fsdp_version"] == 2
    assert "zero1" in packaged and "fsdp1" in packaged  # TRL's, for the names trl_diffusion does not ship


def test_model_config_and_peft_config():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(DiffusionModelConfig).parse_args_into_dataclasses(
        ["--model_name_or_path", "tiny-sd", "--use_peft", "--lora_r", "16", "--lora_target_modules", "to_q", "to_v"]
    )
    peft_config = get_peft_config(config)
    assert peft_config.r == 16 and peft_config.lora_alpha == 8 and set(peft_config.target_modules) == {"to_q", "to_v"}
    assert peft_config.init_lora_weights == "gaussian"
    assert get_peft_config(DiffusionModelConfig(model_name_or_path="x")) is None
    assert DiffusionModelConfig(lora_target_modules=["all-linear"]).lora_target_modules == "all-linear"
    with pytest.raises(ValueError, match="dtype"):
        DiffusionModelConfig(dtype="int8")


def test_tiny_model_names_resolve_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    path = resolve_model_path("tiny-sd")
    assert path == str(tmp_path / "cache" / "tiny-sd") and os.path.isfile(os.path.join(path, "model_index.json"))
    stamp = os.path.getmtime(os.path.join(path, "model_index.json"))
    assert resolve_model_path("tiny-sd") == path and os.path.getmtime(os.path.join(path, "model_index.json")) == stamp
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"
    monkeypatch.chdir(tmp_path)
    os.makedirs("tiny-sd")  # a local folder of that name takes precedence
    assert resolve_model_path("tiny-sd") == "tiny-sd"


def test_dataset_loading_accepts_folders_files_and_saved_datasets(tmp_path):
    from trl import ScriptArguments

    folder = load_preference_dataset(ScriptArguments(dataset_name=TINY_DATASET))
    assert set(folder) == {"train", "test"} and len(folder["train"]) == 48
    single = load_preference_dataset(ScriptArguments(dataset_name=os.path.join(TINY_DATASET, "test.parquet")))
    assert len(single["train"]) == 8
    load_dataset(TINY_DATASET)["test"].save_to_disk(str(tmp_path / "saved"))
    saved = load_preference_dataset(ScriptArguments(dataset_name=str(tmp_path / "saved")))
    assert len(saved["train"]) == 8
    assert len(select_split(folder, "train[:10]")) == 10 and len(select_split(folder, "train[40:]")) == 8
    with pytest.raises(ValueError, match="no split"):
        select_split(folder, "validation")
    mapped = {TINY_DATASET: folder, str(tmp_path / "saved"): saved}
    for name, dataset in mapped.items():  # streamed by load_dataset; a saved dataset as a one-shard stream
        streamed = load_preference_dataset(ScriptArguments(dataset_name=name, dataset_streaming=True))
        assert isinstance(streamed["train"], IterableDataset)
        captions = [row["caption"] for row in select_split(streamed, "train[2:5]")]
        assert captions == dataset["train"]["caption"][2:5]
    with pytest.raises(ValueError, match="cannot count from its end"):
        select_split(streamed, "train[-4:]")


NEW_FAMILY_YAMLS = [
    pytest.param("z_image", "tiny-z-image", "ZImagePipeline", id="z_image"),
    pytest.param("qwen_image", "tiny-qwen-image", "QwenImagePipeline", id="qwen_image", marks=pytest.mark.slow),
    pytest.param("flux2_klein", "tiny-flux2-klein", "Flux2KleinPipeline", id="flux2_klein", marks=pytest.mark.slow),
    pytest.param("flux2", "tiny-flux2", "Flux2Pipeline", id="flux2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "tiny_model", "pipeline_class"), NEW_FAMILY_YAMLS)
def test_family_yaml_trains_the_tiny_model_through_the_cli(name, tiny_model, pipeline_class, cache_dir, tmp_path):
    """`trl-diffusion dpo --config examples/scripts/<family>_dpo.yaml` on the family's offline tiny model saves an
    adapter that the family's own pipeline class loads."""
    import diffusers

    overrides = ["--model_name_or_path", tiny_model, "--dataset_name", TINY_DATASET, "--resolution", "16"]
    overrides += ["--max_steps", "2", "--bf16", "false", "--dtype", "float32", "--dataloader_num_workers", "0"]
    overrides += ["--report_to", "none", "--validation_inference_steps", "2", "--output_dir", str(tmp_path / "out")]
    command = [sys.executable, "-m", "trl_diffusion.scripts.cli", "dpo"]
    output = run(command + ["--config", f"examples/scripts/{name}_dpo.yaml", *overrides], cache_dir)
    assert "Training completed." in output
    pipeline = getattr(diffusers, pipeline_class).from_pretrained(resolve_model_path(tiny_model))
    pipeline.load_lora_weights(str(tmp_path / "out"))
    assert pipeline.transformer.peft_config and len(pipeline.get_list_adapters()["transformer"]) == 1
