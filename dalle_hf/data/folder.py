"""Training data from users' own images: an image folder with ``metadata.jsonl``, or any `datasets` dataset.

Both sources yield the same dicts as ``ShapesWorldDataset`` (see docs/design.md)::

    {"pixel_values": float32 tensor (3, R, R) in [-1, 1], "text": str}

Sharding. Every epoch, all ranks and workers compute the same seeded permutation of the row indices and each takes
every ``total_shards``-th entry of it (shard id = ``rank * num_workers + worker_id``), so the shards are disjoint and
together cover the data. Pass ``rank`` / ``world_size`` only when the DataLoader is *not* handed to
``accelerator.prepare``: accelerate shards an ``IterableDataset`` across processes itself (``IterableDatasetShard``
or batch dispatching), and sharding twice would drop data. With ``accelerator.prepare``, leave ``rank=0,
world_size=1`` here.

Bad samples. A row whose image cannot be read (missing file, not an image, truncated or corrupt data) or whose
caption is empty is skipped with a ``logging`` warning that names it and gives the running count. It is remembered, so
later epochs skip it silently without reading it again; ``num_skipped`` counts distinct skipped rows. With DataLoader
workers each worker keeps its own count (in its copy of the dataset): the attribute on the main-process object only
counts what was read in the main process (``num_workers=0``).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

__all__ = ["ImageTextDataset", "build_train_dataset", "collate", "load_image", "preprocess_image", "normalize_caption"]

METADATA_FILE = "metadata.jsonl"
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
}


# ---------------------------------------------------------------------------------------------------------------------
# Image and caption processing
# ---------------------------------------------------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited on white, 16/32-bit grey scaled to 8 bits."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode != "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: Any, resolution: int | None = None) -> Image.Image:
    """Open and fully decode an image from a path, bytes, a ``{"bytes", "path"}`` dict, a numpy array or a PIL image.

    Returns an RGB image with EXIF orientation applied. Raises (OSError, ValueError, ...) if it cannot be read; the
    dataset catches that and skips the row. ``resolution`` lets JPEG decoding use DCT downscaling while keeping the
    short side >= resolution (a large speed-up for big photos).
    """
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is not None:
            source = data
        elif path is not None:
            source = path
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if source is None:
        raise ValueError("no image (None)")
    if isinstance(source, Image.Image):
        source.load()
        return _to_rgb(ImageOps.exif_transpose(source))
    if isinstance(source, np.ndarray):
        return _to_rgb(Image.fromarray(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"unsupported image value of type {type(source).__name__}")
    with Image.open(source) as img:  # closes the file (multi-frame formats keep it open otherwise)
        if resolution is not None and img.format == "JPEG":
            img.draft("RGB", (resolution, resolution))
        img.load()  # decode now: truncated/corrupt data fails here, not later
        return _to_rgb(ImageOps.exif_transpose(img))  # exif_transpose copies: valid after close


def preprocess_image(img: Image.Image, resolution: int, resample: str = "bicubic") -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, R, R) in [-1, 1]: short side resized to R, centre crop R x R.

    Done as one antialiased resample of the centred square (PIL's ``box``), which equals resize-then-crop without the
    rounding of an intermediate size.
    """
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image ({w}x{h})")
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    img = img.resize((resolution, resolution), _RESAMPLE[resample], box=(left, top, left + side, top + side))
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def normalize_caption(text: str) -> str:
    """Lower-case and collapse all whitespace runs to single spaces (stripping the ends)."""
    return " ".join(text.split()).lower()


