"""``explain_cohort``: many slides, in this process or spread over Ray actors, restartable.

Each slide is explained by :func:`~captum_nmf.wsi.explain_slide` into its own
directory under ``out_dir`` (the same chunked, atomic, resumable format as a
single run), so a cohort that is interrupted and started again skips the
slides whose run is complete (after checking that their configuration, model
and slide hashes match) and resumes the one it was working on from its last
finished chunk.

With ``engine="ray"`` the slides are dealt to Ray actors, each holding a copy
of the model (one actor per GPU when the cluster has GPUs, else ``workers``
actors sharing the CPUs). An actor that dies mid-slide (killed, out of memory,
a crashed node) is replaced and the slide is retried once, resuming from its
finished chunks; a slide that fails twice, or raises an error of its own (a
corrupt file), is reported as failed in the cohort summary while every other
slide completes. Results are the same as the local engine's: the same code
runs each slide.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import io
import json
import logging
import os
import re
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._utils.activations import module_of
from captum_nmf._utils.validation import check_int, is_positive_number
from captum_nmf.engines import check_engine
from captum_nmf.engines.ray_actors import ActorPool, ActorWorker, TaskOutcome
from captum_nmf.engines.ray_cluster import ray_session
from captum_nmf.exceptions import RunLockedError, RunStateError
from captum_nmf.io import atomic_write_all, sha256_bytes
from captum_nmf.wsi.blocks import ReadingThreads
from captum_nmf.wsi.explanation import EXPLANATION_FILE
from captum_nmf.wsi.run.config import model_device
from captum_nmf.wsi.run.execute import decoders_for
from captum_nmf.wsi.runner import MANIFEST_FILE, check_run_options, explain_slide
from captum_nmf.wsi.store import RunLock
from captum_nmf.wsi.tiling import check_tiling_options

__all__ = ["COHORT_FILE", "CohortResult", "SlideRecord", "explain_cohort"]

COHORT_FILE = "cohort.json"
COHORT_FORMAT = "captum-nmf/cohort-summary"
# the temporary files of the summary's atomic writes (`.{name}.{pid}-{n}.tmp`)
_SUMMARY_TMP = re.compile(r"\.cohort\.(?:json|csv)\.[0-9]+(?:-[0-9]+)?\.tmp")
_RESERVED = ("out_dir", "resume", "overwrite", "progress")

Status = Literal["done", "skipped", "failed", "pending"]
#: the cohort's own lock in ``out_dir``: one cohort at a time writes there
COHORT_LOCK = ".captum-nmf-cohort.lock"
_log = logging.getLogger(__name__)


@dataclass
class SlideRecord:
    """What happened to one slide of a cohort.

    Attributes:
        slide (str): the slide file (absolute).
        out_dir (str): its run directory.
        status (str): ``"done"`` (explained now), ``"skipped"`` (a complete
                    run with the same configuration was already there),
                    ``"failed"``, or ``"pending"`` (not finished yet: only in
                    the summaries written while the cohort runs, or left by
                    one that was stopped).
        attempts (int): runs started for it (2 after a retry).
        error (str or None): why it failed: the exception's type and whole message.
        n_tiles (int): tiles of its grid (0 when failed).
        n_failed_tiles (int): tiles that could not be read (``on_tile_error="skip"``).
        seconds (float): wall time of its last attempt.
        worker (str): ``"local"``, or ``"ray:<pid>"`` of the Ray actor that ran it.
        traceback (str or None): the failure's full traceback (also logged),
                    so a bug in the library is told apart from a bad slide.
    """

    slide: str
    out_dir: str
    status: Status
    attempts: int = 1
    error: str | None = None
    n_tiles: int = 0
    n_failed_tiles: int = 0
    seconds: float = 0.0
    worker: str = "local"
    traceback: str | None = None


_CSV_FIELDS = [f.name for f in fields(SlideRecord)]  # the table's columns


@dataclass
class CohortResult:
    """The summary of a cohort run (also written to ``out_dir/cohort.json`` and ``.csv``).

    Attributes:
        records (list[SlideRecord]): one per slide, in the order given.
        engine (str): ``"local"`` or ``"ray"``.
        workers (int): actors used (1 for the local engine).
        seconds (float): wall time of the whole run.
        out_dir (str): the cohort directory.
        config (dict): the engine and the per-slide options (as text).
        complete (bool): every slide has finished (done, skipped or failed);
                    False in the summaries written while the cohort runs, so a
                    summary left by a stopped cohort says so.
    """

    records: list[SlideRecord]
    engine: str
    workers: int
    seconds: float
    out_dir: str
    config: dict[str, Any] = field(default_factory=dict)
    complete: bool = False

    @property
    def failed(self) -> list[SlideRecord]:
        """The slides that failed."""
        return [r for r in self.records if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no slide failed."""
        return not self.failed

    def counts(self) -> dict[str, int]:
        """Number of slides per status."""
        found = Counter(r.status for r in self.records)
        return {s: found.get(s, 0) for s in ("done", "skipped", "failed", "pending")}

    def throughput(self) -> dict[str, float]:
        """Slides per minute and tiles per second over the slides explained in this run."""
        done = [r for r in self.records if r.status == "done"]
        minutes = self.seconds / 60.0
        return {
            "slides_per_min": len(done) / minutes if minutes > 0 else 0.0,
            "tiles_per_s": sum(r.n_tiles for r in done) / self.seconds if self.seconds else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "engine": self.engine,
            "workers": self.workers,
            "seconds": self.seconds,
            "out_dir": self.out_dir,
            "format": COHORT_FORMAT,
            "complete": self.complete,
            "n_slides": len(self.records),
            "counts": self.counts(),
            "throughput": self.throughput(),
            "config": self.config,
            "records": [asdict(r) for r in self.records],
        }

    def save(self) -> Path:
        """Write ``cohort.json`` and ``cohort.csv`` into :attr:`out_dir`, each atomically.

        Both files are written in full before either replaces its old
        version (the table first, the JSON record last), so a full disk
        leaves both old files. The JSON holds the table's SHA-256
        (``csv_sha256``): a process killed between the two replacements
        leaves a newer table beside the older JSON, which that digest shows.

        Returns:
            *Path*: the JSON file.
        """
        path = Path(self.out_dir) / COHORT_FILE
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in self.records)
        text = table.getvalue()
        record = {**self.to_dict(), "csv_sha256": sha256_bytes(text.encode("utf-8"))}
        with atomic_write_all([path.with_suffix(".csv"), path], newline="") as (csv_fh, json_fh):
            csv_fh.write(text)
            json_fh.write(json.dumps(record, indent=2, default=str))
        return path

    def __repr__(self) -> str:
        c = self.counts()
        pending = f", {c['pending']} pending" if c["pending"] else ""
        return (
            f"CohortResult({len(self.records)} slides: {c['done']} done, {c['skipped']} "
            f"skipped, {c['failed']} failed{pending}; engine={self.engine!r}, "
            f"workers={self.workers}, {self.seconds:.1f} s)"
        )


