"""Preference pairs of videos: decoding (PyAV), shared temporal and spatial crops, and the video dataset.

A video dataset has the Pick-a-Pic layout with video columns: ``video_0``, ``video_1`` (configurable with
``video_columns``), ``label_0`` and ``caption``; or the TRL-style ``chosen``, ``rejected`` and ``prompt``. A video cell
is any of:

- encoded video bytes (mp4, webm, mkv, gif... anything FFmpeg reads), or a ``{"bytes", "path"}`` dict as a
  ``datasets.Video(decode=False)`` column holds it (``datasets.Video`` columns are read that way);
- a path to a video file;
- a path to a folder of frame images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``), in file-name order;
- a list of frames (anything [`trl_diffusion.data.load_image`][] reads: bytes, PIL images, paths).

Videos are decoded with PyAV (``pip install trl_diffusion[video]``) in the data-loader workers. A pair's two videos
get the same clip: ``num_frames`` frames ``frame_stride`` apart, starting at the same relative position (the start,
the centre, or one random position per pair), and the same spatial transform (each video resized to cover
``(height, width)``, both flipped together or not, both cropped at the same relative offset). A video that cannot
be decoded, or that is shorter than the clip, raises a `ValueError` naming its row and column.
"""

import io
import os
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .data import PreferenceDataset, load_image


if TYPE_CHECKING:
    from datasets import Dataset


FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _require_av():
    try:
        import av
    except ImportError as error:
        raise ImportError(
            "Video datasets are decoded with PyAV: `pip install av` (or `pip install trl_diffusion[video]`)."
        ) from error
    return av


def _decode_container(source, max_frames: int | None) -> list[np.ndarray]:
    av = _require_av()
    frames = []
    with av.open(source) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        for frame in container.decode(container.streams.video[0]):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return frames


def _frame(value, index: int) -> np.ndarray:
    try:
        return np.asarray(load_image(value, index, "frame"))
    except ValueError as error:
        raise ValueError(f"frame {index} is unreadable ({error.__cause__})") from error.__cause__


def _frame_folder(path: str, max_frames: int | None) -> list[np.ndarray]:
    names = sorted(name for name in os.listdir(path) if name.lower().endswith(FRAME_EXTENSIONS))
    return [_frame(os.path.join(path, name), index) for index, name in enumerate(names[:max_frames])]


def decode_video(value, max_frames: int | None = None) -> np.ndarray:
    """Decode a video cell (see the module docstring) into ``(T, H, W, 3)`` uint8 RGB frames, reading at most
    ``max_frames`` frames. Raises on unreadable input; [`load_video`][] turns that into a row/column error."""
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, (bytes, bytearray)):
        frames = _decode_container(io.BytesIO(value), max_frames)
    elif isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
        frames = _frame_folder(str(value), max_frames)
    elif isinstance(value, (str, os.PathLike)):
        frames = _decode_container(str(value), max_frames)
    elif isinstance(value, (list, tuple)):
        frames = [_frame(frame, index) for index, frame in enumerate(value[:max_frames])]
    else:
        raise TypeError(
            f"expected video bytes, a video file or frame folder path, a list of frames or a {{'bytes', 'path'}} "
            f"dict, got {value!r:.80}"
        )
    if not frames:
        raise ValueError("no frames could be decoded")
    if len({frame.shape for frame in frames}) > 1:
        raise ValueError(f"frames of different sizes: {sorted({frame.shape for frame in frames})}")
    return np.stack(frames)


def clip_span(num_frames: int, frame_stride: int) -> int:
    """Source frames a clip covers: ``(num_frames − 1)·frame_stride + 1``."""
    return (num_frames - 1) * frame_stride + 1


