"""The training data stream: the same batches for a seed whatever the worker count, resumable mid-run.

detectron2's train loader draws augmentations from each worker's global RNG and restarts its
sampler on resume, so a resumed run sees other batches than an uninterrupted one. Here:

* sample k of this process's sampler stream is mapped under RNGs seeded from (seed, rank, k), so
  the mapped sample depends on nothing else (not on the worker that maps it, nor on history);
* the state is (seeds, k of the next sample, the (k, index) pairs waiting in the aspect-ratio
  buckets): small plain data for a checkpoint; loading it continues the same stream;
* an image that cannot be decoded is a DataError naming the file and its record, or, with
  `skip_bad_images`, a warning (once per file) and the next sample takes its place.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
import re
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detectron2.data.build import _train_loader_from_config
from detectron2.data.common import DatasetFromList
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.utils import comm

from lgd_cli.compat.images import image_problem
from lgd_cli.errors import ConfigError, DataError
from lgd_cli.rng import preserved_rng

logger = logging.getLogger("lgd_cli")


@contextlib.contextmanager
def _seeded(seed: int, rank: int, position: int) -> Iterator[None]:
    """python, numpy and torch CPU RNGs seeded from (seed, rank, position), restored afterwards."""
    with preserved_rng():
        s = np.random.SeedSequence([seed, rank, position]).generate_state(2)
        random.seed(int(s[0]))
        np.random.seed(int(s[0]))
        torch.default_generator.manual_seed(int(s[1]))
        yield


def _size_problem(message: str) -> str:
    sizes = re.findall(r"\((\d+), (\d+)\)", message)
    if len(sizes) == 2:
        (w, h), (rw, rh) = sizes
        return (f"is {w}x{h} pixels (after its EXIF orientation), but its record says width {rw}, height {rh}")
    return message


def _identity(x):
    return x


class _SampleStream(IterableDataset):
    """Yields (position, index, mapped sample or None, problem or None) from `start` on.

    Every DataLoader worker walks the (cheap) sampler stream and maps its share, position % workers;
    the DataLoader hands them back round-robin, so positions arrive in order.
    """

    def __init__(self, dataset, mapper, sampler, seed: int, rank: int, start: int):
        self.dataset, self.mapper, self.sampler = dataset, mapper, sampler
        self.seed, self.rank, self.start = seed, rank, start

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = itertools.islice(iter(self.sampler), self.start, None)
        for position, index in enumerate(stream, self.start):
            if position % workers == worker:
                yield self.load(position, index)

    def load(self, position: int, index: int) -> tuple:
        record = self.dataset[index]
        with _seeded(self.seed, self.rank, position):
            try:
                return position, index, self.mapper(record), None
            except SizeMismatchError as exc:
                return position, index, None, _size_problem(str(exc))
            except Exception:
                problem = image_problem(record.get("file_name", ""))
                if problem is None:
                    raise  # not the image: a real error, with its traceback
                return position, index, None, problem


class ResumableTrainLoader:
    """Iterable of training batches (lists of mapped dicts) with `state_dict` / `load_state_dict`.

    Args:
        dataset: the dataset dicts; mapper: dict -> model input (DatasetMapper); sampler: an
            infinite index sampler already sharded by rank (detectron2's TrainingSampler...).
        batch_size: samples per batch in this process.
        aspect_ratio_grouping: batch landscape and portrait images separately, as detectron2 does.
        seed: the per-sample seeds derive from it; rank: this process's rank.
        skip_bad_images: skip undecodable images with a warning instead of raising DataError.
        json_file: the annotation file, for messages.
    """

    def __init__(self, dataset, mapper, sampler, batch_size: int, *, aspect_ratio_grouping: bool = True,
                 num_workers: int = 0, seed: int = 0, rank: int = 0, skip_bad_images: bool = False,
                 json_file: str = ""):
        self.dataset = DatasetFromList(dataset, copy=False)
        self.mapper, self.sampler, self.batch_size = mapper, sampler, batch_size
        self.aspect_ratio_grouping, self.num_workers = aspect_ratio_grouping, num_workers
        self.seed, self.rank, self.skip_bad_images, self.json_file = seed, rank, skip_bad_images, json_file
        self.position = 0  # of the next sample this process takes from the stream
        self._buckets: list[list[tuple]] = [[], []]  # (position, index, sample) waiting for a batch
        self._pending: list[list[list[int]]] | None = None  # bucket (position, index) pairs from a checkpoint
        self.skipped: dict[str, int] = {}  # undecodable file -> times skipped

    def _stream(self, start: int) -> _SampleStream:
        return _SampleStream(self.dataset, self.mapper, self.sampler, self.seed, self.rank, start)

    def __iter__(self):
        if self._pending is not None:  # rebuild the buckets of the checkpoint: same seeds, same samples
            stream, pending, self._pending = self._stream(0), self._pending, None
            self._buckets = [[], []]
            for k, bucket in enumerate(pending):
                for position, index in bucket:
                    _, _, sample, problem = stream.load(position, index)
                    if sample is None:  # the file went bad since the checkpoint
                        self._bad_image(index, problem)
                    else:
                        self._buckets[k].append((position, index, sample))
        # A generator of its own: creating the iterator draws no number from the global torch RNG.
        loader = DataLoader(self._stream(self.position), batch_size=None, num_workers=self.num_workers,
                            collate_fn=_identity, generator=torch.Generator().manual_seed(self.seed))
        for position, index, sample, problem in loader:
            self.position = position + 1
            if sample is None:
                self._bad_image(index, problem)
                continue
            bucket = self._buckets[0 if self.aspect_ratio_grouping and sample["width"] > sample["height"] else 1]
            bucket.append((position, index, sample))
            if len(bucket) == self.batch_size:
                batch = [s for _, _, s in bucket]
                bucket.clear()
                yield batch

    def _bad_image(self, index: int, problem: str) -> None:
        record = self.dataset[index]
        name = record.get("file_name", "?")
        what = f"image {name} (image id {record.get('image_id', '?')} in {self.json_file or 'the training set'}) {problem}"
        if not self.skip_bad_images:
            raise DataError(what, hint="replace or remove the file, or pass --skip-bad-images to skip such images")
        if name not in self.skipped:
            logger.warning(f"skipped: {what}")
        self.skipped[name] = self.skipped.get(name, 0) + 1
        if len(self.skipped) >= len(self.dataset):
            raise DataError(f"none of the {len(self.dataset)} training images can be decoded, e.g. {what}")

    def state_dict(self) -> dict:
        buckets = self._pending if self._pending is not None else \
            [[[p, i] for p, i, _ in bucket] for bucket in self._buckets]
        return {"seed": self.seed, "sampler_seed": getattr(self.sampler, "_seed", None), "position": self.position,
                "buckets": buckets, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream of `state` (call before iterating)."""
        self.seed, self.position = int(state["seed"]), int(state["position"])
        if state.get("sampler_seed") is not None and hasattr(self.sampler, "_seed"):
            self.sampler._seed = int(state["sampler_seed"])
        self._pending = [[[int(p), int(i)] for p, i in bucket] for bucket in state["buckets"]]
        self.skipped = dict(state.get("skipped", {}))

    def skip_to(self, position: int) -> None:
        """Continue at `position` with empty buckets (the nearest thing when the process count changed)."""
        self.position, self._pending, self._buckets = position, None, [[], []]


def build_train_loader(cfg, *, skip_bad_images: bool = False) -> ResumableTrainLoader:
    """detectron2's `build_detection_train_loader(cfg)` (same dataset, mapper, sampler), made resumable."""
    from detectron2.data import MetadataCatalog

    args = _train_loader_from_config(cfg)
    world = comm.get_world_size()
    if args["total_batch_size"] % world:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH ({args['total_batch_size']}) must be divisible by the "
                          f"number of processes ({world})")
    json_file = getattr(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]), "json_file", "")
    return ResumableTrainLoader(
        args["dataset"], args["mapper"], args["sampler"], args["total_batch_size"] // world,
        aspect_ratio_grouping=args["aspect_ratio_grouping"], num_workers=args["num_workers"],
        seed=comm.shared_random_seed(), rank=comm.get_rank(), skip_bad_images=skip_bad_images,
        json_file=json_file)
