"""Streamed preference pairs: a `datasets.IterableDataset` read row by row, split across processes, encoded on the fly.

A stream (``load_dataset(..., streaming=True)``, ``Dataset.to_iterable_dataset()``, any `datasets.IterableDataset` in
the Pick-a-Pic or TRL-style schema) is never held whole, so the checks that a map-style dataset runs when it is wrapped
run row by row instead, with the same code ([`PreferenceDataset.check_row`][]): ties are dropped, and a bad label or
caption raises an error naming the row and column, or is skipped with ``skip_invalid_rows``. Both are counted and
logged (``data/dropped_ties``, ``data/skipped_rows``, summed over the processes) as the rows are read.

Splitting. Each process reads its own part, ``datasets.distributed.split_dataset_by_node(stream, rank, world_size)``:
whole shards when the stream's shard count is a multiple of the number of processes, else every ``world_size``-th row.
Within a process, `datasets` hands each data-loader worker its own shards, so a stream needs at least
``num_processes × dataloader_num_workers`` shards to keep every worker busy (a worker without a shard stays idle).
The trainer turns off accelerate's batch dispatching for a stream (``accelerator_config.dispatch_batches=False``:
each process loads its own batches, none is broadcast from process 0) and its re-sharding of the loader.

Rows. A pair's noise and timestep are seeded by its ``row_index`` (see ``pair_seed``): for a stream it is
``position · S + s``, the row's position in the part that stream ``s`` of ``S = num_processes × num_workers`` reads,
so it is unique across processes and workers, and the same in a rerun with the same processes and workers. Errors name
the row by that position, its part, process and worker.

Encoding. A stream is encoded on the fly, every step (the VAE and text encoders run in the training step): the
encoding cache needs the whole dataset and does not apply (``precompute_encodings=True`` or ``precompute_ref_errors``
with a stream is an error).

Resuming. ``trainer.train(resume_from_checkpoint=...)`` replays the stream: the trainer reads and discards the batches
of the steps already trained (transformers' data skip), so the resumed run sees exactly the pairs, in the same order
and with the same noise, that the uninterrupted run would have seen. The cost is one read (and decode) of those rows;
``ignore_data_skip=True`` starts the stream from its beginning instead. Resume with the same number of processes and
data-loader workers: they decide which rows each process reads.
"""

import logging
from typing import TYPE_CHECKING, Any

import torch

from .data import PreferenceDataset, PreparationStats


if TYPE_CHECKING:
    from datasets import IterableDataset


logger = logging.getLogger(__name__)


def is_stream(dataset) -> bool:
    """Whether ``dataset`` is a `datasets.IterableDataset` (or one already wrapped for training)."""
    from datasets import IterableDataset

    return isinstance(dataset, (IterableDataset, StreamingPreferenceDataset))


def refuse_eval_stream(eval_dataset) -> None:
    """Evaluation needs a map-style dataset: streamed parts of different lengths would hang the gathering of losses.

    Raises:
        ValueError: ``eval_dataset`` (or one of a dict of them) is a stream.
    """
    datasets = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    if any(is_stream(dataset) for dataset in datasets):
        raise ValueError(
            "eval_dataset is a streamed dataset; evaluation needs a map-style `datasets.Dataset` (every process must "
            "see the same number of batches). Materialise a slice of the stream, e.g. "
            "`Dataset.from_list(list(stream.take(512)))`."
        )


def check_stream_options(args) -> None:
    """Refuse the options that need a whole (map-style) dataset, and set the loader options a stream needs.

    Raises:
        ValueError: ``precompute_encodings=True`` or ``precompute_ref_errors`` (the encoding cache needs the whole
            dataset), or accelerate's ``dispatch_batches``/``split_batches`` (each process reads its own part).
    """
    if args.precompute_encodings or args.precompute_ref_errors:
        option = "precompute_encodings" if args.precompute_encodings else "precompute_ref_errors"
        raise ValueError(
            f"{option} needs the encoding cache, which does not apply to a streamed dataset (a "
            "`datasets.IterableDataset`): a stream is encoded on the fly, every step. Leave precompute_encodings "
            "unset (or False) to train on the stream, or load the dataset without streaming to cache its encodings."
        )
    config = args.accelerator_config
    if config.dispatch_batches or config.split_batches:
        raise ValueError(
            "A streamed dataset is split across processes with `split_dataset_by_node`, so each process loads its own "
            "batches: accelerator_config dispatch_batches and split_batches must be unset (or False)."
        )
    config.dispatch_batches = False


