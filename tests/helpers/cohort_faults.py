"""Picklable tile transforms that kill or interrupt the process running them (fault injection)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from captum_nmf.engines.ray_actors import ActorWorker


def _is_red(tile: Tensor) -> bool:
    r, g, b = (float(tile[c, 8, 8]) for c in range(3))
    return r > 0.85 and g < 0.2 and b < 0.2


class DieOnce:
    """Kill the worker process at its ``after``-th tile, once per marker file (atomic create)."""

    def __init__(self, marker: Path, after: int = 40) -> None:
        self.marker = str(marker)
        self.after = after
        self.seen = 0

    def __call__(self, tile: Tensor) -> Tensor:
        self.seen += 1
        if self.seen == self.after:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return tile
            os.close(fd)
            os._exit(1)
        return tile

    def __repr__(self) -> str:
        return f"DieOnce(after={self.after})"

    def __captum_nmf_description__(self) -> str:  # the tiles are unchanged: not the counts
        return "identity"


class DieOnRed:
    """Kill the worker process whenever a tile has a pure red 16 px block at its top-left."""

    def __call__(self, tile: Tensor) -> Tensor:
        if _is_red(tile):
            os._exit(1)
        return tile

    def __repr__(self) -> str:
        return "DieOnRed()"

    __captum_nmf_description__ = "identity"


class InterruptAfter:
    """Raise KeyboardInterrupt at the ``after``-th tile seen by this process."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.seen = 0

    def __call__(self, tile: Tensor) -> Tensor:
        self.seen += 1
        if self.seen == self.after:
            raise KeyboardInterrupt
        return tile

    def __repr__(self) -> str:
        return "InterruptAfter()"

    __captum_nmf_description__ = "identity"  # the tiles are unchanged: not its counts


class MarksItsClose(ActorWorker):
    """A pool worker that echoes its task and leaves ``closed_<pid>`` in ``folder`` on close."""

    def __init__(self, folder: str, threads: int, gpu: bool) -> None:
        super().__init__(threads, gpu)
        self.folder = Path(folder)

    def run(self, value: int) -> int:
        return value

    def close(self) -> None:
        (self.folder / f"closed_{os.getpid()}").touch()
