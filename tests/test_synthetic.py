"""The synthetic task: pictures whose properties vary independently, rule-based rewards, pairs labelled by any reward,
and the cache of the pre-trained base model."""

import io
import json
import os

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from trl_diffusion.evaluation import saturation_scorer
from trl_diffusion.testing.synthetic import (
    HUES,
    REWARDS,
    SIZE,
    TRAIN_COLOURS,
    brightness_scorer,
    caption,
    frame_scorer,
    get_reward,
    is_mirror_invariant,
    pretrain_base_model,
    render_squares,
    rightness_scorer,
    self_generated_pairs,
    size_scorer,
    texture_scorer,
)


def picture(side: int, top: int, left: int, square=(255, 0, 0), background=(40, 40, 40)) -> Image.Image:
    pixels = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[:] = background
    pixels[top : top + side, left : left + side] = square
    return Image.fromarray(pixels)


def test_rewards_measure_what_they_say_on_known_pictures():
    small, large = picture(4, 1, 1), picture(10, 3, 3)
    np.testing.assert_allclose(size_scorer([small, large]), [16 / 256, 100 / 256])
    left, right = picture(4, 6, 1), picture(4, 6, 11)
    np.testing.assert_allclose(rightness_scorer([left, right]), [2.5 / 15, 12.5 / 15])
    dark, bright = picture(6, 5, 5, square=(100, 100, 100)), picture(6, 5, 5, square=(250, 250, 250))
    assert brightness_scorer([dark])[0] == pytest.approx((36 * 100 + 220 * 40) / 256 / 255, rel=1e-6)
    assert brightness_scorer([bright])[0] > brightness_scorer([dark])[0]
    flat = Image.new("RGB", (SIZE, SIZE), (90, 90, 90))
    noisy = Image.fromarray(np.random.default_rng(0).integers(60, 120, (SIZE, SIZE, 3), dtype=np.uint8))
    assert texture_scorer([flat])[0] == 0 and texture_scorer([noisy])[0] > 0.05
    np.testing.assert_allclose(get_reward("-size")([small, large]), -size_scorer([small, large]))
    assert get_reward("saturation") is saturation_scorer
    with pytest.raises(ValueError, match="Unknown reward 'sharpness'.*brightness"):
        get_reward("sharpness")


def test_mirror_invariance_tells_which_rewards_survive_random_flip():
    mirror_invariant = {name: is_mirror_invariant(get_reward(name)) for name in REWARDS}
    assert mirror_invariant == {name: name != "rightness" for name in REWARDS}
    assert is_mirror_invariant(frame_scorer) and not is_mirror_invariant(get_reward("-rightness"))


def test_rendered_pictures_vary_independently_in_every_property():
    rng = np.random.default_rng(0)
    colours = list(rng.choice(list(HUES), 512))
    images = [Image.fromarray(image) for image in render_squares(colours, rng)]
    scores = {name: np.asarray(reward(images, None)) for name, reward in REWARDS.items()}
    for name, values in scores.items():
        low, high, top = np.percentile(values, [10, 90, 99])
        assert high - low > 0.2 * top > 0, name  # a wide spread, not a near-constant
    # Properties are drawn independently; the rewards that read them overlap (a larger square has longer edges, so
    # more texture), but none is a function of another, so each preference asks for something of its own.
    names = list(scores)
    correlation = np.corrcoef([scores[name] for name in names])
    off_diagonal = correlation[~np.eye(len(names), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.75, dict(zip(names, correlation.round(2).tolist(), strict=True))
    # The square never touches the outer ring, which is what the size and position rewards read the background from.
    pixels = render_squares(colours, np.random.default_rng(1), saturation_range=(1.0, 1.0)).astype(int)
    ring = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    assert (np.ptp(ring, axis=-1) < 100).all()  # grey plus noise, never the saturated square (a range of 140 or more)


def green(images, prompts):
    """A reward this module does not know: the mean green channel."""
    return np.asarray([np.asarray(image.convert("RGB"))[..., 1].mean() for image in images])


@pytest.mark.parametrize("pairing", ["split", "random"])
def test_self_generated_pairs_are_labelled_by_the_given_reward(tiny_sd, pairing):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    dataset = self_generated_pairs(pipeline, 12, seed=3, reward=green, num_inference_steps=2, pairing=pairing)
    assert len(dataset) == 12 and set(dataset["caption"]) <= {caption(colour) for colour in TRAIN_COLOURS}
    decode = [[Image.open(io.BytesIO(row[column])) for row in dataset] for column in ("jpg_0", "jpg_1")]
    np.testing.assert_allclose(green(decode[0], None), dataset["reward_0"])
    np.testing.assert_allclose(green(decode[1], None), dataset["reward_1"])
    rewards = np.asarray([dataset["reward_0"], dataset["reward_1"]])
    assert dataset["label_0"] == np.where(rewards[0] == rewards[1], 0.5, rewards[0] > rewards[1]).tolist()
    if pairing == "split":  # every chosen image ranks in the upper half of its caption's images, every rejected below
        chosen, rejected = rewards.max(axis=0), rewards.min(axis=0)
        for prompt in set(dataset["caption"]):
            rows = np.asarray(dataset["caption"]) == prompt
            assert chosen[rows].min() >= rejected[rows].max()
        assert 0 < np.mean(dataset["label_0"]) < 1  # the chosen image is not always first
    with pytest.raises(ValueError, match="pairing"):
        self_generated_pairs(pipeline, 2, reward=green, num_inference_steps=1, pairing="best")


def test_pretrained_base_model_is_reused_only_for_the_same_settings(tmp_path):
    path = str(tmp_path / "base")
    pretrain_base_model(path, steps=3, batch_size=2, seed=0)
    marker = os.path.join(path, ".pretrained")
    assert json.loads(open(marker).read())["seed"] == 0
    weights = os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")
    first = os.path.getmtime(weights)
    pretrain_base_model(path, steps=3, batch_size=2, seed=0)
    assert os.path.getmtime(weights) == first
    pretrain_base_model(path, steps=3, batch_size=2, seed=1)  # another seed is another base model
    assert json.loads(open(marker).read())["seed"] == 1
    StableDiffusionPipeline.from_pretrained(path)
