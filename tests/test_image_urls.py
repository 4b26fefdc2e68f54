"""Image URLs fetched with a timeout and retries, against a local HTTP server (serving, stalling, 404)."""

import time

import pytest
import torch
from datasets import Dataset
from helpers.image_server import image_server
from helpers.rows import png_bytes
from peft import LoraConfig

from trl_diffusion import DiffusionDPOConfig, DiffusionDPOTrainer
from trl_diffusion.data import DiffusionPreferenceCollator, PreferenceDataset
from trl_diffusion.image_urls import ImageURLOptions, UnreachableImageError, fetch_url


RED, BLUE = png_bytes((200, 40, 40)), png_bytes((40, 40, 200))
# Half a second per attempt, one retry, no pause: a stalled URL fails in about 1 s (the server stalls 3 s)
FAST = ImageURLOptions(timeout=0.5, retries=1, backoff=0.0)


@pytest.fixture(scope="module")
def server():
    with image_server({"red.png": RED, "blue.png": BLUE}, stall_seconds=3.0, flaky_failures=1) as running:
        yield running


def _pairs(server, rejected: list[str]) -> Dataset:
    """Rows whose preferred image 0 is the red URL and image 1 the blue one at ``rejected[i]`` (a server path kind
    or a full path such as ``images/missing.png``)."""
    urls = [server.url(*(kind.split("/") if "/" in kind else (kind, "blue.png"))) for kind in rejected]
    return Dataset.from_dict(
        {
            "jpg_0": [server.url("images", "red.png")] * len(rejected),
            "jpg_1": urls,
            "label_0": [1.0] * len(rejected),
            "caption": [f"pair {i}" for i in range(len(rejected))],
        }
    )


def test_a_url_is_fetched(server):
    assert fetch_url(server.url("images", "red.png"), FAST, 0, "jpg_0") == RED


def test_a_404_fails_at_once_naming_row_column_and_url(server):
    url = server.url("images", "missing.png")
    with pytest.raises(
        UnreachableImageError, match=r"Row 3, column 'jpg_1': unreachable image URL .*missing.*HTTP 404"
    ):
        fetch_url(url, ImageURLOptions(timeout=0.5, retries=3, backoff=0.0), 3, "jpg_1")
    assert server.requests.count("/images/missing.png") == 1  # a retry cannot fix a 404


def test_a_stalled_url_times_out_on_every_attempt(server):
    start = time.monotonic()
    with pytest.raises(
        UnreachableImageError, match=r"Row 5, column 'jpg_0'.* after 2 attempt\(s\) \(timed out; timed out"
    ):
        fetch_url(server.url("stall", "red.png"), FAST, 5, "jpg_0")
    assert server.requests.count("/stall/red.png") == 2
    assert time.monotonic() - start < 2.5  # two 0.5 s timeouts, not the server's 3 s stall


def test_a_transient_failure_is_retried_after_the_backoff(server):
    start = time.monotonic()
    assert (
        fetch_url(server.url("flaky", "blue.png"), ImageURLOptions(timeout=1, retries=2, backoff=0.2), 0, "c") == BLUE
    )
    assert server.requests.count("/flaky/blue.png") == 2  # a 503, then the image
    assert time.monotonic() - start >= 0.2


def test_url_options_are_checked():
    with pytest.raises(ValueError, match="image_url_timeout must be positive"):
        ImageURLOptions(timeout=0)
    with pytest.raises(ValueError, match="image_url_retries must be at least 0"):
        DiffusionDPOConfig(output_dir="unused", image_url_retries=-1, report_to="none")


def test_url_columns_load_as_images(server):
    dataset = PreferenceDataset(_pairs(server, ["images", "images"]), resolution=8, url_options=FAST)
    example = dataset[1]
    chosen, rejected = example["chosen_pixel_values"], example["rejected_pixel_values"]
    assert chosen[0].mean() > chosen[2].mean() and rejected[2].mean() > rejected[0].mean()


def test_an_unreachable_url_raises_naming_row_and_column_or_is_skipped_and_counted(server):
    data = _pairs(server, ["images", "images/missing.png", "stall"])
    strict = PreferenceDataset(data, resolution=8, url_options=FAST)
    with pytest.raises(UnreachableImageError, match=r"Row 1, column 'jpg_1'.*HTTP 404"):
        strict[1]
    with pytest.raises(UnreachableImageError, match=r"Row 2, column 'jpg_1'.*timed out"):
        strict[2]
    options = ImageURLOptions(timeout=0.5, retries=0, skip_unreachable=True)
    skipping = PreferenceDataset(data, resolution=8, url_options=options)
    examples = [skipping[i] for i in range(3)]
    assert examples[1] is None and examples[2] is None
    assert int(DiffusionPreferenceCollator()(examples)["num_skipped"]) == 2


def test_training_fetches_urls_in_loader_workers_and_counts_unreachable_ones(tiny_sd, server, tmp_path):
    """Two of four pairs have an unreachable rejected image (a 404, a stall): skipped, counted, training goes on.

    Without the encoding cache the worker fetches each URL when its pair is loaded (with the cache, the cache build
    fetches them once, before training)."""
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        resolution=16,
        dataloader_num_workers=1,
        dataloader_pin_memory=False,
        precompute_encodings=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        skip_unreachable_urls=True,
        image_url_timeout=0.5,
        image_url_retries=0,
    )
    trainer = DiffusionDPOTrainer(
        model=tiny_sd,
        args=args,
        train_dataset=_pairs(server, ["images", "images/missing.png", "images", "stall"]),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)
    logged = [entry["data/skipped_rows"] for entry in trainer.state.log_history if "data/skipped_rows" in entry]
    assert logged == [1, 2]
