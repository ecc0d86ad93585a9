"""A recorder of the torch calls a block makes: what runs where, and what reaches the host."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode


class CallRecorder(TorchFunctionMode):
    """Every torch function and tensor method called while active, in order.

    ``names[i]`` is the call's name and ``shapes[i]`` the shape of its first
    argument when that is a tensor (else None). On a GPU the calls in
    :attr:`READS` bring a value to the host and wait for the device.
    """

    READS = ("tolist", "item", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...] | None] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.record(getattr(func, "__name__", ""), args, kwargs or {})
        return func(*args, **(kwargs or {}))

    def record(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Note one call (a subclass may look at its arguments too)."""
        self.names.append(name)
        first = args[0] if args else None
        self.shapes.append(tuple(first.shape) if isinstance(first, Tensor) else None)

    def first_read_after(self, i: int) -> int:
        """Index of the first call after ``i`` that brings a value to the host."""
        return next(j for j in range(i + 1, len(self.names)) if self.names[j] in self.READS)

    def shapes_of(self, names: Iterable[str]) -> list[tuple[int, ...]]:
        """Shapes of the tensors given to the calls named ``names``."""
        wanted = set(names)
        return [s for n, s in zip(self.names, self.shapes, strict=True) if n in wanted and s]
