"""The Hub model card (README.md) written beside every saved model or LoRA adapter."""

import os
from importlib.resources import files
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


TEMPLATE = files("trl_diffusion") / "templates" / "model_card.md"


def _usage_snippet(
    pipeline_class: str, base_model: str, repo: str, is_lora: bool, denoiser_class: str, denoiser_name: str
) -> str:
    if is_lora:
        return "\n".join(
            [
                "import torch",
                f"from diffusers import {pipeline_class}",
                "",
                f'pipeline = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.bfloat16)',
                f'pipeline.load_lora_weights("{repo}")',
                'image = pipeline(prompt="a photo of an astronaut riding a horse").images[0]',
            ]
        )
    return "\n".join(
        [
            "import torch",
            f"from diffusers import {pipeline_class}, {denoiser_class}",
            "",
            f'{denoiser_name} = {denoiser_class}.from_pretrained("{repo}", torch_dtype=torch.bfloat16)',
            f"pipeline = {pipeline_class}.from_pretrained(",
            f'    "{base_model}", {denoiser_name}={denoiser_name}, torch_dtype=torch.bfloat16',
            ")",
            'image = pipeline(prompt="a photo of an astronaut riding a horse").images[0]',
        ]
    )


def write_model_card(
    output_dir: str,
    base_model: str,
    pipeline_class: str,
    method_name: str,
    paper: dict,
    tags: list[str],
    hyperparameters: dict[str, Any],
    dataset_name: str | None = None,
    is_lora: bool = True,
    hub_model_id: str | None = None,
    denoiser_class: str = "UNet2DConditionModel",
    denoiser_name: str = "unet",
    widget: list[dict] | None = None,
    instance_prompt: str | None = None,
) -> ModelCard:
    """Write ``README.md`` with YAML metadata (base model, tags, datasets) and a usage snippet, and return the card.

    ``base_model`` is only written to the metadata when it looks like a Hub id (not a local folder). ``widget`` lists
    example images for the Hub's gallery (``{"text": prompt, "output": {"url": relative path}}``); by default it is
    read from the validation images a `ValidationImagesCallback` left in ``output_dir/images/``. ``instance_prompt``
    is the trigger phrase the Hub's inference widget prefills; a preference-tuned adapter has none, so it is only
    written when given.
    """
    if widget is None:
        from .callbacks import read_widget

        widget = read_widget(output_dir)
    repo = hub_model_id or os.path.basename(os.path.abspath(output_dir))
    base_is_hub_id = not os.path.isdir(base_model)
    card_data = ModelCardData(
        base_model=base_model if base_is_hub_id else None,
        library_name="diffusers",
        license=None,
        tags=list(dict.fromkeys([*tags, "diffusers", "text-to-image"])),
        datasets=[dataset_name] if dataset_name else None,
        pipeline_tag="text-to-image",
        widget=widget or None,
        instance_prompt=instance_prompt,
    )
    kind = "LoRA adapter" if is_lora else "fine-tuned denoiser"
    paper_link = (
        f"[{paper.get('title', method_name)}](https://arxiv.org/abs/{paper['id']})" if paper.get("id") else method_name
    )
    rows = "\n".join(f"| {key} | {value} |" for key, value in hyperparameters.items())
    body = TEMPLATE.read_text().format(
        title=f"{repo}: {method_name} {kind}",
        summary=f"A {kind} for `{base_model}`, trained with {method_name} on human preference data.",
        usage=_usage_snippet(pipeline_class, base_model, repo, is_lora, denoiser_class, denoiser_name),
        method_name=method_name,
        paper_link=paper_link,
        base_model_link=f"[{base_model}](https://huggingface.co/{base_model})"
        if base_is_hub_id
        else f"`{base_model}`",
        dataset_line=f"[{dataset_name}](https://huggingface.co/datasets/{dataset_name})"
        if dataset_name
        else "not recorded",
        hyperparameter_rows=rows,
        citation=paper.get("citation", "").strip(),
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    card.save(os.path.join(output_dir, "README.md"))
    return card