def load_video(value, row: int, column: str, num_frames: int, frame_stride: int = 1, max_frames: int | None = None):
    """Decode one video cell, or raise a `ValueError` naming the row and column (unreadable, or too short for a
    clip of ``num_frames`` frames ``frame_stride`` apart)."""
    try:
        frames = decode_video(value, max_frames)
    except Exception as error:
        raise ValueError(f"Row {row}, column {column!r}: unreadable video ({error}).") from error
    span = clip_span(num_frames, frame_stride)
    if len(frames) < span:
        raise ValueError(
            f"Row {row}, column {column!r}: the video has {len(frames)} frames, fewer than the {span} that "
            f"num_frames={num_frames} with frame_stride={frame_stride} needs."
        )
    return frames


def clip_indices(length: int, num_frames: int, frame_stride: int, offset: float) -> np.ndarray:
    """Frame indices of a clip in a video of ``length`` frames, starting at relative position ``offset ∈ [0, 1]``
    of the free range: ``start = round(offset·(length − span))``, then every ``frame_stride``-th frame."""
    start = round(offset * (length - clip_span(num_frames, frame_stride)))
    return start + frame_stride * np.arange(num_frames)


def paired_video_transform(
    videos: Sequence[np.ndarray],
    size: tuple[int, int],
    num_frames: int,
    frame_stride: int = 1,
    temporal_crop: str = "start",
    random_crop: bool = False,
    random_flip: bool = False,
    rng: random.Random | None = None,
    flip: bool | None = None,
) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[tuple[int, int]]]:
    """Cut the same clip out of each video of a pair and transform them the same way.

    Temporal: one relative start for the pair (``temporal_crop``: 0, 1/2, or uniform), see [`clip_indices`][].
    Spatial: each video is resized (bilinear, antialiased) so that it covers ``size = (height, width)``, then all
    are flipped together (``random_flip``, or ``flip`` when given) and cropped at one relative offset (the centre, or
    uniform with ``random_crop``). Returns ``(3, num_frames, height, width)`` tensors in ``[-1, 1]``, each video's
    original ``(height, width)`` and each crop's ``(top, left)``.
    """
    rng = rng or random
    if flip is None:
        flip = random_flip and rng.random() < 0.5
    temporal_offset = {"start": 0.0, "center": 0.5}.get(temporal_crop)
    temporal_offset = rng.random() if temporal_offset is None else temporal_offset
    offset_y, offset_x = (rng.random(), rng.random()) if random_crop else (0.5, 0.5)
    height, width = size
    tensors, original_sizes, crop_top_lefts = [], [], []
    for video in videos:
        clip = torch.from_numpy(video[clip_indices(len(video), num_frames, frame_stride, temporal_offset)])
        clip = clip.permute(0, 3, 1, 2).float()  # (F, 3, h, w)
        source_height, source_width = clip.shape[-2:]
        scale = max(height / source_height, width / source_width)
        resized = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
        if resized != (source_height, source_width):
            clip = torch.nn.functional.interpolate(clip, size=resized, mode="bilinear", antialias=True)
        if flip:
            clip = clip.flip(-1)
        top, left = round(offset_y * (resized[0] - height)), round(offset_x * (resized[1] - width))
        clip = clip[..., top : top + height, left : left + width]
        tensors.append((clip.clamp(0, 255) / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous())
        original_sizes.append((source_height, source_width))
        crop_top_lefts.append((top, left))
    return tensors, original_sizes, crop_top_lefts


class VideoPreferenceDataset(PreferenceDataset):
    """A `datasets.Dataset` of video pairs, seen as ordered ``(chosen, rejected, prompt)`` examples.

    Examples hold ``chosen_pixel_values`` and ``rejected_pixel_values`` of shape ``(3, F, H, W)``, so the collator's
    ``pixel_values`` are ``(2B, 3, F, H, W)``, chosen first. Labels, ties, captions and ``skip_invalid_rows`` work
    as for images (see [`PreferenceDataset`][]); a too-short video is an invalid row like an unreadable one.

    Args:
        dataset: a `datasets.Dataset` with two video columns (see the module docstring).
        size: ``(height, width)`` of the training frames.
        num_frames: frames per clip.
        frame_stride: take every ``frame_stride``-th source frame.
        temporal_crop: ``"start"``, ``"center"`` or ``"random"`` (see `paired_video_transform`).
        video_columns: the two video columns of the Pick-a-Pic-style schema.
        kwargs: the other arguments of [`PreferenceDataset`][] (``random_crop``, ``random_flip``, ``drop_ties``...).
    """

    def __init__(
        self,
        dataset: "Dataset",
        size: tuple[int, int],
        num_frames: int,
        frame_stride: int = 1,
        temporal_crop: str = "start",
        video_columns: Sequence[str] = ("video_0", "video_1"),
        **kwargs: Any,
    ):
        if temporal_crop not in ("start", "center", "random"):
            raise ValueError(f"temporal_crop must be 'start', 'center' or 'random', got {temporal_crop!r}.")
        self.size = (int(size[0]), int(size[1]))
        self.num_frames, self.frame_stride, self.temporal_crop = num_frames, frame_stride, temporal_crop
        dataset = _undecoded_videos(dataset)
        super().__init__(dataset, resolution=max(self.size), image_columns=video_columns, **kwargs)

    @classmethod
    def from_config(cls, dataset, args, family) -> "VideoPreferenceDataset":
        """The dataset a trainer builds for a video family from its config."""
        return cls(
            dataset,
            size=family.frame_size,
            num_frames=family.num_frames,
            frame_stride=args.frame_stride,
            temporal_crop=args.temporal_crop,
            video_columns=args.video_columns,
            random_crop=args.random_crop,
            random_flip=args.random_flip,
            drop_ties=args.drop_ties,
            skip_invalid_rows=args.skip_invalid_rows,
            caption_column=args.caption_column,
            label_column=args.label_column,
            confidence_column=args.confidence_column,
        )

    def decode_cell(self, value, row: int, column: str) -> np.ndarray:
        # From the start, only the clip's frames are needed: stop decoding there.
        max_frames = clip_span(self.num_frames, self.frame_stride) if self.temporal_crop == "start" else None
        return load_video(value, row, column, self.num_frames, self.frame_stride, max_frames)

    def transform_pair(self, images: list, flip: bool | None = None) -> tuple[list[torch.Tensor], list, list]:
        return paired_video_transform(
            images,
            self.size,
            self.num_frames,
            self.frame_stride,
            self.temporal_crop,
            self.random_crop,
            self.random_flip,
            flip=flip,
        )

    def transform_options(self) -> dict:
        return {
            "size": list(self.size),
            "num_frames": self.num_frames,
            "frame_stride": self.frame_stride,
            "temporal_crop": self.temporal_crop,
            "random_crop": self.random_crop,
        }

    @property
    def has_fixed_crops(self) -> bool:
        return not self.random_crop and self.temporal_crop != "random"


def _undecoded_videos(dataset):
    """Read `datasets.Video` columns as ``{"bytes", "path"}`` dicts, so PyAV decodes them in the workers and a bad
    video fails with its row and column."""
    from datasets import Video

    features = getattr(dataset, "features", None) or {}
    for column, feature in features.items():
        if isinstance(feature, Video) and feature.decode:
            dataset = dataset.cast_column(column, Video(decode=False))
    return dataset


def encode_video(frames: np.ndarray, container_format: str = "mp4", fps: int = 16) -> bytes:
    """Encode ``(T, H, W, 3)`` uint8 RGB frames as video bytes with PyAV: H.264 in mp4, VP9 in webm.

    Useful to build video datasets (and the tests' videos) offline. H.264 needs even sides.
    """
    av = _require_av()
    codec = {"mp4": "libx264", "webm": "libvpx-vp9"}.get(container_format)
    if codec is None:
        raise ValueError(f"container_format must be 'mp4' or 'webm', got {container_format!r}.")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()
