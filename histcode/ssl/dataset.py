"""Tiles as a torch dataset, read from the slides in DataLoader worker processes, shuffled across slides.

Each worker opens its own readers lazily (OpenSlide handles are per process; nothing is opened before the
fork) and keeps the most recently used ones open. Items are uint8 (3, px, px) tensors at the tiling spec's
resolution; augmentation happens later, on the device, on whole batches.

Order: ``EpochSampler`` draws a permutation of all tiles per epoch from (seed, epoch) -- one global shuffle
across slides, not batches of one slide as in the paper's code -- and can start at any batch, so a resumed
run sees exactly the batches the interrupted one would have seen. With ``pretrain.locality_chunk`` > 1 it
shuffles runs of that many neighbouring tiles instead (locality-aware: a 256 px tile can span four stored
JPEG tiles, and a reader that reads neighbours one after another decodes each stored tile once). Under torchrun each process takes a
strided share of every global batch.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from histcode.errors import HistcodeError
from histcode.store.catalog import Catalog
from histcode.wsi.stain import apply_od_transform
from histcode.wsi.tile_reader import TileReader


class NoTilesError(HistcodeError, RuntimeError):
    """No tiles to train on; the message says what to run."""


@dataclass(frozen=True)
class SlideSource:
    slide_id: str
    path: str
    vendor: str | None
    level_dimensions: list
    level_downsamples: list
    size: int  # tile side in level-0 pixels
    stain: tuple[float, ...] | None = None  # 3x3 OD map (row-major) onto the reference stain, then the white point's
    # OD when one was taken out first (12 values); None = as read


class TileDataset(Dataset):
    """``tiles``: int64 (N, 3) rows of (slide index, x, y) into ``slides``."""

    def __init__(self, slides: list[SlideSource], tiles: np.ndarray, tile_px: int, open_readers: int = 64,
                 tile_ids: list[str] | None = None) -> None:
        self.slides = slides
        self.tiles = np.asarray(tiles, dtype=np.int64)
        self.tile_ids = tile_ids
        self.tile_px = tile_px
        self.open_readers = open_readers
        self._readers: OrderedDict[int, TileReader] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.tiles)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # handles never cross a process boundary
        state["_pid"] = None
        return state

    def _reader(self, index: int) -> TileReader:
        if self._pid != os.getpid():  # a forked worker: the parent's handles (and file offsets) are not ours
            self._readers, self._pid = OrderedDict(), os.getpid()
        reader = self._readers.get(index)
        if reader is None:
            s = self.slides[index]
            reader = TileReader(s.path, s.vendor, s.level_dimensions, s.level_downsamples, s.size, self.tile_px)
            self._readers[index] = reader
            if len(self._readers) > self.open_readers:
                self._readers.popitem(last=False)[1].close()
        else:
            self._readers.move_to_end(index)
        return reader

    def __getitem__(self, i: int) -> torch.Tensor:
        slide, x, y = self.tiles[i]
        pixels = self._reader(int(slide)).read(int(x), int(y))
        stain = self.slides[int(slide)].stain
        if stain is not None:
            values = np.asarray(stain, dtype=np.float32)
            pixels = apply_od_transform(pixels, values[:9].reshape(3, 3), values[9:] if len(values) > 9 else None)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def close(self) -> None:
        if self._pid == os.getpid():
            for reader in self._readers.values():
                reader.close()
        self._readers.clear()


def dataset_from_catalog(catalog: Catalog, spec_id: str, tile_px: int, slide_ids: list[str] | None = None,
                         field: float = 1.0) -> TileDataset:
    """Every tile of ``spec_id`` on slides that are registered and healthy (optionally only ``slide_ids``),
    grouped by slide in slide-id order, read at ``tile_px``. ``field`` != 1 reads, for each tile, the square of
    ``field`` times its side centred on it (an encoder trained at another scale sees the tissue at its own
    microns per pixel; the tile grid and tile ids stay the spec's)."""
    slides = {s["slide_id"]: s for s in catalog.slides(status="ok")}
    if slide_ids is not None:
        wanted = set(slide_ids)
        slides = {k: v for k, v in slides.items() if k in wanted}
    table = catalog.tiles(spec_id=spec_id)
    if table.num_rows == 0:
        raise NoTilesError(f"no tiles under tiling spec {spec_id}: run `histcode tile` first")
    frame = table.select(["tile_id", "slide_id", "x", "y", "size"]).to_pandas()
    frame = frame[frame.slide_id.isin(slides)].sort_values(["slide_id", "y", "x"], kind="stable")
    if frame.empty:
        raise NoTilesError(f"none of the {len(slides)} selected slides has tiles under tiling spec {spec_id}: "
                           "run `histcode tile` first")
    sizes = frame.groupby("slide_id", sort=True)["size"].first()  # one tile size per slide and spec
    order = sizes.index.tolist()
    sources = []
    if field <= 0:
        raise ValueError(f"field must be positive, got {field}")
    shift = np.zeros(len(sizes), dtype=np.int64)
    for i, (sid, size) in enumerate(sizes.items()):
        s = slides[sid]
        read = max(1, round(int(size) * field))
        shift[i] = (int(size) - read) // 2
        sources.append(SlideSource(sid, s["path"], s["vendor"], s["level_dimensions"], s["level_downsamples"], read))
    index = {sid: i for i, sid in enumerate(order)}
    slide_index = frame.slide_id.map(index).to_numpy()
    offset = shift[slide_index]
    tiles = np.stack([slide_index, frame.x.to_numpy() + offset, frame.y.to_numpy() + offset], axis=1)
    return TileDataset(sources, tiles.reshape(-1, 3), tile_px, tile_ids=frame.tile_id.tolist())


class EpochSampler(Sampler[int]):
    """Indices of a fresh permutation per epoch, for ``num_steps`` batches of ``batch_size`` starting at
    ``start_step``; crosses epoch boundaries (dropping each epoch's incomplete last batch). With ``world_size``
    processes, each yields its strided share of every global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, num_steps: int, rank: int = 0,
                 world_size: int = 1, chunk: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.steps_per_epoch = n // batch_size
        if self.steps_per_epoch == 0:
            raise NoTilesError(f"{n} tiles are fewer than one batch of {batch_size}; lower pretrain.batch_size")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.num_steps = start_step, num_steps
        self.rank, self.world_size = rank, world_size
        self.chunk = max(1, chunk)

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order: a permutation of all tiles, or (``chunk`` > 1) of runs of ``chunk`` consecutive
        tiles (neighbours in a slide's tile rows, which share stored JPEG tiles), each run kept in read order."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.chunk == 1:
            return rng.permutation(self.n)
        starts = rng.permutation(np.arange(0, self.n, self.chunk))
        return np.concatenate([np.arange(s, min(s + self.chunk, self.n)) for s in starts])

    def __iter__(self) -> Iterator[int]:
        cached_epoch, perm = -1, None
        for step in range(self.start_step, self.start_step + self.num_steps):
            epoch, within = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, self.permutation(epoch)
            batch = perm[within * self.batch_size:(within + 1) * self.batch_size]
            yield from batch[self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        return self.num_steps * self.batch_size // self.world_size
