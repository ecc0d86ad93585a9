"""Reading a tile grid with every slide pixel decoded once: a cache of aligned blocks.

Overlapping tiles (stride = tile / 2) cover every pixel of the slide up to four
times; reading them one by one decodes each pixel that often. A
:class:`BlockReader` reads the slide instead in square *blocks* of the level
being read, aligned to the grid's first tile, each block once, keeps the blocks
that later tiles still need, and cuts each tile out of them in memory.

The tiles are byte-identical to :meth:`Slide.read_tile` (test
``test_wsi_blocks.py``): a region read of OpenSlide is a per-pixel function of
the level's pixels when the region starts on a whole pixel of that level, and
compositing onto the background is per pixel. So blocks are used when the
level's downsample is a whole number and every tile starts on a whole level
pixel (always at level 0); otherwise, and for any tile touching a block that
could not be read, the tile is read on its own, exactly as before, with the
same retry, errors and ``on_tile_error`` behaviour.

Memory is bounded: blocks are dropped once the raster order has passed them,
and the cache never holds more than ``max_bytes`` (default 512 MiB; a 512 px
tile row of a 100,000 px wide slide at level 0 holds about 150 MiB). Over the
budget, blocks that raster order has passed go first (the top block row left
of the current tile), then the least recently used, so a budget of one block
row and two blocks still decodes each block once in raster order.
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from torch import Tensor

from captum_nmf._utils.describe import describe
from captum_nmf._utils.validation import check_int
from captum_nmf.exceptions import SlideReadError
from captum_nmf.wsi.reader import Slide
from captum_nmf.wsi.tiling import PersistentTileLoader, TileGrid, TileRequests

__all__ = ["BlockReader", "ReadingThreads", "TileBatches", "converted", "to_model_input"]

RGB = NDArray[np.uint8]


class BlockReader:
    """Tiles of one :class:`TileGrid`, cut from blocks of the slide read once each.

    Args:
        slide (Slide): the open slide of ``grid``.
        grid (TileGrid): the tiles to read (raster order is the efficient order;
                    any order is correct).
        block (int, optional): block side in pixels of the level read; None
                    uses the tile stride at that level (rounded), so that
                    tiles at stride = tile / 2 are exactly 2 x 2 blocks.
                    Default: None
        max_bytes (int, optional): most bytes of blocks kept at once.
                    Default: 512 MiB

    Attributes:
        blocks_read (int): blocks decoded so far.
        pixels_read (int): level pixels decoded so far (blocks and single tiles).
        single_reads (int): tiles read on their own (no exact alignment, or a
                    failed block).
    """

    def __init__(
        self,
        slide: Slide,
        grid: TileGrid,
        *,
        block: int | None = None,
        max_bytes: int = 512 << 20,
    ) -> None:
        self.slide = slide
        self.grid = grid
        res = grid.resolution
        self.read_size = max(1, round(grid.tile_size * res.resample))  # level px per tile
        ds = float(res.downsample)
        self._ds = round(ds)
        locations = grid.locations
        self.exact = abs(ds - self._ds) < 1e-9 and bool(
            len(locations) == 0 or not (locations % self._ds).any()
        )
        side = block if block is not None else round(grid.stride * res.resample)
        self.block = max(16, int(side))
        self.max_bytes = int(max_bytes)
        # level-pixel origin of the block lattice: the grid's (0, 0) tile corner
        m = grid.margin * res.scale
        self._origin = (int(np.rint(-m)) // self._ds, int(np.rint(-m)) // self._ds)
        self._cache: OrderedDict[tuple[int, int], RGB | None] = OrderedDict()
        self._bytes = 0
        self._at = (0, 0)  # (block row, block col) of the tile being cut: raster order's place
        self.blocks_read = 0
        self.pixels_read = 0
        self.single_reads = 0

    # ---------------------------------------------------------------- public
    def read(self, index: int, out: RGB | None = None) -> RGB:
        """The ``uint8`` pixels (T x T x 3) of tile ``index``, equal to ``Slide.read_tile``.

        Args:
            index (int): the tile in ``grid``.
            out (ndarray, optional): a writable T x T x 3 ``uint8`` array (e.g.
                        a batch's slot) that receives the tile instead of a new
                        array; it is returned. When the read raises, ``out`` may
                        hold part of the tile (a batch reuses that slot).
                        Default: None

        Raises:
            SlideReadError: as :meth:`Slide.read_tile`, when the tile's own read
                        (after a block failed) fails twice.
            ValueError: ``out`` is not a T x T x 3 ``uint8`` array.
        """
        t = self.grid.tile_size
        if out is not None and (out.shape != (t, t, 3) or out.dtype != np.uint8):
            raise ValueError(
                f"out must be a {t} x {t} x 3 uint8 array, got {out.shape} {out.dtype}."
            )
        direct = out if self.read_size == t else None  # cut straight into it
        tile = self._cut(index, direct)
        if out is None or tile is out:
            return tile
        out[...] = tile
        return out

    def _cut(self, index: int, out: RGB | None) -> RGB:
        """:meth:`read` of ``index``, cut into ``out`` (read_size square) when given."""
        x, y = self.grid.location(index)
        if not self.exact:
            return self._single(x, y)
        lx, ly = x // self._ds, y // self._ds
        r, b = self.read_size, self.block
        ox, oy = self._origin
        rows, cols = self._blocks_of(index)
        self._evict_above(rows.start)
        self._at = (rows.start, cols.start)
        if out is None:
            out = np.empty((r, r, 3), dtype=np.uint8)
        for by in rows:
            for bx in cols:
                pixels = self._block(bx, by)
                if pixels is None:  # a block that failed: this tile is read on its own
                    return self._single(x, y)
                top, left = oy + by * b, ox + bx * b
                y0, y1 = max(ly, top), min(ly + r, top + b)
                x0, x1 = max(lx, left), min(lx + r, left + b)
                out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = pixels[
                    y0 - top : y1 - top, x0 - left : x1 - left
                ]
        return self._resampled(out)

    def clear(self) -> None:
        """Drop every cached block."""
        self._cache.clear()
        self._bytes = 0

    # -------------------------------------------------------------- internals
    def _resampled(self, pixels: RGB) -> RGB:
        t = self.grid.tile_size
        if pixels.shape[0] == t:
            return pixels
        return np.array(Image.fromarray(pixels).resize((t, t), Image.Resampling.BOX))

    def _single(self, x: int, y: int) -> RGB:
        self.single_reads += 1
        self.pixels_read += self.read_size**2
        return self.slide.read_tile((x, y), self.grid.resolution, self.grid.tile_size)

    def _block(self, bx: int, by: int) -> RGB | None:
        key = (by, bx)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pixels = self.read_block(self.slide, key)
        self._store(key, pixels)
        return pixels

    def read_block(self, slide: Slide, key: tuple[int, int]) -> RGB | None:
        """Decode block ``(row, col)`` with ``slide`` (a handle of the file); None if that fails."""
        by, bx = key
        b = self.block
        ox, oy = self._origin
        left, top = ox + bx * b, oy + by * b
        try:  # only copied out of: the read-only pixels save a pass
            return slide.read_pixels(
                (left * self._ds, top * self._ds), self.grid.resolution.level, (b, b)
            )
        except SlideReadError:
            return None

    def _store(self, key: tuple[int, int], pixels: RGB | None) -> None:
        self.blocks_read += 1
        self.pixels_read += self.block * self.block
        self._cache[key] = pixels
        self._bytes += 0 if pixels is None else pixels.nbytes
        if self._bytes <= self.max_bytes:
            return
        row, col = self._at  # first the blocks raster order has passed: never needed again
        for passed in [k for k in self._cache if k[0] == row and k[1] < col and k != key]:
            if self._bytes <= self.max_bytes:
                return
            old = self._cache.pop(passed)
            self._bytes -= 0 if old is None else old.nbytes
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= 0 if old is None else old.nbytes

    def missing_blocks(self, indices: list[int]) -> list[tuple[int, int]]:
        """The ``(row, col)`` blocks tiles ``indices`` need that are not cached, in order."""
        if not self.exact:
            return []
        keys: dict[tuple[int, int], None] = {}
        for i in indices:
            rows, cols = self._blocks_of(i)
            keys.update(
                ((by, bx), None) for by in rows for bx in cols if (by, bx) not in self._cache
            )
        return list(keys)

    def prefetch(
        self, indices: list[int], pool: ThreadPoolExecutor, slides: Callable[[], Slide]
    ) -> None:
        """Decode the blocks tiles ``indices`` need in ``pool``'s threads (``slides()``: a handle).

        OpenSlide decodes without the GIL, so blocks of one batch decode in parallel;
        the cache is only changed here, in the calling thread.
        """
        keys = self.missing_blocks(indices)
        if len(keys) < 2:
            return
        rows, cols = min(
            (self._blocks_of(i) for i in indices), key=lambda rc: (rc[0].start, rc[1].start)
        )
        self._evict_above(rows.start)  # rows raster order has passed; never one this batch needs
        self._at = (rows.start, cols.start)
        free = (self.max_bytes - self._bytes) // (self.block * self.block * 3)
        keys = keys[: max(2, free)]  # within the budget; the rest are decoded as they are cut

        def decode(key: tuple[int, int]) -> RGB | None:
            return self.read_block(slides(), key)  # in the pool's thread: its own handle

        futures = [pool.submit(decode, k) for k in keys]
        try:
            for key, future in zip(keys, futures, strict=True):
                self._store(key, future.result())
        finally:  # an error must not leave decodes running on handles the run will close
            wait(futures)

    def _blocks_of(self, index: int) -> tuple[range, range]:
        """The block rows and columns tile ``index`` overlaps (exact reads only)."""
        x, y = self.grid.location(index)
        ox, oy = self._origin
        lx, ly = x // self._ds - ox, y // self._ds - oy
        b, r = self.block, self.read_size
        return range(ly // b, (ly + r - 1) // b + 1), range(lx // b, (lx + r - 1) // b + 1)

    def _evict_above(self, block_row: int) -> None:
        """Drop blocks of rows above ``block_row``: raster order has passed them."""
        for key in [k for k in self._cache if k[0] < block_row]:
            old = self._cache.pop(key)
            self._bytes -= 0 if old is None else old.nbytes


_ACTIVE: contextvars.ContextVar[ReadingThreads | None] = contextvars.ContextVar(
    "captum_nmf_reading_threads", default=None
)


class ReadingThreads:
    """The threads that read slides, started once and reused by every slide run in their ``with``.

    One thread reads the next batch while the model runs on the current one;
    for a model on the CPU another converts the ``uint8`` batch read before to
    float (a third stage, so that reading and conversion do not queue behind
    each other; in tile mode without a per-tile ``transform``, which converts
    in the reading thread). For a model on the CPU whose intra-op threads take
    every logical CPU, and whose work on a batch takes at least twice its
    reading, the model's thread reads instead: reading beside it would cost its
    OpenMP team more than the reading itself. ``decoders`` threads (if more than
    one) decode the blocks of a batch in parallel, each with its own slide
    handle. :func:`~captum_nmf.wsi.explain_slide` (with ``num_workers=0``) uses
    the threads active in the calling context and otherwise starts its own for
    the slide; :func:`~captum_nmf.wsi.explain_cohort` starts one set for all its
    slides, so no slide pays a thread start-up. The threads hold no slide: each
    run opens and closes its own handles.

    Args:
        decoders (int, optional): threads decoding blocks; 1 decodes in the
                    reading thread (right for a model on the CPU, which needs
                    the cores). Default: 1

    Raises:
        TypeError: ``decoders`` is not an int.
        ValueError: ``decoders`` is below 1.

    Examples::

        >>> from captum_nmf.wsi.blocks import ReadingThreads
        >>> with ReadingThreads(decoders=4) as threads:  # doctest: +SKIP
        ...     for path in slides:
        ...         explain_slide(attr, path, out_dir=out / Path(path).stem)
    """

    def __init__(self, decoders: int = 1) -> None:
        check_int("decoders", decoders, minimum=1, hint="pass e.g. decoders=8 for a GPU model.")
        self.decoders = int(decoders)
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="captum-nmf-read")
        # started at its first batch: only runs of a model on the CPU convert here
        self.converter = ThreadPoolExecutor(1, thread_name_prefix="captum-nmf-convert")
        self.decoder_pool: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(self.decoders, thread_name_prefix="captum-nmf-block")
            if self.decoders > 1
            else None
        )
        self.runs = 0  # slide runs that used these threads
        self.closed = False
        # DataLoader worker processes (num_workers > 0), one set per reading configuration
        self._loaders: dict[tuple[Any, ...], tuple[PersistentTileLoader, str | None]] = {}
        self._local = threading.local()  # each thread's stack of context tokens
        self._depth = 0  # open `with` blocks, over all threads: the last one closes
        self._lock = threading.Lock()

    @staticmethod
    def active() -> ReadingThreads | None:
        """The threads active in the calling context, if any."""
        return _ACTIVE.get()

    @contextmanager
    def activated(self) -> Iterator[ReadingThreads]:
        """Make these threads the active ones inside the block (without closing them after).

        Raises:
            RuntimeError: the threads were closed.
        """
        self._check_open()
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def __enter__(self) -> ReadingThreads:
        with self._lock:
            self._check_open()
            self._depth += 1
        tokens = self._local.__dict__.setdefault("tokens", [])
        tokens.append(_ACTIVE.set(self))
        return self

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                "These ReadingThreads were closed (their `with` block ended or close() was "
                "called); create a new ReadingThreads()."
            )

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._local.tokens.pop())
        with self._lock:
            self._depth -= 1
            last = self._depth == 0
        if last:  # a nested or another thread's `with` leaves the threads running
            self.close()

    def tile_loader(
        self,
        num_workers: int,
        *,
        transform: Callable[[Tensor], Tensor] | None,
        on_tile_error: str,
        slide_mpp: float | None,
        pin_memory: bool,
    ) -> PersistentTileLoader:
        """Worker processes for ``num_workers > 0`` runs, started at the first and kept.

        One set per configuration (workers, transform (the same object, hashable
        or not), error policy, mpp, pinning), so every slide of a cohort reads
        through the same processes. The workers hold the transform as it was
        when they started: when its description
        (:func:`~captum_nmf._utils.describe.describe`: code, arguments,
        attributes, weights) has changed since (a stain normaliser refitted in
        place between slides), that set is closed and a new one started.

        Raises:
            RuntimeError: the threads were closed.
        """
        self._check_open()
        # the transform by identity: a dataclass or other unhashable callable is fine,
        # and the loader keeps it alive, so its id is not reused while the key exists
        key = (num_workers, id(transform), on_tile_error, slide_mpp, pin_memory)
        state = describe(transform)
        entry = self._loaders.get(key)
        if entry is not None and entry[1] != state:  # changed in place: the workers' is old
            entry[0].close()
            entry = None
        if entry is None:
            requests = TileRequests(
                transform=transform,
                on_tile_error=on_tile_error,  # type: ignore[arg-type]
                slide_mpp=slide_mpp,
            )
            entry = self._loaders[key] = (
                PersistentTileLoader(num_workers, requests, pin_memory=pin_memory),
                state,
            )
        return entry[0]

    def close(self) -> None:
        """Stop the threads and worker processes (after the work they hold).

        Closing twice is harmless.
        """
        self.closed = True
        for loader, _ in self._loaders.values():
            loader.close()
        self._loaders.clear()
        self.reader.shutdown(wait=True)
        self.converter.shutdown(wait=True)
        if self.decoder_pool is not None:
            self.decoder_pool.shutdown(wait=True)


class TileBatches:
    """Batches of a grid's tiles read through a :class:`BlockReader`, for one reading thread.

    ``batch(indices)`` returns ``(images, indices, failed)`` like
    :meth:`SlideTiles.collate_fn`. Without a per-tile ``transform`` the images
    stay ``uint8`` (N x T x T x 3, in pinned memory when ``pin_memory``) so
    that they cross to a GPU at a quarter of the bytes and are converted there
    (:func:`to_model_input`); with one, each tile is converted and transformed
    here as :class:`SlideTiles` does (N x 3 x T x T float).

    Args:
        grid (TileGrid): the tiles.
        transform (Callable, optional): per-tile transform of 3 x T x T in [0, 1].
                    Default: None
        on_tile_error (str, optional): ``"raise"`` or ``"skip"`` (failed tiles
                    go to ``failed``).
                    Default: ``"raise"``
        slide_mpp (float, optional): microns per level-0 pixel, as for :class:`Slide`.
                    Default: None
        pin_memory (bool, optional): allocate ``uint8`` batches in pinned memory.
                    Default: False
        threads (int, optional): threads decoding the blocks of a batch in
                    parallel (each with its own slide handle); 1 decodes in the
                    calling thread. Meant for a model on a GPU, whose CPU cores
                    would otherwise wait (measured only on the CPU so far).
                    Default: 1
        convert (bool, optional): convert ``uint8`` batches to float N x 3 x T x T
                    in :meth:`batch` (in the calling thread, into reused buffers)
                    instead of on the device. Slide runs convert in a thread of
                    their own instead (:func:`converted`).
                    Default: False
        pool (ThreadPoolExecutor, optional): decoding threads shared with other
                    slides (:attr:`ReadingThreads.decoder_pool`); used instead of
                    ``threads`` and left running by :meth:`close`.
                    Default: None
    """

    def __init__(
        self,
        grid: TileGrid,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        on_tile_error: str = "raise",
        slide_mpp: float | None = None,
        pin_memory: bool = False,
        threads: int = 1,
        convert: bool = False,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.grid = grid
        self.convert = convert
        self.transform = transform
        self.on_tile_error = on_tile_error
        self.pin_memory = pin_memory
        self.slide_mpp = slide_mpp
        self.slide = Slide(grid.path, fallback_mpp=slide_mpp)
        self.reader = BlockReader(self.slide, grid)
        self._own_pool = pool is None and threads > 1
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="captum-nmf-block")
            if self._own_pool
            else pool
        )
        self._buffers = _BatchBuffers()
        self._local = threading.local()
        self._handles: list[Slide] = []
        self._lock = threading.Lock()

    def _thread_slide(self) -> Slide:
        """This thread's own handle of the slide (OpenSlide errors are per handle)."""
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = self._local.slide = Slide(self.grid.path, fallback_mpp=self.slide_mpp)
            with self._lock:
                self._handles.append(slide)
        return slide

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Read ``indices``: ``(images, read indices, failed indices)``.

        Returns:
            *tuple[Tensor, Tensor, Tensor]*: images (``uint8`` N x T x T x 3
            without a transform, else float N x 3 x T x T), their indices and
            the indices of tiles that could not be read (``int64``).

        Raises:
            SlideReadError: a tile could not be read and ``on_tile_error="raise"``.
        """
        t = self.grid.tile_size
        good: list[int] = []
        failed: list[int] = []
        pixels: list[RGB] = []
        if self._pool is not None:
            self.reader.prefetch(list(indices), self._pool, self._thread_slide)
        # without a transform each tile is cut straight into its slot of the batch
        images = (
            torch.empty((len(indices), t, t, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
            if self.transform is None and len(indices)
            else None
        )
        slots = None if images is None else images.numpy()
        for i in indices:
            try:
                tile = self.reader.read(i, None if slots is None else slots[len(good)])
                if slots is None:
                    pixels.append(tile)
                good.append(i)
            except SlideReadError:
                if self.on_tile_error == "raise":
                    raise
                failed.append(i)
        idx = torch.tensor(good, dtype=torch.int64)
        lost = torch.tensor(failed, dtype=torch.int64)
        if not good:
            return torch.empty(0), idx, lost
        transform = self.transform
        if transform is not None:
            stacked = torch.stack([transform(_to_tensor(p)) for p in pixels])
            # pinned here, in the reading thread: a non_blocking copy from pageable memory
            # would wait for the device's queued work (the previous batch's forward)
            pin = self.pin_memory and stacked.device.type == "cpu"
            return (stacked.pin_memory() if pin else stacked), idx, lost
        batch = cast(Tensor, images)[: len(good)]  # the tiles that failed left no slot behind
        return (_to_float(batch, self._buffers) if self.convert else batch), idx, lost

    def close(self) -> None:
        """Stop its own decoding threads, close every slide handle and drop the cached blocks."""
        if self._pool is not None and self._own_pool:
            self._pool.shutdown(wait=True)
        self.reader.clear()
        self.slide.close()
        for slide in self._handles:
            slide.close()
        self._handles = []


def to_model_input(
    images: Tensor,
    device: torch.device,
    batch_transform: Callable[[Tensor], Tensor] | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Move a batch to ``device``; ``uint8`` N x T x T x 3 becomes float N x 3 x T x T in [0, 1].

    The conversion runs on ``device`` (bit-identical to converting each tile
    on the CPU), then ``batch_transform``, if any, on the whole batch there.
    ``out`` (float32 N x 3 x T x T on ``device``) receives the conversion
    instead of a new tensor.

    Returns:
        *Tensor*: the model's input batch on ``device``.
    """
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.uint8:  # contiguous N x 3 x T x T, as stacking converted tiles gives
        if out is not None:  # one pass (permute + cast), then the same division
            x = out.copy_(x.permute(0, 3, 1, 2)).div_(255.0)
        else:
            x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    return x if batch_transform is None else batch_transform(x)


_USE_COUNT: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def converted(
    batches: Iterator[tuple[Tensor, Tensor, Tensor]], keep: int = 3
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``batches`` of ``(images, indices, failed)`` with ``uint8`` images converted for the CPU.

    Each ``uint8`` N x T x T x 3 batch becomes float N x 3 x T x T in [0, 1]
    (:func:`to_model_input`, bit-identical), written into one of ``keep``
    reused buffers once no one else holds it; float and empty batches pass
    unchanged.

    Args:
        batches (Iterator): ``(images, indices, failed)`` as :meth:`TileBatches.batch` gives.
        keep (int, optional): buffers kept for reuse: the batches alive at once.
                    Default: 3

    Returns:
        *Iterator*: the batches, converted one at a time as they are asked for.

    Raises:
        TypeError: ``keep`` is not an int.
        ValueError: ``keep`` is below 1.
    """
    return _converting(batches, _BatchBuffers(keep))  # keep is checked here, not at a batch


def _converting(
    batches: Iterator[tuple[Tensor, Tensor, Tensor]], pool: _BatchBuffers
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    for images, idx, failed in batches:
        converting = images.dtype == torch.uint8 and len(images)
        yield (_to_float(images, pool) if converting else images), idx, failed


def _to_float(images: Tensor, pool: _BatchBuffers) -> Tensor:
    """:func:`to_model_input` of a ``uint8`` CPU batch, into a free buffer of ``pool``."""
    n, t, w = images.shape[:3]
    return to_model_input(images, torch.device("cpu"), out=pool.take((n, 3, t, w)))


class _BatchBuffers:
    """Float batch buffers for the CPU conversion, reused once nothing else holds them.

    glibc hands every allocation above 32 MiB (a 16 x 3 x 512 x 512 float batch is
    48 MiB) out as a fresh ``mmap`` and returns it on free, so a new batch tensor
    page-faults all its memory in again: 12 of the 16 ms of converting such a batch
    on this CPU. A buffer is handed out as a tensor of its own on the pool's storage
    (not a view: holding its ``_base`` would hold nothing new), and taken again only
    when that storage has no user but the pool (torch's storage use count), so a
    model or hook that keeps its input, or any view of it, never sees it
    overwritten. Not detected: keeping only ``x.untyped_storage()`` (torch hands
    every caller the same Python object, which the pool's check holds too).
    Without that count (another torch version) every batch is a new tensor.
    """

    def __init__(self, keep: int = 3) -> None:
        check_int("keep", keep, minimum=1, hint="keep at least the batches alive at once.")
        self.keep = int(keep)  # the batch being filled, the one in the model, one spare
        self._pool: list[Tensor] = []
        self.reused = 0

    def take(self, shape: tuple[int, ...]) -> Tensor:
        """A float32 CPU tensor of ``shape``: a free pooled buffer's alias, or a new tensor."""
        if _USE_COUNT is not None:
            for buf in self._pool:
                if tuple(buf.shape) == shape and _USE_COUNT(buf.untyped_storage()._cdata) <= 2:
                    self.reused += 1
                    return _alias(buf)
        new = torch.empty(shape, dtype=torch.float32)
        if _USE_COUNT is None:
            return new
        if len(self._pool) >= self.keep:
            self._pool.pop(0)
        self._pool.append(new)
        return _alias(new)


def _alias(buf: Tensor) -> Tensor:
    """A new tensor (no ``_base``) over ``buf``'s storage, with ``buf``'s shape and strides."""
    return torch.empty(0, dtype=buf.dtype).set_(buf.untyped_storage(), 0, buf.shape, buf.stride())


def _to_tensor(pixels: RGB) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)
