"""Video preference data: decoding (PyAV), shared clips and crops, row/column errors, and cached video latents."""

import random

import numpy as np
import pytest
import torch
from datasets import Dataset, Video
from helpers.trainers import wan_args
from helpers.videos import make_video_pairs, moving_square
from PIL import Image

from trl_diffusion import DiffusionPreferenceCollator, MaPOTrainer
from trl_diffusion.encodings import EncodedPreferenceDataset
from trl_diffusion.video import (
    VideoPreferenceDataset,
    clip_indices,
    decode_video,
    encode_video,
    load_video,
    paired_video_transform,
)


FRAMES = moving_square((210, 40, 40), num_frames=9, size=(32, 32))


def square_columns(frames: np.ndarray) -> np.ndarray:
    """Per frame, the mean column of the red square: it moves right one pixel a frame."""
    redness = frames[..., 0].astype(float) - frames[..., 2]
    weights = (redness > 100).sum(axis=1)  # (T, W)
    return (weights * np.arange(frames.shape[2])).sum(axis=1) / weights.sum(axis=1)


def assert_same_video(decoded: np.ndarray, source: np.ndarray = FRAMES):
    assert decoded.shape == source.shape and decoded.dtype == np.uint8
    # Lossy codecs with 4:2:0 chroma: close to the source, and the square in the same place in every frame
    assert np.abs(decoded.astype(float) - source).mean() < 16
    np.testing.assert_allclose(square_columns(decoded), square_columns(source), atol=0.5)


def dataset(videos_0, videos_1, labels=None) -> VideoPreferenceDataset:
    rows = {"video_0": videos_0, "video_1": videos_1}
    rows |= {"label_0": labels or [1.0] * len(videos_0), "caption": [f"clip {i}" for i in range(len(videos_0))]}
    return VideoPreferenceDataset(Dataset.from_dict(rows), size=(32, 32), num_frames=9)


# ----- decoding -----


@pytest.mark.parametrize("container_format", ["mp4", "webm"])
def test_decodes_encoded_bytes_paths_and_dicts(container_format, tmp_path):
    encoded = encode_video(FRAMES, container_format)
    path = tmp_path / f"clip.{container_format}"
    path.write_bytes(encoded)
    for value in (encoded, str(path), {"bytes": encoded, "path": None}, {"bytes": None, "path": str(path)}):
        assert_same_video(decode_video(value))
    assert decode_video(encoded, max_frames=4).shape == (4, 32, 32, 3)


