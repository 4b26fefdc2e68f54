"""What the three training scripts share: their arguments, the parser, dataset loading and the training run."""

import logging
import os
from dataclasses import dataclass, field

from trl import ScriptArguments, TrlParser

from ..model_config import DiffusionModelConfig, get_peft_config, load_pipeline, resolve_model_path


logger = logging.getLogger(__name__)


@dataclass
class DiffusionScriptArguments(ScriptArguments):
    """TRL's `trl.ScriptArguments` plus the validation images of a diffusion run.

    TRL's fields name the data: `dataset_name`, `dataset_config`, `dataset_train_split`, `dataset_test_split`...

    Args:
        validation_prompts: Prompts to generate images for with the policy every `validation_steps` optimizer steps and
            at the end of training. The images are logged to the trackers, saved under `output_dir/images/` and shown
            as widget images in the model card. Defaults to `None`.
        validation_steps: Generate validation images every this many steps; `0` only at the end of training. Defaults
            to `0`.
        validation_inference_steps: Denoising steps of each validation image. Defaults to `25`.
        validation_guidance_scale: Classifier-free guidance scale of the validation images; `None` keeps the pipeline's
            default. Defaults to `None`.
    """

    validation_prompts: list[str] | None = field(
        default=None, metadata={"help": "Prompts of the validation images (logged, saved and put in the model card)."}
    )
    validation_steps: int = field(
        default=0, metadata={"help": "Generate validation images every N steps; 0: only at the end."}
    )
    validation_inference_steps: int = field(default=25, metadata={"help": "Denoising steps per validation image."})
    validation_guidance_scale: float | None = field(
        default=None, metadata={"help": "Guidance scale of the validation images (None: the pipeline's default)."}
    )


def make_script_parser(config_class, name: str, help_text: str, subparsers=None, prog: str | None = None):
    """A `TrlParser` over (`DiffusionScriptArguments`, the method's config, `DiffusionModelConfig`)."""
    dataclass_types = (DiffusionScriptArguments, config_class, DiffusionModelConfig)
    if subparsers is not None:
        return subparsers.add_parser(name, help=help_text, dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")
    )


def load_preference_dataset(script_args: ScriptArguments, skip_invalid_rows: bool = False):
    """``datasets.load_dataset(dataset_name, name=dataset_config)``: a Hub id, a local data folder or file(s).

    A folder written by ``save_to_disk`` is read with ``load_from_disk``, which ``load_dataset`` refuses, and a folder
    of pairs (``chosen/``, ``rejected/``, ``captions/``; see `trl_diffusion.pair_folders`) with
    `load_pair_folder` (``skip_invalid_rows`` leaves out, and counts, its bad pairs). With ``dataset_streaming`` the
    splits are `datasets.IterableDataset` streams: a Hub or data-file dataset is streamed by ``load_dataset``, a local
    folder is read as a one-shard stream.
    """
    import datasets

    from ..pair_folders import is_pair_folder, load_pair_folder

    if not script_args.dataset_name:
        raise ValueError("dataset_name is required: a Hub dataset id, a local folder or a data file.")
    name, streaming = script_args.dataset_name, script_args.dataset_streaming
    if is_pair_folder(name):
        dataset = datasets.DatasetDict(train=load_pair_folder(name, skip_invalid_rows=skip_invalid_rows))
    elif _is_saved_to_disk(name):
        dataset = datasets.load_from_disk(name)
        dataset = dataset if isinstance(dataset, datasets.DatasetDict) else datasets.DatasetDict(train=dataset)
    elif os.path.isfile(name):
        extension = os.path.splitext(name)[1].lstrip(".")
        builder = {"jsonl": "json", "pq": "parquet"}.get(extension, extension)
        return datasets.load_dataset(builder, data_files={"train": name}, streaming=streaming)
    else:
        return datasets.load_dataset(name, name=script_args.dataset_config, streaming=streaming)
    if streaming:
        return datasets.IterableDatasetDict({split: part.to_iterable_dataset() for split, part in dataset.items()})
    return dataset


def select_split(dataset, split: str):
    """``dataset[split]``, accepting slicing syntax such as ``train[:1000]`` (``skip``/``take`` on a stream)."""
    if split in dataset:
        return dataset[split]
    import re

    import datasets

    match = re.fullmatch(r"(\w+)\[(-?\d*):(-?\d*)\]", split)
    if match and match.group(1) in dataset:
        full = dataset[match.group(1)]
        start, stop = (int(value) if value else None for value in match.group(2, 3))
        if isinstance(full, datasets.IterableDataset):
            if (start or 0) < 0 or (stop is not None and stop < 0):
                raise ValueError(f"A streamed split has no length: {split!r} cannot count from its end.")
            part = full.skip(start) if start else full
            return part.take(stop - (start or 0)) if stop is not None else part
        return full.select(range(*slice(start, stop).indices(len(full))))
    raise ValueError(f"The dataset has no split {split!r}; it has {list(dataset)}.")


def run_training(trainer_class, script_args, training_args, model_args):
    """Load the pipeline and the dataset, train, save (and push) the result; return the trainer."""
    from ..callbacks import ValidationImagesCallback

    if getattr(training_args, "load_in_4bit", False) or getattr(training_args, "load_in_8bit", False):
        # QLoRA: the trainer loads the denoiser quantized itself, from the path.
        model = resolve_model_path(model_args.model_name_or_path)
    else:
        model = load_pipeline(model_args)
    dataset = load_preference_dataset(script_args, skip_invalid_rows=training_args.skip_invalid_rows)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = select_split(dataset, script_args.dataset_test_split)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=select_split(dataset, script_args.dataset_train_split),
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )
    if script_args.validation_prompts:
        trainer.add_callback(
            ValidationImagesCallback(
                trainer,
                prompts=script_args.validation_prompts,
                every_n_steps=script_args.validation_steps,
                num_inference_steps=script_args.validation_inference_steps,
                guidance_scale=script_args.validation_guidance_scale,
            )
        )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    # A local dataset path is not a Hub dataset id: only a Hub id goes into the card's `datasets` metadata.
    dataset_name = None if os.path.exists(script_args.dataset_name) else script_args.dataset_name
    if dataset_name:
        trainer.create_model_card(dataset_name=dataset_name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()  # finish the trackers and destroy the process group
    return trainer


def run_script(make_parser, main, argv: list[str] | None = None):
    """Parse ``argv`` (the command line when `None`) as a script does, flags and a YAML ``--config`` (arguments it
    does not know are left for `accelerate launch`), and call the script's ``main`` with the parsed dataclasses.

    Args:
        make_parser: The script's ``make_parser``.
        main: The script's ``main``, called with the parsed dataclasses in the parser's order.
        argv: The arguments, without the program name.

    Returns:
        What ``main`` returns (the trainer of a training script).
    """
    return main(*make_parser().parse_args_and_config(argv, fail_with_unknown_args=False))