def collate(batch: list[dict]) -> dict:
    """``[{"pixel_values": (3,R,R), "text": str}, ...] -> {"pixel_values": (B,3,R,R), "text": [str, ...]}``."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in batch]),
        "text": [example["text"] for example in batch],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Sources: random access to (image value, caption, display name) by row index
# ---------------------------------------------------------------------------------------------------------------------


class _FolderSource:
    """``train_data_dir/metadata.jsonl``: one JSON object per line with ``file_name`` and a caption column."""

    def __init__(self, folder: str | os.PathLike, caption_column: str):
        self.root = Path(folder)
        if not self.root.exists():
            raise ValueError(f"train_data_dir {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"train_data_dir {str(self.root)!r} is not a directory")
        metadata = self.root / METADATA_FILE
        if not metadata.is_file():
            raise ValueError(
                f"no {METADATA_FILE} in {str(self.root)!r}: an image folder needs a {METADATA_FILE} with one JSON "
                f'object per line, e.g. {{"file_name": "0001.png", "{caption_column}": "a red circle"}}'
            )
        self.files: list[str] = []
        self.captions: list[Any] = []
        columns: dict[str, None] = {}  # ordered set
        with open(metadata, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{metadata}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{metadata}:{lineno}: expected a JSON object, got {type(record).__name__}")
                if "file_name" not in record:
                    raise ValueError(f"{metadata}:{lineno}: missing 'file_name' (keys: {sorted(record)})")
                columns.update(dict.fromkeys(record))
                self.files.append(str(record["file_name"]))
                self.captions.append(record.get(caption_column))
        if not self.files:
            raise ValueError(f"{metadata} has no records")
        if caption_column not in columns:
            available = [c for c in columns if c != "file_name"]
            raise ValueError(
                f"caption column {caption_column!r} not found in {metadata}; available columns: {available}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def get(self, idx: int) -> tuple[Any, Any, str]:
        path = self.root / self.files[idx]
        return path, self.captions[idx], str(path)


class _HFSource:
    """A ``datasets.Dataset``; an ``Image`` column is read undecoded so that bad bytes are skipped, not raised."""

    def __init__(self, dataset, image_column: str, caption_column: str, image_root: str | os.PathLike | None):
        import datasets

        if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
            raise TypeError("streaming datasets are not supported: load the dataset without streaming=True")
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
        available = list(dataset.column_names)
        for role, column in (("image", image_column), ("caption", caption_column)):
            if column not in available:
                raise ValueError(f"{role} column {column!r} not found in the dataset; available columns: {available}")
        if len(dataset) == 0:
            raise ValueError("the dataset has no rows")
        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.image_root = Path(image_root) if image_root is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, idx: int) -> tuple[Any, Any, str]:
        row = self.dataset[idx]
        image, caption = row[self.image_column], row[self.caption_column]
        path = None
        if isinstance(image, dict):
            path = image.get("path")
        elif isinstance(image, (str, os.PathLike)):
            path = image
            if self.image_root is not None:
                image = self.image_root / image
                path = str(image)
        name = f"row {idx}" + (f" ({path})" if path else "")
        return image, caption, name


def _load_hf(dataset_name: str, split: str, **load_kwargs):
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_name, split=split, **load_kwargs)
    except ValueError as e:  # e.g. unknown split
        raise ValueError(f"could not load dataset {dataset_name!r} (split {split!r}): {e}") from e
    return loaded


# ---------------------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------------------


class ImageTextDataset(torch.utils.data.IterableDataset):
    """Yields ``{"pixel_values": (3, R, R) float32 in [-1, 1], "text": str}`` from users' images.

    Args:
        train_data_dir: an image folder holding ``metadata.jsonl`` (``file_name`` + ``caption_column``).
        dataset: a ``datasets.Dataset`` / ``DatasetDict`` (``split`` picks from a dict), or a name/path for
            ``datasets.load_dataset``. Exactly one of ``train_data_dir`` / ``dataset`` is given.
        image_column: column holding PIL images, paths, ``{"bytes", "path"}`` dicts or raw bytes (``dataset`` only;
            for a folder the image is ``file_name``).
        caption_column: column holding the caption; a list of captions picks one per epoch, seeded.
        resolution: R, the model's image size.
        seed, shuffle: each epoch uses the permutation seeded by ``(seed, epoch)``; ``shuffle=False`` keeps row order.
        rank, world_size: this process's share of the data (see the module docstring about accelerate).
        infinite: cycle epochs forever (epoch, epoch + 1, ...); otherwise one epoch per ``iter()``, chosen by
            ``set_epoch`` (call it every epoch, as with ``DistributedSampler``).
        normalize_captions: lower-case and normalize whitespace (default True).
        resample: "bicubic" (default), "lanczos" or "bilinear"; all antialiased when downscaling.
        image_root: base folder for relative paths in a ``dataset`` path column (default: the working directory).
        split: split to use when ``dataset`` is a name/path or a ``DatasetDict``.
        load_dataset_kwargs: extra arguments to ``datasets.load_dataset``.
    """

    def __init__(
        self,
        train_data_dir: str | os.PathLike | None = None,
        dataset: Any = None,
        *,
        image_column: str = "image",
        caption_column: str = "text",
        resolution: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = True,
        normalize_captions: bool = True,
        resample: str = "bicubic",
        image_root: str | os.PathLike | None = None,
        split: str = "train",
        load_dataset_kwargs: dict | None = None,
    ):
        super().__init__()
        if (train_data_dir is None) == (dataset is None):
            raise ValueError("give exactly one of train_data_dir or dataset")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")

        if train_data_dir is not None:
            self.source = _FolderSource(train_data_dir, caption_column)
        else:
            import datasets

            if isinstance(dataset, (str, os.PathLike)):
                dataset = _load_hf(str(dataset), split, **(load_dataset_kwargs or {}))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"split {split!r} not in the dataset; available splits: {list(dataset)}")
                dataset = dataset[split]
            self.source = _HFSource(dataset, image_column, caption_column, image_root)

        self.resolution = resolution
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.infinite = infinite
        self.normalize_captions = normalize_captions
        self.resample = resample
        self.epoch = 0
        self.num_skipped = 0
        self.skipped: dict[int, str] = {}  # row index -> reason

    @property
    def num_rows(self) -> int:
        """Rows in the source, before sharding and skipping."""
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``iter()`` starts from (drives the shuffle order)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    # -- indices -------------------------------------------------------------------------------------------------------

    def _shard(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def epoch_indices(self, epoch: int, shard_id: int = 0, num_shards: int = 1) -> np.ndarray:
        """Row indices of one shard for one epoch: the seeded permutation, strided by shard."""
        n = len(self.source)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        return order[shard_id::num_shards]

    # -- one row ---------------------------------------------------------------------------------------------------

    def _skip(self, idx: int, name: str, reason: str) -> None:
        self.skipped[idx] = reason
        self.num_skipped += 1
        logger.warning("Skipping %s: %s (%d skipped so far)", name, reason, self.num_skipped)

    def _caption(self, caption: Any, idx: int, epoch: int) -> str | None:
        if isinstance(caption, (list, tuple)):
            options = [c for c in caption if isinstance(c, str) and c.strip()]
            if not options:
                return None
            caption = options[int(np.random.default_rng([self.seed, epoch, idx]).integers(len(options)))]
        if not isinstance(caption, str):
            return None
        if self.normalize_captions:
            caption = normalize_caption(caption)
        return caption if caption.strip() else None

    def _example(self, idx: int, epoch: int) -> dict | None:
        image, caption, name = self.source.get(idx)
        text = self._caption(caption, idx, epoch)
        if text is None:
            self._skip(idx, name, f"empty or missing caption ({caption!r})")
            return None
        try:
            pixel_values = preprocess_image(load_image(image, self.resolution), self.resolution, self.resample)
        except Exception as e:  # noqa: BLE001 - any unreadable image is skipped, never fatal
            self._skip(idx, name, f"unreadable image ({type(e).__name__}: {e})")
            return None
        return {"pixel_values": pixel_values, "text": text}

    # -- iteration -------------------------------------------------------------------------------------------------

    def _iter_epoch(self, epoch: int, shard_id: int, num_shards: int) -> Iterator[dict]:
        for idx in self.epoch_indices(epoch, shard_id, num_shards).tolist():
            if idx in self.skipped:
                continue
            example = self._example(idx, epoch)
            if example is not None:
                yield example

    def __iter__(self) -> Iterator[dict]:
        shard_id, num_shards = self._shard()
        if not self.infinite:
            yield from self._iter_epoch(self.epoch, shard_id, num_shards)
            return
        if len(self.source) <= shard_id:
            raise RuntimeError(
                f"shard {shard_id} of {num_shards} (rank {self.rank}, world_size {self.world_size}, with DataLoader "
                f"workers) is empty: only {len(self.source)} rows; use fewer workers/processes or more data"
            )
        epoch = self.epoch
        while True:
            produced = False
            for example in self._iter_epoch(epoch, shard_id, num_shards):
                produced = True
                yield example
            if not produced:
                raise RuntimeError(
                    f"shard {shard_id} of {num_shards} yielded no usable sample in epoch {epoch} "
                    f"({len(self.source)} rows, {self.num_skipped} skipped in this process); check the data"
                )
            epoch += 1


def build_train_dataset(
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset: Any = None,
    image_column: str = "image",
    caption_column: str = "text",
    resolution: int = 64,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    infinite: bool = True,
    **kwargs,
) -> ImageTextDataset:
    """The training dataset from exactly one of: an image folder, a dataset name/path, or a ``datasets`` object.

    Extra keyword arguments go to ``ImageTextDataset`` (``shuffle``, ``normalize_captions``, ``resample``,
    ``image_root``, ``split``, ``load_dataset_kwargs``).
    """
    given = [n for n, v in (("train_data_dir", train_data_dir), ("dataset_name", dataset_name), ("dataset", dataset))
             if v is not None]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of train_data_dir, dataset_name or dataset" + (f" (got {', '.join(given)})" if given else "")
        )
    common = dict(
        image_column=image_column, caption_column=caption_column, resolution=resolution, seed=seed, rank=rank,
        world_size=world_size, infinite=infinite, **kwargs,
    )
    if train_data_dir is not None:
        return ImageTextDataset(train_data_dir=train_data_dir, **common)
    return ImageTextDataset(dataset=dataset_name if dataset_name is not None else dataset, **common)
