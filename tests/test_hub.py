"""The Hub model card and `push_to_hub`, with huggingface_hub's HTTP client replaced so no request leaves the machine.

huggingface_hub sends every Hub request through one shared `httpx2.Client` made by a replaceable factory
(`huggingface_hub.set_client_factory`). The tests install a client whose transport is an `httpx2.MockTransport`: it
answers the repo-creation, YAML-validation, pre-upload and commit endpoints as the Hub does, and records what was
sent, so the assertions are on the exact files and bytes of the commit.
"""

import base64
import json
import os

import httpx2
import huggingface_hub
import pytest
import yaml
from diffusers import DiffusionPipeline
from helpers.rows import make_pickapic
from huggingface_hub import ModelCard
from peft import LoraConfig

from trl_diffusion import DiffusionDPOConfig, DiffusionDPOTrainer
from trl_diffusion.callbacks import ValidationImagesCallback


BASE_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class FakeHub:
    """A `MockTransport` handler that plays the Hub's side of `create_repo` + `upload_folder`."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.validated_yaml: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            name = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{name['organization']}/{name['name']}"})
        if path == "/api/validate-yaml":
            self.validated_yaml.append(json.loads(request.content)["content"])
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes, "commitOid": "0" * 40})
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            lfs = [line["value"]["path"] for line in lines if line["key"] == "lfsFile"]
            self.commits.append({"path": path, "header": header, "files": files, "lfs": lfs})
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            return httpx2.Response(
                200,
                json={"commitUrl": f"https://huggingface.co/{repo}/commit/abc", "commitOid": "a" * 40,
                      "pullRequestUrl": None},
            )  # fmt: skip
        return httpx2.Response(404, json={"error": f"unexpected request {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    try:
        yield hub
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


def _trainer(tiny_sd, output_dir, peft=True, validation=True, **overrides):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.register_to_config(_name_or_path=BASE_ID)  # as if loaded from the Hub
    args = DiffusionDPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=1,
        resolution=16,
        dataloader_num_workers=0,
        report_to="none",
        save_strategy="no",
        **overrides,
    )
    trainer = DiffusionDPOTrainer(
        model=pipeline,
        args=args,
        train_dataset=make_pickapic(4),
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian") if peft else None,
    )
    if validation:
        prompts = ["a red square", "a blue square"]
        trainer.add_callback(ValidationImagesCallback(trainer, prompts, num_inference_steps=2))
    return trainer


def test_push_to_hub_uploads_exactly_the_lora_folder_and_its_card(tiny_sd, tmp_path, fake_hub):
    trainer = _trainer(tiny_sd, tmp_path / "out", hub_model_id="me/sd-dpo")
    trainer.train()
    # Files that are not part of the model must stay home.
    (tmp_path / "out" / "notes.txt").write_text("not part of the model")
    (tmp_path / "out" / "images" / "scratch.png").write_bytes(b"not referenced by the card")
    os.makedirs(tmp_path / "out" / "checkpoint-1")
    (tmp_path / "out" / "checkpoint-1" / "optimizer.pt").write_bytes(b"\0")
    trainer.push_to_hub(dataset_name="yuvalkirstain/pickapic_v2")

    assert ("POST", "/api/repos/create") in fake_hub.requests
    assert all(host_path.startswith("/api/") for _, host_path in fake_hub.requests)
    (commit,) = fake_hub.commits
    assert commit["path"] == "/api/models/me/sd-dpo/commit/main"
    assert commit["header"]["summary"] == "End of training"
    assert commit["lfs"] == []
    assert sorted(commit["files"]) == [
        "README.md",
        "images/validation_0.png",
        "images/validation_1.png",
        "pytorch_lora_weights.safetensors",
        "training_config.json",
    ]
    for name, content in commit["files"].items():
        assert content == (tmp_path / "out" / name).read_bytes(), name
    # The card the Hub received is the one validated, with the dataset given to push_to_hub.
    readme = commit["files"]["README.md"].decode()
    assert fake_hub.validated_yaml == [readme]
    card = ModelCard(readme)
    assert card.data.datasets == ["yuvalkirstain/pickapic_v2"]
    assert [entry["output"]["url"] for entry in card.data.widget] == [
        "images/validation_0.png",
        "images/validation_1.png",
    ]


def test_model_card_yaml_metadata(tiny_sd, tmp_path):
    trainer = _trainer(tiny_sd, tmp_path / "out", beta=1234.0)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(dataset_name="yuvalkirstain/pickapic_v2", instance_prompt="a photo of sks")
    text = (tmp_path / "out" / "README.md").read_text()
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text.split("---\n")[1])
    card = ModelCard.load(str(tmp_path / "out" / "README.md"))
    assert card.data.to_dict() == metadata
    assert metadata["base_model"] == BASE_ID
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "text-to-image"
    assert metadata["datasets"] == ["yuvalkirstain/pickapic_v2"]
    assert metadata["instance_prompt"] == "a photo of sks"
    for tag in ("trl", "trl-diffusion", "diffusion-dpo", "lora", "diffusers", "text-to-image"):
        assert tag in metadata["tags"]
    assert metadata["widget"] == [
        {"text": "a red square", "output": {"url": "images/validation_0.png"}},
        {"text": "a blue square", "output": {"url": "images/validation_1.png"}},
    ]
    for entry in metadata["widget"]:
        assert (tmp_path / "out" / entry["output"]["url"]).is_file()
    assert "| beta | 1234.0 |" in card.text and "load_lora_weights" in card.text


def test_model_card_without_validation_has_no_widget_or_instance_prompt(tiny_sd, tmp_path):
    trainer = _trainer(tiny_sd, tmp_path / "out", validation=False)
    trainer.train()
    trainer.save_model()
    metadata = ModelCard.load(str(tmp_path / "out" / "README.md")).data.to_dict()
    assert "widget" not in metadata and "instance_prompt" not in metadata
    assert metadata["base_model"] == BASE_ID
    assert "images/validation_0.png" not in trainer.saved_model_files()


def test_push_to_hub_full_finetune_uploads_the_diffusers_denoiser(tiny_sd, tmp_path, fake_hub):
    trainer = _trainer(tiny_sd, tmp_path / "out", peft=False, validation=False, hub_model_id="me/sd-dpo-full")
    trainer.train()
    trainer.push_to_hub()
    (commit,) = fake_hub.commits
    assert sorted(commit["files"]) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "training_config.json",
    ]
    card = ModelCard(commit["files"]["README.md"].decode())
    assert "lora" not in card.data.tags and card.data.base_model == BASE_ID
