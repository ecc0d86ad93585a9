"""The run folder of one slide: ownership marker, one-writer lock, manifest with digests, swap.

A run folder written by :func:`~captum_nmf.wsi.explain_slide` holds

* ``.captum-nmf-run`` -- the ownership marker: a library-specific key and the run id;
* ``manifest.json`` -- the run's state (configuration hash, slide fingerprint,
  chunks done) and ``files``: every file the run wrote, with its SHA-256; the
  manifest carries the SHA-256 of its own content, so a changed byte makes it
  unusable instead of silently different;
* ``chunks/`` while the run is incomplete, then ``explanation.safetensors`` and
  ``explanation.json``;
* ``.captum-nmf-run.lock`` while a process writes it.

Rules that keep users' data safe:

* A folder is *ours* only when its marker carries our key and the same run id
  as its manifest. A ``manifest.json`` alone (say, a web app's) is never taken
  for ours.
* Replacing a run (``overwrite``) removes only the files its manifest lists
  (and our chunk files); anything else in the folder -- notes, an export --
  is kept. A folder that is not ours is never written into unless it is empty.
* The new run of an ``overwrite`` is computed in a hidden sibling folder and
  moved in file by file only once it is complete; the manifest moves last, so
  an interrupted swap is visible (``status: "replacing"``) and can be redone.
* One writer: an advisory lock (``flock``) on the folder. A second writer is
  refused at once with the other process's pid, host and start time; the lock
  of a process that died (even by ``kill -9``) is released by the kernel and
  taken over.
* A folder holding only our marker and the debris of a failed start (a lock
  file, our temporary files, an empty ``chunks/``) is cleaned and reused. A
  temporary file is ours only by the name of a file we write
  (``.manifest.json.<pid>-<n>.tmp``, ``chunks/.chunk_00003.safetensors.<pid>-<n>.tmp``);
  a user's ``.notes.1.tmp`` is foreign.
* A run is marked complete (the manifest, without its chunks) before the chunk
  files are removed: a kill in between leaves a complete run and leftover
  chunks, which the next claim of the folder removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from captum_nmf.exceptions import CaptumNMFWarning, RunLockedError, RunStateError
from captum_nmf.io import atomic_write, default_file_mode, sha256_file

try:  # POSIX advisory locks; msvcrt on Windows
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_FILE",
    "MANIFEST_FILE",
    "MARKER_FILE",
    "FolderState",
    "RunLock",
    "RunStore",
    "inspect_folder",
]

MARKER_FILE = ".captum-nmf-run"
LOCK_FILE = ".captum-nmf-run.lock"
MANIFEST_FILE = "manifest.json"
CHUNK_DIR = "chunks"
RESULT_FILES = ("explanation.safetensors", "explanation.json")
MARKER_KEY = "captum-nmf/slide-run-folder"
RUN_FORMAT = "captum-nmf/slide-run"
RUN_VERSION = 3  # 3: the manifest's own digest
DIGEST_KEY = "manifest_sha256"
# temporary files of atomic writes (`.{name}.{pid}-{n}.tmp`, before: `.{name}.{pid}.tmp`)
_TMP_TOP = re.compile(
    r"^\.(?:"
    + "|".join(re.escape(n) for n in (MARKER_FILE, MANIFEST_FILE, *RESULT_FILES))
    + r")\.\d+(?:-\d+)?\.tmp$"
)
_TMP_CHUNK = re.compile(r"^\.(?:chunk|carry)_\d{5}\.safetensors\.\d+(?:-\d+)?\.tmp$")
_CHUNK = re.compile(r"^(chunk|carry)_\d{5}\.safetensors$")
_OURS_TOP = {MARKER_FILE, LOCK_FILE, MANIFEST_FILE, *RESULT_FILES}

FolderKind = Literal["absent", "empty", "ours", "debris", "foreign"]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True))


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of a manifest's content, its own digest left out (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with the digest of its content, as it is written."""
    return {**manifest, DIGEST_KEY: manifest_digest(manifest)}


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A run manifest whose digest matches its content; None if missing, foreign or changed."""
    return _intact(_read_json(path))


def _intact(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """``data`` if it is a run manifest whose digest matches its content, else None."""
    if data is None or data.get("format") != RUN_FORMAT:
        return None
    return data if data.get(DIGEST_KEY) == manifest_digest(data) else None


def _is_debris(entry: Path) -> bool:
    """Left by a failed start of ours: our temporary files, our lock, an empty ``chunks/``."""
    if entry.name == LOCK_FILE or (_TMP_TOP.match(entry.name) and entry.is_file()):
        return True
    if entry.name == CHUNK_DIR and entry.is_dir():
        return all(_TMP_CHUNK.match(p.name) and p.is_file() for p in entry.iterdir())
    return False


def _swapped_out(folder: Path, state: FolderState) -> bool:
    """An overwrite's working folder killed in its swap after the marker moved out.

    It holds our intact manifest and nothing else of note (the marker is
    already in the target), so it looks foreign to :func:`inspect_folder`.
    """
    if state.kind != "foreign" or read_manifest(folder / MANIFEST_FILE) is None:
        return False
    return all(e.name == MANIFEST_FILE or _is_debris(e) for e in folder.iterdir())


@dataclass
class FolderState:
    """What a would-be run folder holds.

    Attributes:
        kind (str): ``"absent"``, ``"empty"``, ``"ours"`` (our marker, whatever
                    the manifest's state), ``"debris"`` (only a failed start's
                    leftovers, marker or not) or ``"foreign"`` (files we did not write).
        marker (dict or None): our marker, when there is one.
        manifest (dict or None): the manifest, when it is readable and matches the marker.
        foreign (list[str]): entries we did not write (kept by every operation).
    """

    kind: FolderKind
    marker: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    foreign: list[str] = field(default_factory=list)


def inspect_folder(folder: Path) -> FolderState:
    """Classify ``folder`` without changing it.

    Returns:
        *FolderState*: its kind, our marker and manifest, and the foreign entries.

    Raises:
        FileExistsError: ``folder`` exists and is not a directory.
    """
    if not folder.exists():
        return FolderState("absent")
    if not folder.is_dir():
        raise FileExistsError(f"out_dir {folder} exists and is not a directory.")
    entries = sorted(folder.iterdir())
    if not entries:
        return FolderState("empty")
    marker = _read_json(folder / MARKER_FILE)
    if marker is None or marker.get("key") != MARKER_KEY:
        if all(_is_debris(e) for e in entries):
            return FolderState("debris")
        return FolderState("foreign", foreign=[e.name for e in entries])
    manifest = read_manifest(folder / MANIFEST_FILE)
    if manifest is not None and manifest.get("run_id") != marker.get("run_id"):
        manifest = None
    listed = set() if manifest is None else {Path(f).parts[0] for f in manifest.get("files", {})}
    foreign = [
        e.name
        for e in entries
        if e.name not in _OURS_TOP | listed and not _is_debris(e) and e.name != CHUNK_DIR
    ]
    if manifest is None and all(e.name == MARKER_FILE or _is_debris(e) for e in entries):
        return FolderState("debris", marker=marker)
    return FolderState("ours", marker=marker, manifest=manifest, foreign=foreign)


class RunLock:
    """An advisory, exclusive, non-blocking lock on a run folder (one writer at a time).

    The lock is ``flock`` on ``.captum-nmf-run.lock`` inside the folder, which
    records the holder's pid, host and start time for the message a second
    writer gets. The kernel drops the lock when its process dies, so the lock
    of a killed run is taken over by the next one. Processes forked while it
    is held (``DataLoader`` workers) close their copy of it at once, so a
    killed run's lock does not live on in its orphaned workers.

    Args:
        folder (Path): the folder to lock; it must exist.
        name (str, optional): the lock file's name in ``folder``.
                    Default: ``".captum-nmf-run.lock"``
        what (str, optional): what is written there, for the message.
                    Default: ``"run"``

    Raises:
        RunLockedError: another process (or another thread) holds the lock.
    """

    def __init__(self, folder: Path, name: str = LOCK_FILE, what: str = "run") -> None:
        self.path = folder / name
        self._fd: int | None = None
        for _ in range(5):  # retry if the file was unlinked between our open and lock
            try:  # never through a link: its target would be truncated
                fd = os.open(self.path, _LOCK_FLAGS, default_file_mode())
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise RunStateError(
                    f"{self.path} is a symbolic link, not a lock file of captum-nmf; remove the "
                    "link, then run again."
                ) from None
            try:
                _try_lock(fd)
            except OSError as exc:
                if exc.errno not in _HELD_ERRNOS:  # NFS without lockd: no locks at all here
                    warnings.warn(
                        f"{folder}: this filesystem gives no file locks ({exc.strerror}), so "
                        f"a second captum-nmf {what} writing it at the same time would not be "
                        "refused; make sure only one process writes it.",
                        CaptumNMFWarning,
                        stacklevel=2,
                    )
                    _HELD.add(fd)
                    self._fd = fd
                    break
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise RunLockedError(
                    f"{folder} is being written by another captum-nmf {what} ({holder}); wait "
                    f"for it to finish, or stop it, then run again. Only one process may write "
                    f"a {what} folder at a time."
                ) from None
            try:
                same = os.fstat(fd).st_ino == self.path.stat().st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                _HELD.add(fd)
                break
            os.close(fd)
        else:  # pragma: no cover - a folder whose lock file keeps being replaced
            raise RunStateError(f"could not lock {folder}: its lock file keeps changing.")
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%F %T')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)

    @property
    def held(self) -> bool:
        """Whether this process still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None