class StreamingPreferenceDataset(torch.utils.data.IterableDataset):
    """A `datasets.IterableDataset` of image pairs, read as ordered ``(chosen, rejected, prompt)`` examples.

    Examples are those of [`PreferenceDataset`][] (same checks, decoding, paired transform), plus the counts of rows
    dropped before each one: ``dropped_ties`` and ``dropped_invalid`` (the collator adds them to the batch's
    ``num_ties`` and ``num_skipped``). See the module docstring for splitting, row indices and resuming.

    Args:
        dataset: a `datasets.IterableDataset` in the Pick-a-Pic or the TRL-style schema.
        process_index: this process's index among the processes the stream is split over.
        num_processes: the number of processes to split the stream over.
        options: the keyword arguments of [`PreferenceDataset`][] (``resolution``, ``caption_column``...).
    """

    def __init__(self, dataset: "IterableDataset", process_index: int = 0, num_processes: int = 1, **options: Any):
        from datasets.distributed import split_dataset_by_node

        columns = dataset.column_names
        if columns is None:  # a stream whose features are not declared: read them off its first row
            columns = list(next(iter(dataset.take(1))).keys())
        self.pairs = PreferenceDataset.for_columns(columns, **options)
        self.dataset = self.pairs.undecoded(dataset)
        if num_processes > 1:
            self.dataset = split_dataset_by_node(self.dataset, rank=process_index, world_size=num_processes)
        self.process_index, self.num_processes = process_index, num_processes

    @staticmethod
    def accepts(dataset) -> bool:
        """Whether ``dataset`` is a raw `datasets.IterableDataset`, which a trainer wraps in this class."""
        from datasets import IterableDataset

        return isinstance(dataset, IterableDataset)

    @classmethod
    def from_config(cls, dataset, args) -> "StreamingPreferenceDataset":
        """Wrap a stream with a trainer config's data options, for this process of ``args.world_size``."""
        return cls(dataset, args.process_index, args.world_size, **PreferenceDataset.config_options(args))

    @classmethod
    def for_trainer(cls, dataset, args, dataset_class: type, is_video: bool) -> "StreamingPreferenceDataset":
        """The training stream of a trainer: pairs of images only, with the options a stream needs (see
        [`check_stream_options`][]).

        Raises:
            NotImplementedError: a stream for an unpaired method (Diffusion-KTO) or a video family.
        """
        if is_video or dataset_class is not PreferenceDataset:
            kind = "video pairs" if is_video else f"{dataset_class.__name__} rows"
            raise NotImplementedError(
                f"Streamed datasets hold image pairs; streaming {kind} is not supported. Load the dataset without "
                "streaming (a `datasets.Dataset`)."
            )
        check_stream_options(args)
        logger.info(
            "Training on a streamed dataset: pairs are encoded on the fly, every step (the encoding cache applies to "
            "map-style datasets only)."
        )
        return cls.from_config(dataset, args)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the stream (it reseeds a shuffled stream's buffer and shard order)."""
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        stream_id, num_streams = self.process_index * num_workers + worker_id, self.num_processes * num_workers
        pairs = self.pairs
        pairs.stats = PreparationStats()
        reported = PreparationStats()
        label, caption, confidence = pairs.label_column, pairs.caption_column, pairs.confidence_column
        for position, record in enumerate(self.dataset):  # `datasets` gives each worker its own shards
            pairs.stats.num_rows += 1
            row = _row_name(position, stream_id, num_streams, self.process_index, worker_id)
            value = record.get(confidence) if confidence else None
            swap = pairs.check_row(row, record.get(label) if label else None, record[caption], value)
            if swap is None:
                continue
            fields = {"confidence": float(value)} if confidence else {}
            example = pairs.build_example(record, row, swap, position * num_streams + stream_id, fields)
            if example is None:  # an unreadable image, skipped: the collator counts it
                yield None
                continue
            example["dropped_ties"] = pairs.stats.num_ties - reported.num_ties
            example["dropped_invalid"] = _num_invalid(pairs.stats) - _num_invalid(reported)
            reported = PreparationStats(**vars(pairs.stats))
            yield example
        part = "The stream" if num_streams == 1 else f"Stream part {stream_id + 1}/{num_streams}"
        if pairs.stats.num_rows and not pairs.stats.num_pairs:
            logger.warning("%s: %s", part, pairs.stats.explain_empty())
        elif pairs.stats.num_rows:
            logger.info("%s: read %d rows (%d pairs).", part, pairs.stats.num_rows, pairs.stats.num_pairs)


def _num_invalid(stats: PreparationStats) -> int:
    return stats.num_invalid_labels + stats.num_invalid_captions


def _row_name(position: int, stream_id: int, num_streams: int, process_index: int, worker_id: int) -> str:
    """How errors name a streamed row: its position in the part of the stream it belongs to."""
    if num_streams == 1:
        return f"{position} of the stream"
    return f"{position} of stream part {stream_id + 1}/{num_streams} (process {process_index}, worker {worker_id})"


def unshard_stream_loader(dataloader) -> None:
    """Stop accelerate from re-sharding a prepared stream loader: each process already reads its own part.

    With ``dispatch_batches=False``, ``accelerator.prepare`` wraps an iterable dataset in an ``IterableDatasetShard``
    that keeps one batch in ``num_processes``; made a passthrough (one process), every batch of the part is kept.
    """
    from accelerate.data_loader import IterableDatasetShard

    shard = getattr(dataloader, "dataset", None)
    if isinstance(shard, IterableDatasetShard) and isinstance(shard.dataset, StreamingPreferenceDataset):
        shard.num_processes, shard.process_index = 1, 0