def slide_dirs(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """One run directory per slide: its file stem, plus a path hash when stems collide.

    A folder an earlier run of the slide wrote (its manifest names the slide)
    is kept, under either name or one the user gave it, so a slide added to a
    restarted cohort never moves the finished ones. Stems are compared without case (a
    case-insensitive disk). A stem whose folder holds the run of another slide
    that is still on disk gets the hash too; one whose slide is no longer at
    its recorded path (the slides were moved) is kept, and the run checks that
    it is the same slide by its content.
    """
    stems = Counter(p.stem.casefold() for p in paths)
    owner = _runs_in(out_dir)  # every folder's manifest read once
    found: dict[str, Path] = {}  # per slide, its first folder that is not a link
    for folder, slide in owner.items():
        if not folder.is_symlink():
            found.setdefault(slide, folder)

    def run_of(folder: Path) -> str | None:  # a name not listed may be there in another case
        return owner[folder] if folder in owner else _run_of(folder)

    dirs = []
    for p in paths:
        plain = out_dir / p.stem
        hashed = out_dir / f"{p.stem}-{hashlib.sha256(os.fsencode(p)).hexdigest()[:8]}"
        other = run_of(plain)
        if run_of(hashed) == str(p):
            dirs.append(hashed)
        elif other == str(p):
            dirs.append(plain)
        elif str(p) in found:  # a folder the user renamed
            dirs.append(found[str(p)])
        elif stems[p.stem.casefold()] > 1 or (other is not None and _another_slide(other, p)):
            dirs.append(hashed)
        else:
            dirs.append(plain)
    return dirs


def _runs_in(out_dir: Path) -> dict[Path, str]:
    """The slide each run folder in ``out_dir`` was written for, in name order."""
    owner: dict[Path, str] = {}
    with contextlib.suppress(OSError):
        for entry in sorted(out_dir.iterdir()):
            slide = _run_of(entry) if entry.is_dir() else None
            if slide is not None:
                owner[entry] = slide
    return owner


def _another_slide(recorded: str, slide: Path) -> bool:
    """Whether ``recorded`` is a slide still on disk that is not ``slide`` (not moved away)."""
    return Path(recorded).exists() and os.path.realpath(recorded) != os.path.realpath(slide)


def _run_of(folder: Path) -> str | None:
    """The slide a run folder's manifest names (None: no readable manifest)."""
    try:
        slide = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")).get("slide")
    except (OSError, ValueError, AttributeError):
        return None
    return slide if isinstance(slide, str) else None


def _complete(run_dir: Path) -> bool:
    try:
        manifest = json.loads((run_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("status") == "complete" and (run_dir / EXPLANATION_FILE).is_file()


def _explain_one(
    attr: NMFConceptAttribution,
    slide: str,
    run_dir: str,
    options: dict[str, Any],
    worker: str,
) -> SlideRecord:
    """Explain one slide into ``run_dir`` (resuming or skipping a previous run there)."""
    start = time.perf_counter()
    was_complete = _complete(Path(run_dir))
    result = explain_slide(attr, slide, out_dir=run_dir, resume=True, progress=False, **options)
    return SlideRecord(
        slide=slide,
        out_dir=run_dir,
        status="skipped" if was_complete else "done",
        n_tiles=len(result.tile_locations),
        n_failed_tiles=len(result.failed_tiles),
        seconds=time.perf_counter() - start,
        worker=worker,
    )


#: A single run's advice in a run-state message ("pass overwrite=True to start it over (...).",
#: "pass resume=False with another directory, or overwrite=True."): a cohort takes neither.
_SINGLE_RUN_ADVICE = re.compile(
    r"[;,.]? ?(?:[Pp]ass |or )?(?:resume=(?:True|False)|overwrite=True)\b"
    r"[^.(]*(?:\([^)]*\))?[^.]*\."
)


def _failure(exc: BaseException) -> str:
    """The exception's type and whole message, with the cohort's advice for run-state errors."""
    message = f"{type(exc).__name__}: {str(exc).strip()}".strip()
    if isinstance(exc, RunLockedError):  # a live process writes it: nothing to delete
        message += " In a cohort: run the cohort again once that process has finished."
    elif isinstance(exc, RunStateError):  # a single run's resume / overwrite is not a cohort's
        message = _SINGLE_RUN_ADVICE.sub(".", message).replace("..", ".")
        message += (
            " In a cohort: use a new out_dir, or delete this slide's directory to explain it again."
        )
    return message


class _SlideWorker(ActorWorker):
    """A Ray actor holding one copy of the model; explains one slide per call."""

    def __init__(self, attr: NMFConceptAttribution, threads: int, gpu: bool) -> None:
        super().__init__(threads, gpu)
        model = module_of(attr.forward_func)
        if self.gpu and model is not None:
            model.to("cuda")  # this process's own copy: moving it is safe
        self.attr = attr
        # reading threads started once per actor, reused by every slide it explains
        self.reading = ReadingThreads(decoders_for(model_device(attr)))

    def run(self, slide: str, run_dir: str, options: dict[str, Any]) -> SlideRecord:
        """Explain one slide (see :func:`explain_cohort`)."""
        with self.reading.activated():
            return _explain_one(self.attr, slide, run_dir, options, f"ray:{os.getpid()}")

    def close(self) -> None:
        """Stop the reading threads (and a cohort's worker processes) before the actor goes."""
        self.reading.close()


def explain_cohort(
    attr: NMFConceptAttribution,
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    engine: Literal["local", "ray"] = "local",
    workers: int | None = None,
    address: str | None = None,
    retries: int = 1,
    progress: bool = True,
    **slide_options: Any,
) -> CohortResult:
    r"""Explain every slide of a cohort, each into ``out_dir/<slide name>/``.

    Every slide is run by :func:`~captum_nmf.wsi.explain_slide` with
    ``resume=True`` in its own directory, so a restarted cohort skips complete
    slides and resumes the interrupted ones. A slide that raises (a corrupt
    file, no tissue, a run directory from another configuration) is recorded
    as failed and the others go on; the summary is written to
    ``out_dir/cohort.json`` and ``cohort.csv`` after every slide.

    Args:
        attr (NMFConceptAttribution): fitted (or loaded) concepts with their model.
        paths (sequence of str or PathLike): the slides.
        out_dir (str or PathLike): the cohort directory (created when missing).
        engine (str, optional): ``"local"`` runs the slides one after another
                    in this process (on the model's device); ``"ray"`` deals
                    them to Ray actors that each hold a copy of the model (one
                    per GPU when the cluster has GPUs; the CPUs are shared
                    equally between actors otherwise, with torch's thread count
                    set to each actor's share).
                    Default: ``"local"``
        workers (int, optional): number of Ray actors.
                    Default: None (one per GPU, else one per CPU)
        address (str, optional): Ray cluster to join (``HOST:PORT``,
                    ``ray://HOST:PORT`` or ``"auto"``); None starts Ray embedded
                    on this machine. A Ray this process already initialised is
                    used as it is (the address is then only probed). Checked
                    before any slide is opened.
                    Default: None
        retries (int, optional): how often a slide whose Ray actor died is
                    run again (on a fresh actor, resuming its finished chunks);
                    no effect with ``engine="local"`` (this process would be
                    the one that died).
                    Default: 1
        progress (bool, optional): show a progress bar over slides.
                    Default: True
        **slide_options: keyword arguments of
                    :func:`~captum_nmf.wsi.explain_slide` (``tile_size``,
                    ``stride``, ``level``, ``mpp``, ``mode``, ``transform``,
                    ``batch_size``, ``on_tile_error``, ...), the same for every
                    slide. ``transform`` must be picklable for Ray.

    Returns:
        *CohortResult*: one :class:`SlideRecord` per slide, in the order of ``paths``.

    Raises:
        NotFittedError: ``attr`` is not fitted.
        ValueError: no slides, repeated slides, a bad ``engine``, ``workers``
                    or ``retries``, ``workers``/``address`` with the local
                    engine, ``slide_options`` that are not ``explain_slide``
                    arguments (or are set by the cohort) or have bad values
                    (checked before any work), an unparsable ``address``, or
                    a ``LOKY_MAX_CPU_COUNT`` that is not a whole number.
        TypeError: a non-str ``address`` or a mistyped slide option.
        RuntimeError: the Ray actors could not be started (e.g. the model
                    does not unpickle there).
        NotADirectoryError: ``out_dir`` is a file.
        ImportError: ``engine="ray"`` without Ray installed (names the extra).
        ConnectionError: the Ray cluster at ``address`` cannot be reached
                    (before any work starts).
    """
    attr.check_fitted("explain_cohort")
    check_engine(engine, workers, address)
    check_int("retries", retries, minimum=0)
    _check_options(attr, slide_options)
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(
            f"paths must be a sequence of slides, got the single path {paths!r}; pass "
            "[path] (or explain_slide for one slide)."
        )
    slides = [Path(p).expanduser().absolute() for p in paths]
    if not slides:
        raise ValueError("paths is empty; pass at least one slide.")
    same: dict[str, list[str]] = {}  # one file under two names (a symlink, "..") counts too
    for p in slides:
        same.setdefault(os.path.realpath(p), []).append(str(p))
    repeated = [names for names in same.values() if len(names) > 1]
    if repeated:
        raise ValueError(f"paths lists the same slide more than once: {repeated[:3]}.")
    # absolute: Ray actors on a cluster resolve a relative folder in their own directory
    root = Path(out_dir).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"out_dir {root} exists and is not a directory.")
    _check_summaries(root)
    dirs = slide_dirs(slides, root)
    config = {
        "engine": engine,
        "slide_options": {k: repr(v) for k, v in sorted(slide_options.items())},
    }
    start = time.perf_counter()
    pending = [
        SlideRecord(str(p), str(d), "pending", attempts=0)
        for p, d in zip(slides, dirs, strict=True)
    ]
    if engine == "local":
        result = CohortResult(pending, "local", 1, 0.0, str(root), config)
        with _cohort_lock(root):
            _progress_save(result, {}, start)  # at once: an older summary never outlives a kill
            result.records = _run_local(attr, slides, dirs, slide_options, progress, result, start)
            _finish(result, start)
    else:
        result = CohortResult(pending, "ray", 0, 0.0, str(root), config)
        _run_ray(
            attr, slides, dirs, slide_options, workers, address, retries, progress, result, start
        )
    return result


def _finish(result: CohortResult, start: float) -> None:
    result.seconds = time.perf_counter() - start
    result.complete = True
    result.save()


@contextlib.contextmanager
def _cohort_lock(root: Path) -> Iterator[None]:
    """``root`` created and locked for this cohort (a second one on it is refused at once).

    Raises:
        RunLockedError: another cohort is writing ``root``.
    """
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    _check_summaries(root)  # again: a file could have come since the first check
    lock = RunLock(root, COHORT_LOCK, "cohort")
    for tmp in root.iterdir():  # a killed summary write's temporary files (we hold the lock)
        if _SUMMARY_TMP.fullmatch(tmp.name) and tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
    try:
        yield
    finally:
        lock.release()
        if created:  # a cohort that wrote nothing (Ray unreachable) leaves no folder
            with contextlib.suppress(OSError):
                root.rmdir()


def _check_summaries(root: Path) -> None:
    """Refuse an ``out_dir`` whose ``cohort.json`` or ``cohort.csv`` we did not write.

    Raises:
        FileExistsError: one of them is someone else's (a clinical table named
                    ``cohort.csv``): it would be replaced by the summary.
    """
    json_path, csv_path = root / COHORT_FILE, (root / COHORT_FILE).with_suffix(".csv")
    foreign = []
    if json_path.exists():
        try:
            record = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if not (isinstance(record, dict) and {"engine", "records", "csv_sha256"} <= set(record)):
            foreign.append(json_path.name)
    if csv_path.exists():
        try:
            with csv_path.open(encoding="utf-8", newline="") as fh:
                header = fh.readline().strip()
        except (OSError, ValueError):
            header = ""
        if not header.startswith("slide,out_dir,status,"):  # ours, of any version
            foreign.append(csv_path.name)
    if foreign:
        raise FileExistsError(
            f"out_dir {root} holds {' and '.join(foreign)} that captum-nmf did not write; the "
            "cohort summary would replace it. Move it away or choose another out_dir."
        )


def _check_options(attr: NMFConceptAttribution, options: dict[str, Any]) -> None:
    reserved = sorted(set(options) & set(_RESERVED))
    if reserved:
        raise ValueError(
            f"explain_cohort sets {reserved} itself (each slide resumes in its own directory "
            "under out_dir); remove them."
        )
    parameters = inspect.signature(explain_slide).parameters
    unknown = sorted(set(options) - set(parameters) - {"attr", "path"})
    if unknown:
        raise ValueError(
            f"{unknown} are not arguments of explain_slide; see help(explain_slide) for the "
            "per-slide options."
        )
    checked = inspect.signature(check_run_options).parameters
    values = {
        name: options.get(name, parameters[name].default) for name in checked if name != "attr"
    }
    check_run_options(attr, **values)  # the same checks explain_slide makes, before any work
    tiling = inspect.signature(check_tiling_options).parameters
    check_tiling_options(**{k: options.get(k, parameters[k].default) for k in tiling})
    slide_mpp = options.get("slide_mpp")
    if slide_mpp is not None and not is_positive_number(slide_mpp):
        raise ValueError(
            f"slide_mpp must be a positive number of microns per pixel, got {slide_mpp!r}."
        )


def _record_failure(
    slide: Path, run_dir: Path, exc: BaseException, attempts: int, trace: str | None = None
) -> SlideRecord:
    """The record of a failed slide, with its traceback (also logged)."""
    if trace is None:
        trace = "".join(traceback.format_exception(exc))
    _log.error("slide %s failed (attempt %d):\n%s", slide, attempts, trace)
    return SlideRecord(str(slide), str(run_dir), "failed", attempts, _failure(exc), traceback=trace)


def _progress_save(result: CohortResult, records: dict[int, SlideRecord], start: float) -> None:
    """The summary so far: the finished slides' records, the others still pending."""
    result.records = [records.get(i, r) for i, r in enumerate(result.records)]
    result.seconds = time.perf_counter() - start
    result.save()


def _run_local(
    attr: NMFConceptAttribution,
    slides: list[Path],
    dirs: list[Path],
    options: dict[str, Any],
    progress: bool,
    result: CohortResult,
    start: float,
) -> list[SlideRecord]:
    records: dict[int, SlideRecord] = {}
    # one set of reading threads for every slide: no thread start-up per slide
    with ReadingThreads(decoders_for(model_device(attr))):
        for i in tqdm(range(len(slides)), disable=not progress, desc="cohort", unit="slide"):
            try:
                records[i] = _explain_one(attr, str(slides[i]), str(dirs[i]), options, "local")
            except Exception as exc:  # one slide's error must not stop the cohort
                records[i] = _record_failure(slides[i], dirs[i], exc, 1)
            _progress_save(result, records, start)
    return [records[i] for i in range(len(slides))]


def _run_ray(
    attr: NMFConceptAttribution,
    slides: list[Path],
    dirs: list[Path],
    options: dict[str, Any],
    workers: int | None,
    address: str | None,
    retries: int,
    progress: bool,
    result: CohortResult,
    start: float,
) -> None:
    records: dict[int, SlideRecord] = {}

    def finished(outcome: TaskOutcome) -> None:
        s = outcome.index
        if outcome.error is None:
            record: SlideRecord = outcome.value
            record.attempts = outcome.attempts
        else:
            trace = outcome.trace or None
            record = _record_failure(slides[s], dirs[s], outcome.error, outcome.attempts, trace)
            if outcome.died:
                record.error = (
                    f"worker died {outcome.attempts} time(s) on this slide; last: {record.error}"
                )
            record.seconds, record.worker = outcome.seconds, outcome.worker
        records[s] = record
        _progress_save(result, records, start)

    # locked before Ray starts: a second cohort is refused at once
    with (
        _cohort_lock(Path(result.out_dir)),
        ray_session(address, feature="explain_cohort(engine='ray')") as ray,
    ):
        pool = ActorPool(ray, _SlideWorker, (attr,), workers=workers, cap=len(slides))
        result.workers = pool.n
        tasks = [(str(slides[i]), str(dirs[i]), options) for i in range(len(slides))]
        try:
            _progress_save(result, records, start)  # every slide pending, "complete": false
            pool.map(tasks, finished, retries=retries, progress=progress, desc="cohort (ray)")
            result.records = [records[i] for i in range(len(slides))]
            _finish(result, start)
        finally:
            pool.close()