_HELD: set[int] = set()  # the descriptors of the locks this process holds


def _forget_locks() -> None:
    """In a forked child: close the inherited lock descriptors (the lock stays the parent's).

    ``flock`` belongs to the open file, which a fork shares: a child that kept
    it (a persistent ``DataLoader`` worker) would hold a killed parent's lock
    until it noticed the parent was gone.
    """
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_locks)


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)

# what flock / msvcrt.locking give when another process holds the lock
_HELD_ERRNOS = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK}


def _try_lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # pragma: no cover - Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _remove(path: Path) -> None:
    """Remove a file we wrote; a failure is an error, never silent debris."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise RunStateError(f"could not remove {path} ({exc}); remove it by hand.") from exc


def _remove_chunk_dir(folder: Path) -> None:
    """Our chunk and temporary files in ``chunks/``, then the folder if nothing else is left."""
    chunks = folder / CHUNK_DIR
    if not chunks.is_dir():
        return
    for entry in chunks.iterdir():
        if _CHUNK.match(entry.name) or _TMP_CHUNK.match(entry.name):
            _remove(entry)
    with contextlib.suppress(OSError):  # foreign files inside keep the folder
        chunks.rmdir()


#: Folder states without a run of ours (:func:`inspect_folder`): a failed start may clean them.
_NO_RUN = ("absent", "empty", "debris")


class RunStore:
    """The files of one run folder: marker, manifest (with file digests), chunks.

    Use :meth:`open` to claim a folder (checks, lock, fresh or resumed state).
    """

    def __init__(self, work_dir: Path, target: Path, lock: RunLock) -> None:
        self.work_dir = work_dir  # where this run writes (target, or a sibling for overwrite)
        self.target = target
        self.lock = lock
        self.manifest: dict[str, Any] = {}
        self.created: list[Path] = []  # folders this run created
        self.started = False  # a fresh run's first manifest is written
        self.existing = False  # the target held a run before this call: never removed by it

    # ------------------------------------------------------------------ claim
    @classmethod
    def open(
        cls, target: Path, *, resume: bool, overwrite: bool
    ) -> tuple[RunStore, dict[str, Any] | None]:
        """Claim ``target`` for a run: lock it and decide fresh, resumed or replacing.

        Returns:
            *tuple[RunStore, dict or None]*: the store and the manifest to
            resume from (None: a fresh run, written in ``store.work_dir``).

        Raises:
            ValueError: both ``resume`` and ``overwrite``.
            FileExistsError: ``target`` holds files captum-nmf did not write,
                        or a previous run while neither flag is given.
            RunStateError: another process writes ``target``, or its run
                        cannot be resumed (unreadable manifest, interrupted swap).
        """
        if resume and overwrite:
            raise ValueError("pass resume=True or overwrite=True, not both.")
        target = Path(target).absolute()  # "." has no name to put a sibling beside
        state = inspect_folder(target)
        if state.kind == "foreign" and MARKER_FILE in state.foreign:
            manifest = read_manifest(target / MANIFEST_FILE)
            if manifest is not None:  # ours, but the marker does not say so any more
                raise RunStateError(
                    f"out_dir {target} holds a captum-nmf run (its manifest, run "
                    f"{str(manifest.get('run_id'))[:12]}, status {manifest.get('status')!r}, is "
                    f"intact) whose marker file {MARKER_FILE} is damaged, so it cannot be told "
                    "from another program's folder; nothing there is touched. Move the folder "
                    "aside (or delete it) to run again, or use another directory."
                )
        if state.kind == "foreign":
            shown = ", ".join(state.foreign[:6]) + (", ..." if len(state.foreign) > 6 else "")
            raise FileExistsError(
                f"out_dir {target} holds files that captum-nmf did not write ({shown}); nothing "
                "there is touched. Use an empty or new directory."
            )
        created_dir = not target.exists()
        target.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock(target)
        except BaseException:
            if created_dir:
                with contextlib.suppress(OSError):
                    target.rmdir()
            raise
        store = cls(target, target, lock)
        store.existing = state.kind not in _NO_RUN
        if created_dir:
            store.created.append(target)
        try:
            return store._claim(resume=resume, overwrite=overwrite)
        except BaseException:
            store.fail()
            raise

    def _claim(self, *, resume: bool, overwrite: bool) -> tuple[RunStore, dict[str, Any] | None]:
        """Decide, holding the lock, how this run uses the target (looked at again)."""
        target = self.target
        state = inspect_folder(target)
        self.existing = self.existing or state.kind not in _NO_RUN  # before anything can fail
        self._clean_stale_siblings()  # killed overwrites' folders: we hold the target's lock
        if state.kind in _NO_RUN:
            self._clean_debris(target)
            return self, None
        if state.kind == "foreign":  # pragma: no cover - appeared between the two looks
            raise FileExistsError(f"out_dir {target} holds files captum-nmf did not write.")
        manifest = state.manifest
        if overwrite:
            run_id = uuid.uuid4().hex
            self.work_dir = target.with_name(f".{target.name}.new-{run_id[:12]}")
            self.work_dir.mkdir()
            self.created.append(self.work_dir)
            if self.work_dir.stat().st_dev != target.stat().st_dev:  # no rename across them
                raise OSError(
                    errno.EXDEV,
                    f"overwrite=True builds the new run beside out_dir {target} and swaps it "
                    "in when it completes, but out_dir is on another filesystem than its parent "
                    "(a mount point, or a link to another disk), where files cannot be renamed "
                    "into it. Nothing was changed; write the new run to a new folder on that "
                    "filesystem, or remove the old run's files first.",
                )
            return self, None
        if not resume:
            raise FileExistsError(
                f"out_dir {target} already holds a captum-nmf run; pass resume=True to continue "
                "it, overwrite=True to replace it when the new run completes (other files there "
                "are kept), or another directory."
            )
        raw = _read_json(target / MANIFEST_FILE) or {}
        current = _intact(raw)  # intact, but maybe not the marker's: the swap moves it last
        if (manifest or current or {}).get("status") == "replacing":
            raise RunStateError(
                f"an overwrite of {target} was interrupted while its files were being replaced; "
                "pass overwrite=True to run it again (other files there are kept)."
            )
        version = raw.get("format_version")
        older = isinstance(version, int) and version < RUN_VERSION
        if manifest is None and raw.get("format") == RUN_FORMAT and older and DIGEST_KEY not in raw:
            raise RunStateError(
                f"{target / MANIFEST_FILE} was written by an older captum-nmf (run format "
                f"{version}, without a digest of its own), so the run cannot be resumed; pass "
                "overwrite=True to start it over (other files there are kept)."
            )
        if manifest is None:
            raise RunStateError(
                f"{target / MANIFEST_FILE} is missing, unreadable, changed since it was written "
                "(its digest does not match) or belongs to another run, so the run cannot be "
                "resumed; pass overwrite=True to start it over (other files there are kept)."
            )
        if int(manifest.get("format_version", 0)) > RUN_VERSION:
            raise RunStateError(f"{target / MANIFEST_FILE} was written by a newer captum-nmf.")
        self.manifest = manifest
        if manifest.get("status") == "complete":  # a kill after the commit left chunks
            _remove_chunk_dir(target)
        return self, manifest

    def _clean_debris(self, folder: Path) -> None:
        for entry in folder.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.name == CHUNK_DIR:
                _remove_chunk_dir(folder)
            elif entry.name == MARKER_FILE or _TMP_TOP.match(entry.name):
                _remove(entry)

    def _clean_stale_siblings(self) -> None:
        """Hidden sibling folders of overwrites that were killed (we hold the target's lock).

        Only this target's: ``.res.new-<12 hex>``, never ``.res.new-norm.new-<12 hex>``
        (the working folder of an overwrite of ``res.new-norm``, which may be running).
        """
        name = re.compile(rf"^\.{re.escape(self.target.name)}\.new-[0-9a-f]{{12}}$")
        try:
            siblings = [p for p in self.target.parent.iterdir() if name.match(p.name)]
        except OSError:  # an unlistable parent: nothing to clean, nothing to stop the run
            return
        for sibling in siblings:
            if sibling.is_symlink() or not sibling.is_dir():  # never another folder's files
                continue
            # housekeeping: a file we cannot remove, or one that is not ours (a .DS_Store)
            # keeps the folder, never the run from starting
            with contextlib.suppress(OSError, RunStateError):
                state = inspect_folder(sibling)
                if state.kind in ("ours", "debris", "empty") or _swapped_out(sibling, state):
                    self._remove_run_files(sibling, foreign_ok=True)

    # ---------------------------------------------------------------- writing
    def start(self, manifest: dict[str, Any]) -> None:
        """Write the marker, ``chunks/`` and the first manifest of a fresh run.

        A failure (e.g. a full disk) removes what was written, so nothing is left.
        """
        run_id = uuid.uuid4().hex
        marker = {"key": MARKER_KEY, "run_id": run_id, "library": "captum-nmf"}
        self.manifest = {
            **manifest,
            "format": RUN_FORMAT,
            "format_version": RUN_VERSION,
            "run_id": run_id,
            "files": {},
        }
        try:
            _write_json(self.work_dir / MARKER_FILE, marker)
            self.record(MARKER_FILE)
            (self.work_dir / CHUNK_DIR).mkdir(exist_ok=True)
            self.write_manifest()
        except BaseException:
            self.fail()
            raise
        self.started = self.work_dir == self.target

    def write_manifest(self) -> None:
        """Write ``manifest.json`` atomically (the run's commit point), with its digest."""
        self.manifest[DIGEST_KEY] = manifest_digest(self.manifest)  # in place: callers hold it
        _write_json(self.work_dir / MANIFEST_FILE, self.manifest)

    def record(self, *relpaths: str) -> None:
        """Add files (relative to the run folder) with their SHA-256 to the manifest's list."""
        files = self.manifest.setdefault("files", {})
        for rel in relpaths:
            files[rel] = sha256_file(self.work_dir / rel)

    def forget(self, *relpaths: str) -> None:
        """Remove files of this run and drop them from the manifest's list."""
        files = self.manifest.setdefault("files", {})
        for rel in relpaths:
            _remove(self.work_dir / rel)
            files.pop(rel, None)

    def verify(self, relpath: str) -> Path:
        """The path of a recorded file whose bytes still have their recorded SHA-256.

        Raises:
            RunStateError: the file is missing, unrecorded or changed.
        """
        path = self.work_dir / relpath
        expected = self.manifest.get("files", {}).get(relpath)
        if expected is None or not path.is_file():
            raise RunStateError(
                f"{path} is missing from the run (or not recorded in its manifest); the run "
                "cannot be resumed. Pass overwrite=True to start it over."
            )
        if sha256_file(path) != expected:
            raise RunStateError(
                f"{path} is corrupt: its SHA-256 differs from the one recorded when it was "
                "written. The run cannot be resumed from it; pass overwrite=True to start over."
            )
        return path

    def complete(self) -> None:
        """Mark the run complete: results recorded and committed, chunks removed, swapped in.

        The manifest says ``complete`` (without the chunks) before any chunk is
        removed: a kill or a full disk before the commit leaves a resumable run,
        one after it a complete run and chunk files that the next claim removes.
        """
        self.record(*(f for f in RESULT_FILES if (self.work_dir / f).is_file()))
        self.manifest["status"] = "complete"
        files = self.manifest["files"]
        chunks = [f for f in files if f.startswith(f"{CHUNK_DIR}/")]
        for rel in chunks:
            files.pop(rel)
        self.write_manifest()
        for rel in chunks:
            _remove(self.work_dir / rel)
        _remove_chunk_dir(self.work_dir)
        if self.work_dir != self.target:
            self._swap()

    def _swap(self) -> None:
        """Move a complete overwrite from its sibling into the target, manifest last."""
        target, new = self.target, self.work_dir
        old = read_manifest(target / MANIFEST_FILE)  # a changed one: its files are kept
        if old is not None:
            _write_json(target / MANIFEST_FILE, sealed({**old, "status": "replacing"}))
        keep = set(self.manifest["files"])
        for rel in sorted(keep - {MARKER_FILE}):  # the marker moves with the manifest, last
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (new / rel).replace(target / rel)
        if old is not None:
            for rel in old.get("files", {}):
                if rel not in keep and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
                    _remove(target / rel)
        _remove_chunk_dir(target)
        for name in RESULT_FILES:  # results of an older run that are not in the new one
            if name not in keep:
                _remove(target / name)
        (new / MARKER_FILE).replace(target / MARKER_FILE)
        (new / MANIFEST_FILE).replace(target / MANIFEST_FILE)
        self.created = [p for p in self.created if p != new]
        self._remove_run_files(new, foreign_ok=False)
        self.work_dir = target

    def _remove_run_files(self, folder: Path, *, foreign_ok: bool) -> None:
        """Remove a run folder's own files (listed or by our names), and the folder if empty."""
        manifest = read_manifest(folder / MANIFEST_FILE) or {}
        for rel in manifest.get("files", {}):
            if not Path(rel).is_absolute() and ".." not in Path(rel).parts:
                _remove(folder / rel)
        _remove_chunk_dir(folder)
        for name in (*RESULT_FILES, MANIFEST_FILE, MARKER_FILE):
            _remove(folder / name)
        for entry in folder.iterdir():
            if _TMP_TOP.match(entry.name) or entry.name == LOCK_FILE:
                _remove(entry)
        try:
            folder.rmdir()
        except OSError as exc:
            if not foreign_ok:
                raise RunStateError(
                    f"could not remove the temporary run folder {folder} ({exc}); it holds "
                    f"{sorted(p.name for p in folder.iterdir())}. Remove it by hand."
                ) from exc

    # ---------------------------------------------------------------- closing
    def fail(self) -> None:
        """After an error: drop what cannot be resumed, keep what can, release the lock.

        A fresh run that had started keeps its chunks (``resume=True`` continues
        it); a start that failed (a full disk, a rejected configuration) leaves
        nothing behind; an interrupted overwrite removes its sibling folder and
        leaves the previous run as it was.
        """
        if not self.lock.held:  # already failed (or closed): nothing more to undo
            return
        try:
            if self.work_dir != self.target:
                if self.work_dir.is_dir():
                    self._remove_run_files(self.work_dir, foreign_ok=True)
                self.work_dir = self.target
            elif not self.started and not self.existing:
                self._clean_debris(self.target)
                _remove(self.target / MANIFEST_FILE)
                if self.target in self.created:
                    self.lock.release()
                    with contextlib.suppress(OSError):
                        self.target.rmdir()
        finally:
            self.created = []
            self.lock.release()

    def close(self) -> None:
        """Release the lock (the run folder stays as it is)."""
        self.lock.release()
