"""The executor of a slide run: reader -> device -> model -> assembler, chunk by chunk."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from captum_nmf._utils.activations import PendingCheck, model_lock
from captum_nmf._utils.cpus import usable_cpus
from captum_nmf.wsi.blocks import ReadingThreads, TileBatches, converted, to_model_input
from captum_nmf.wsi.regions import RegionTiles
from captum_nmf.wsi.run.assemble import Assembler
from captum_nmf.wsi.run.config import RunOptions, model_device
from captum_nmf.wsi.tiling import SlideTiles

__all__ = ["prefetched", "process"]


def decoders_for(device: torch.device) -> int:
    """Block-decoding threads for a model on ``device``: 1 on the CPU (it needs the cores).

    Elsewhere up to 8, and no more than the CPUs the process may use
    (:func:`~captum_nmf._utils.cpus.usable_cpus`: affinity and a container's CPU quota).
    """
    return 1 if device.type == "cpu" else min(8, usable_cpus())


def _source(
    assembler: Assembler, options: RunOptions, device: torch.device, threads: ReadingThreads
) -> SlideTiles | RegionTiles | TileBatches:
    """Where the batches come from: regions, the block reader (one thread) or worker processes."""
    plan = assembler.plan
    grid = plan.grid
    transform, policy, mpp = options.transform, options.on_tile_error, options.slide_mpp
    if plan.regions is not None:  # regions differ in size: one per forward
        return RegionTiles(
            grid.path,
            grid.resolution,
            plan.regions,
            plan.cell,
            grid.margin,
            transform=transform,
            slide_mpp=mpp,
            on_tile_error=policy,
        )
    if options.num_workers == 0:  # one reading thread, every slide pixel decoded once
        return TileBatches(
            grid,
            transform=transform,
            on_tile_error=policy,
            slide_mpp=mpp,
            pin_memory=device.type == "cuda",
            pool=threads.decoder_pool,  # shared across the slides of a cohort
        )
    return SlideTiles.from_grids([grid], transform=transform, on_tile_error=policy, slide_mpp=mpp)


def process(assembler: Assembler, options: RunOptions, done: int, *, progress: bool) -> None:
    """Run the chunks after the first ``done``: read, forward, assemble, commit each chunk.

    Tiles are read one batch ahead of the forward (a thread with ``num_workers=0``,
    else ``DataLoader`` worker processes), moved to the model's device and
    converted there (``uint8`` in, float N x 3 x T x T with ``batch_transform``);
    for a model on the CPU a converting thread does that one batch ahead too. For
    a model on the CPU that keeps every logical CPU busy, the model's thread reads
    and converts each batch itself, from the first batch on and while its work on
    the batches takes at least twice their reading (the same batches; see
    :func:`_ahead`). Each chunk is committed through the run store as soon as
    its last unit is in.
    The reading threads are the active :class:`~captum_nmf.wsi.blocks.ReadingThreads`
    (a cohort's, shared by its slides) or, without any, started for this run. So are
    the ``DataLoader`` worker processes of ``num_workers > 0`` in tile mode: a
    cohort's are started once (:meth:`~captum_nmf.wsi.blocks.ReadingThreads.tile_loader`);
    a single run, or region mode, starts its own.
    """
    plan = assembler.plan
    todo = plan.chunks[done:]
    if not todo:
        return
    size = 1 if plan.regions is not None else options.batch_size
    batches = [
        list(range(s, min(s + size, end))) for start, end in todo for s in range(start, end, size)
    ]
    chunk_end = {end: i + done for i, (_, end) in enumerate(todo)}
    device = model_device(assembler.attr)
    shared = ReadingThreads.active()
    threads = shared if shared is not None else ReadingThreads(decoders_for(device))
    threads.runs += 1
    try:
        _process(
            assembler,
            options,
            batches,
            chunk_end,
            device,
            threads,
            todo,
            progress,
            shared is not None,
        )
    finally:
        if shared is None:
            threads.close()


def _process(
    assembler: Assembler,
    options: RunOptions,
    batches: list[list[int]],
    chunk_end: dict[int, int],
    device: torch.device,
    threads: ReadingThreads,
    todo: list[tuple[int, int]],
    progress: bool,
    shared: bool,
) -> None:
    """:func:`process` with its batches planned and its reading threads chosen."""
    plan = assembler.plan
    reads, source = _reads(assembler, options, batches, device, threads, shared)
    bar = tqdm(
        total=sum(e - s for s, e in todo),
        disable=not progress,
        desc=f"explain {Path(plan.grid.path).name}",
        unit="tile" if plan.regions is None else "region",
    )
    batches_in = _ahead(reads, source, device, threads) if not options.num_workers else reads
    try:
        for images, idx, failed in batches_in:
            ids, lost = idx.numpy(), failed.numpy()
            # the layer's own tensor (a transient capture) is stitched before another thread's
            # forward of this model can reuse it: the model's lock spans both
            with model_lock(assembler.attr.forward_func, assembler.attr.layer):
                if ids.size:
                    act, output, pending = _forward(assembler, images, device, options)
                else:
                    act, output, pending = torch.empty(0, 0, 0, 0), None, None
                try:  # the stitching and the solve hold memory on the device too
                    assembler.add(act, output, ids, lost, pending)
                except torch.OutOfMemoryError as exc:
                    raise _out_of_memory(exc, assembler, options, device) from exc
                # dropped before the next forward: two batches' activations are never alive at once
                del act, output, pending
            bar.update(len(ids) + len(lost))
            last = int(max(ids.max(initial=-1), lost.max(initial=-1))) + 1
            if last in chunk_end:
                assembler.commit_chunk(chunk_end[last])
    finally:
        if isinstance(batches_in, Generator):  # stop the reader thread before closing its slide
            batches_in.close()
        bar.close()
        if source is not None:
            source.close()


def _reads(
    assembler: Assembler,
    options: RunOptions,
    batches: list[list[int]],
    device: torch.device,
    threads: ReadingThreads,
    shared: bool,
) -> tuple[Iterable[Any], SlideTiles | RegionTiles | TileBatches | None]:
    """The batches to iterate, and the source to close after them (None: a cohort's workers)."""
    plan = assembler.plan
    if shared and plan.regions is None and options.num_workers:
        workers = threads.tile_loader(  # a cohort's worker processes, kept across slides
            options.num_workers,
            transform=options.transform,
            on_tile_error=options.on_tile_error,
            slide_mpp=options.slide_mpp,
            pin_memory=device.type == "cuda",
        )
        return workers.batches(plan.grid, batches), None
    source = _source(assembler, options, device, threads)
    if isinstance(source, TileBatches):
        return (source.batch(b) for b in batches), source
    loader = DataLoader(
        source,
        batch_sampler=batches,
        num_workers=options.num_workers,
        collate_fn=source.collate_fn,
        pin_memory=device.type == "cuda",
    )
    return loader, source


def _forward(
    assembler: Assembler, images: Tensor, device: torch.device, options: RunOptions
) -> tuple[Tensor, Any, PendingCheck | None]:
    """The layer's activations, the model's output and the pending value check for one batch.

    The check is finished by the assembler once the batch's stitching is queued.

    Raises:
        torch.OutOfMemoryError: the device ran out of memory; the message names
                    the batch size to lower (finished chunks are kept for ``resume``).
    """
    attr = assembler.attr
    try:  # as attr.features, stitched before the next forward: the layer's own tensor will do
        result = attr._activations(
            to_model_input(images, device, options.batch_transform),
            None,
            bool(getattr(attr, "attribute_to_layer_input_", False)),
            return_output=True,
            transient=True,
            deferred=True,
            **options.forward,
        )
    except torch.OutOfMemoryError as exc:
        raise _out_of_memory(exc, assembler, options, device) from exc
    return cast(tuple[Tensor, Any, PendingCheck | None], result)


def _out_of_memory(
    exc: torch.OutOfMemoryError, assembler: Assembler, options: RunOptions, device: torch.device
) -> torch.OutOfMemoryError:
    """The device's out-of-memory error of a batch, naming what to lower and how to go on."""
    size = assembler.plan.grid.tile_size
    if assembler.plan.regions is None:  # the batch size is not part of the run's hash
        advice = (
            f"on a batch of {options.batch_size} tile(s) of {size} px ({exc}); finished "
            f"chunks are kept: lower batch_size (now {options.batch_size}) and run again "
            "with resume=True."
        )
    else:  # one region per forward: a smaller region is another plan
        advice = (
            f"on a batch of one region of {size} px ({exc}); finished chunks are kept "
            "for resume=True once the device has more free memory. Otherwise lower "
            f"region_size (now {options.region_size}) and run again with overwrite=True "
            "(regions of another size are another plan), or use mode='tile'."
        )
    return torch.OutOfMemoryError(f"{device.type} ran out of memory {advice}")


def _ahead(
    reads: Iterable[Any],
    source: SlideTiles | RegionTiles | TileBatches | None,
    device: torch.device,
    threads: ReadingThreads,
) -> Generator[Any, None, None]:
    """The batches, read one ahead of the forward (or, for a slow CPU model, in its thread).

    The block reader gives ``uint8`` batches. A model on a GPU gets them as they
    are (converted on the device); for one on the CPU the conversion is a stage
    of its own (:attr:`ReadingThreads.converter`) between the reading thread and
    the model's: on 2 cores, converting in the reading thread made it the
    slowest stage (measured in ``benchmarks/bench_pipeline.py`` (b)).

    A model on the CPU whose intra-op threads take every logical CPU of the
    process has its batches read in the model's (the calling) thread, from the
    first batch on and as long as the caller's work on them (forward, stitching,
    commits) takes at least :data:`_INLINE_FACTOR` times their reading
    (:func:`_inline_while_slow`): reading beside such a forward takes a core from
    its OpenMP team, whose threads wait for each other at every operation, and
    costs it more than the reading itself. The CPUs are those the process may
    use (:func:`_spare_core`); a hyperthread sibling left free by torch's
    default (one thread per physical core) counts as spare.
    """
    convert = device.type == "cpu" and isinstance(source, TileBatches) and source.transform is None
    if device.type == "cpu" and not _spare_core():
        return _inline_while_slow(reads, threads, convert)
    return _threaded(iter(reads), threads, convert)


def _threaded(
    reads: Iterator[Any], threads: ReadingThreads, convert: bool
) -> Generator[Any, None, None]:
    read = prefetched(reads, threads.reader)
    return _converted_ahead(read, threads) if convert else read


# a CPU model's work on a batch, in units of the batch's reading, from which it reads itself
_INLINE_FACTOR = 2.0


def _spare_core() -> bool:
    """Whether this process may use a logical CPU that torch's intra-op threads leave free.

    The CPUs are :func:`~captum_nmf._utils.cpus.usable_cpus` (affinity and a
    container's CPU quota count). In a container limited to 2 CPUs on a larger
    machine, torch's default threads (one per physical core it sees) already
    take them all, so the batches are read in the model's thread.
    """
    return torch.get_num_threads() < usable_cpus()


def _inline_while_slow(
    reads: Iterable[Any], threads: ReadingThreads, convert: bool
) -> Generator[Any, None, None]:
    """The batches read (and converted) in the caller's thread, then ahead once the work is cheap.

    After each batch the caller's time on the batches so far (the forward, the
    stitching, the chunk commits) is set against their reading; once it falls
    under :data:`_INLINE_FACTOR` times the reading, the rest is read ahead in
    :class:`ReadingThreads` as for a model with a core to spare. The batches
    are the same either way (bit-identical maps); only the thread that reads
    them changes. The switch is one-way, so a run never goes back and forth.
    """
    iterator = iter(reads)
    # converted in this thread: the batch being converted and the caller's last one are alive
    inline: Iterator[Any] = converted(iterator) if convert else iterator
    reading = working = 0.0
    while True:
        start = time.perf_counter()
        item = next(inline, _END)
        read = time.perf_counter()
        if item is _END:
            return
        yield item
        reading += read - start
        working += time.perf_counter() - read
        if working < _INLINE_FACTOR * reading:
            break
    del inline, item  # their float buffers go once the caller lets go of its batches
    yield from _threaded(iterator, threads, convert)


def _converted_ahead(
    read: Generator[Any, None, None], threads: ReadingThreads
) -> Generator[Any, None, None]:
    # 5 buffers: the batch being converted, the one converted ahead, the one in the model,
    # the one before it (still named by the caller's loop) and a spare
    stage = prefetched(converted(read, keep=5), threads.converter)
    try:
        yield from stage
    finally:  # the conversion in flight ends first, then the read it may have asked for
        stage.close()
        read.close()


_END = object()


def prefetched(iterable: Iterable[Any], executor: ThreadPoolExecutor) -> Generator[Any, None, None]:
    """Yield ``iterable``'s items, reading the next one in a background thread meanwhile.

    With ``num_workers=0`` this overlaps tile reading (OpenSlide's C decoder and
    PIL release the GIL) with the forward pass without a worker process.
    Exceptions (also ``KeyboardInterrupt``) reach the caller at the item that raised.
    ``executor`` (:attr:`ReadingThreads.reader`, shared by a cohort's slides)
    runs the reads. When the generator is closed early, the read in flight is
    waited for, so the caller may close the source right after.

    Raises:
        RuntimeError: ``executor`` was shut down while items were still to come.
    """
    iterator = iter(iterable)
    pending: Future[Any] = _submit(executor, next, iterator, _END)
    try:
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = _submit(executor, next, iterator, _END)
            yield item
    finally:
        wait([pending])  # a read still running must not outlive the caller's source


def _submit(executor: ThreadPoolExecutor, *call: Any) -> Future[Any]:
    """``executor.submit(*call)``; threads closed under a run are named as the cause.

    Raises:
        RuntimeError: ``executor`` was shut down (its :class:`ReadingThreads`
                    were closed while a run still used them).
    """
    try:
        return executor.submit(*call)
    except RuntimeError as exc:
        if not getattr(executor, "_shutdown", False):
            raise
        raise RuntimeError(
            "The reading threads were closed while a slide run still used them "
            "(ReadingThreads.close(), or the end of its `with` block, in another thread); "
            "keep them open until every run that uses them has returned."
        ) from exc