def test_decodes_frame_folders_and_frame_lists(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in reversed(range(len(FRAMES))):  # frames are read in file-name order, not creation order
        Image.fromarray(FRAMES[t]).save(folder / f"frame_{t:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    np.testing.assert_array_equal(decode_video(str(folder)), FRAMES)
    np.testing.assert_array_equal(decode_video(str(folder), max_frames=3), FRAMES[:3])
    np.testing.assert_array_equal(decode_video([Image.fromarray(frame) for frame in FRAMES]), FRAMES)
    with pytest.raises(ValueError, match="frame 1 is unreadable"):
        decode_video([Image.fromarray(FRAMES[0]), b"not an image"])


def test_datasets_video_columns_are_decoded_by_pyav(tmp_path):
    paths = []
    for name, color in (("red", (210, 40, 40)), ("blue", (40, 40, 210))):
        paths.append(str(tmp_path / f"{name}.mp4"))
        with open(paths[-1], "wb") as f:
            f.write(encode_video(moving_square(color), "mp4"))
    rows = Dataset.from_dict({"video_0": [paths[0]], "video_1": [paths[1]], "label_0": [0.0], "caption": ["a"]})
    rows = rows.cast_column("video_0", Video()).cast_column("video_1", Video())
    example = VideoPreferenceDataset(rows, size=(32, 32), num_frames=9)[0]
    # label 0: video_1 (blue) is chosen
    chosen, rejected = example["chosen_pixel_values"], example["rejected_pixel_values"]
    assert chosen.shape == rejected.shape == (3, 9, 32, 32)
    assert chosen[2].mean() > chosen[0].mean() and rejected[0].mean() > rejected[2].mean()


def test_corrupt_and_too_short_videos_name_row_and_column():
    good = encode_video(FRAMES, "mp4")
    corrupt = good[: len(good) // 3] + b"\x00garbage" * 10
    short = encode_video(FRAMES[:5], "mp4")
    pairs = dataset([good, good, good], [good, corrupt, short])
    assert pairs[0] is not None
    with pytest.raises(ValueError, match=r"Row 1, column 'video_1': unreadable video"):
        pairs[1]
    with pytest.raises(ValueError, match=r"Row 2, column 'video_1': the video has 5 frames, fewer than the 9"):
        pairs[2]
    with pytest.raises(ValueError, match=r"Row 0, column 'video_0': the video has 9 frames, fewer than the 17"):
        load_video(good, 0, "video_0", num_frames=9, frame_stride=2)
    with pytest.raises(ValueError, match=r"Row 3, column 'chosen': unreadable video \(expected video bytes"):
        load_video(12, 3, "chosen", num_frames=1)


def test_skip_invalid_rows_drops_bad_videos_and_counts_them():
    good, short = encode_video(FRAMES, "mp4"), encode_video(FRAMES[:3], "mp4")
    rows = Dataset.from_dict(
        {"video_0": [good, short, good], "video_1": [good, good, b"not a video"], "label_0": [1.0] * 3}
        | {"caption": ["a", "b", "c"]}
    )
    pairs = VideoPreferenceDataset(rows, size=(32, 32), num_frames=9, skip_invalid_rows=True)
    batch = DiffusionPreferenceCollator()([pairs[i] for i in range(3)])
    assert batch["pixel_values"].shape == (2, 3, 9, 32, 32)
    assert batch["num_skipped"] == 2 and batch["prompts"] == ["a"]


# ----- the shared clip and crop -----


def test_clip_indices_start_center_and_stride():
    np.testing.assert_array_equal(clip_indices(20, 5, 1, 0.0), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(clip_indices(20, 5, 2, 0.5), [6, 8, 10, 12, 14])  # span 9, free range 11
    np.testing.assert_array_equal(clip_indices(20, 5, 3, 1.0), [7, 10, 13, 16, 19])


def test_both_videos_of_a_pair_get_the_same_clip_crop_and_flip():
    # Frame t of the first video is filled with t, of the second with 100 + t; different sizes, same aspect ratio;
    # a marker in the green channel on the left half shows the flip
    first = np.broadcast_to(np.arange(20, dtype=np.uint8)[:, None, None, None], (20, 24, 40, 3)).copy()
    second = np.broadcast_to((100 + np.arange(20, dtype=np.uint8))[:, None, None, None], (20, 48, 80, 3)).copy()
    first[:, :, :20, 1], second[:, :, :40, 1] = 255, 255
    flips = set()
    for seed in range(8):
        rng = random.Random(seed)
        tensors, sizes, crops = paired_video_transform(
            [first, second], (16, 16), 5, 2, "random", random_crop=True, random_flip=True, rng=rng
        )
        assert [tuple(tensor.shape) for tensor in tensors] == [(3, 5, 16, 16)] * 2
        frame_values = [((tensor[0, :, 0, 0] + 1) * 127.5).round() for tensor in tensors]
        # The same frames of both videos (same length, same relative start), every second one
        torch.testing.assert_close(frame_values[1] - 100, frame_values[0])
        assert torch.all(frame_values[0].diff() == 2)
        # The same crop (both resized to 16 x 27) and the same flip
        assert sizes == [(24, 40), (48, 80)] and crops[0] == crops[1]
        marker = [(tensor[1, 0, 0] > 0.9).float() for tensor in tensors]
        torch.testing.assert_close(marker[0], marker[1])
        flips.add(bool(marker[0][-1] > marker[0][0]))
    assert flips == {False, True}


def test_identical_videos_stay_identical_under_random_crops():
    video = encode_video(moving_square((40, 170, 60), num_frames=13, size=(32, 48)), "mp4")
    rows = Dataset.from_dict({"video_0": [video], "video_1": [video], "label_0": [1.0], "caption": ["a"]})
    pairs = VideoPreferenceDataset(
        rows, size=(16, 16), num_frames=5, frame_stride=2, temporal_crop="random", random_crop=True, random_flip=True
    )
    for _ in range(4):
        example = pairs[0]
        assert example["chosen_pixel_values"].shape == (3, 5, 16, 16)
        assert torch.equal(example["chosen_pixel_values"], example["rejected_pixel_values"])


# ----- training inputs and the encoding cache -----


def test_cached_video_latents_equal_uncached(tiny_wan, tmp_path):
    pairs = make_video_pairs(3)
    trainer = MaPOTrainer(tiny_wan, args=wan_args(tmp_path, random_flip=True), train_dataset=pairs)
    cached = trainer.train_dataset
    assert isinstance(cached, EncodedPreferenceDataset)
    source = cached.source
    for index in range(len(source)):
        record, videos = source.load_pair(index)
        for flip, key in ((False, "latents"), (True, "latents_flipped")):
            pixels = torch.stack(source.transform_pair(videos, flip=flip)[0])
            torch.testing.assert_close(cached[index][key], trainer.encode_images(pixels), rtol=1e-5, atol=1e-5)
    assert cached[0]["latents"].shape == (2, 4, 3, 4, 4)
    # A different clip length is a different cache
    other = MaPOTrainer(tiny_wan, args=wan_args(tmp_path, num_frames=5), train_dataset=pairs).train_dataset
    assert other.fingerprint != cached.fingerprint and other[0]["latents"].shape == (2, 4, 2, 4, 4)


def test_random_temporal_crops_turn_the_cache_off(tiny_wan, tmp_path):
    trainer = MaPOTrainer(tiny_wan, args=wan_args(tmp_path, temporal_crop="random"), train_dataset=make_video_pairs(2))
    assert isinstance(trainer.train_dataset, VideoPreferenceDataset)
    with pytest.raises(ValueError, match="temporal_crop='random'"):
        wan_args(tmp_path, temporal_crop="random", precompute_encodings=True)
