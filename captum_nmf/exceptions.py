"""Every error and warning captum_nmf raises.

Each class also subclasses the builtin that matches its meaning, so callers that
already catch ``ValueError``, ``FileNotFoundError`` or ``OSError`` keep working::

    CaptumNMFError(Exception)
    ├── SlideError
    │   ├── SlideNotFoundError(SlideError, FileNotFoundError)
    │   ├── UnsupportedSlideError(SlideError, ValueError)
    │   ├── SlideReadError(SlideError, OSError)
    │   └── NoTissueError(SlideError, ValueError)
    ├── NotFittedError(CaptumNMFError, sklearn NotFittedError(ValueError, AttributeError))
    ├── ActivationError(CaptumNMFError, ValueError)
    │   ├── NegativeActivationError
    │   ├── NonFiniteActivationError
    │   └── LayerError                  # layer not executed / output not N x C x H x W
    ├── ConceptModelError(CaptumNMFError, ValueError)
    │   ├── ConceptModelFormatError     # corrupt, unknown or unsafe file
    │   └── ConceptModelMismatchError   # layer / channel count mismatch
    └── RunStateError(CaptumNMFError, ValueError)
        └── RunLockedError              # another live process writes the folder

    CaptumNMFWarning(UserWarning)
    ├── EmptyTileGridWarning
    ├── LargeThumbnailWarning
    ├── MultiPageImageWarning
    ├── UnreadableRegionWarning
    ├── LayerNameMismatchWarning
    └── ModelMismatchWarning
"""

from __future__ import annotations

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

__all__ = [
    "ActivationError",
    "CamScaleWarning",
    "CaptumNMFError",
    "CaptumNMFWarning",
    "ConceptModelError",
    "ConceptModelFormatError",
    "ConceptModelMismatchError",
    "EmptyTileGridWarning",
    "LargeThumbnailWarning",
    "LayerError",
    "LayerNameMismatchWarning",
    "ModelMismatchWarning",
    "MultiPageImageWarning",
    "NegativeActivationError",
    "NoTissueError",
    "NonFiniteActivationError",
    "NotFittedError",
    "RunLockedError",
    "RunStateError",
    "SlideError",
    "SlideNotFoundError",
    "SlideReadError",
    "UnreadableRegionWarning",
    "UnsupportedSlideError",
]


class CaptumNMFError(Exception):
    """Base class of every error raised by captum_nmf."""


class SlideError(CaptumNMFError):
    """Raised when a slide cannot be opened, read or used."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """Raised when a slide path does not exist (checked before OpenSlide is called)."""


class UnsupportedSlideError(SlideError, ValueError):
    """Raised when a file is not an image or whole-slide format that can be read."""


class SlideReadError(SlideError, OSError):
    """Raised when pixels cannot be read from an open slide (after one retry on a new handle).

    Attributes ``path``, ``level``, ``location`` (level-0 x, y) and ``size``
    (width, height) say which read failed; ``__cause__`` is the reader's error.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        level: int | None = None,
        location: tuple[int, int] | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.level = level
        self.location = location
        self.size = size

    def __reduce__(self) -> tuple[object, ...]:  # survive DataLoader workers and pickling
        return (
            _slide_read_error,
            (
                str(self.args[0]) if self.args else "",
                self.path,
                self.level,
                self.location,
                self.size,
            ),
        )


class NoTissueError(SlideError, ValueError):
    """Raised when a slide has no tile with enough tissue to fit or explain."""


class NotFittedError(CaptumNMFError, _SklearnNotFittedError):  # type: ignore[misc]
    """Raised when concepts are used before ``fit`` or ``load`` (a ValueError, AttributeError)."""


class ActivationError(CaptumNMFError, ValueError):
    """Raised when a layer's activations cannot be factorised."""


class NegativeActivationError(ActivationError):
    """Raised when a layer produced negative activations and ``negative="raise"``."""


class NonFiniteActivationError(ActivationError):
    """Raised when a layer produced NaN or infinite activations."""


class LayerError(ActivationError):
    """Raised when a layer is not executed or its output is not an N x C x H x W tensor."""


class ConceptModelError(CaptumNMFError, ValueError):
    """Raised when a saved concept model cannot be used."""


class ConceptModelFormatError(ConceptModelError):
    """Raised when a file is not a valid captum_nmf ``.safetensors`` concept model."""


class ConceptModelMismatchError(ConceptModelError):
    """Raised when a concept model does not fit the layer it is bound to."""


class RunStateError(CaptumNMFError, ValueError):
    """Raised when an output directory was produced with a different configuration."""


class RunLockedError(RunStateError):
    """Raised when another live process is writing the run or cohort folder (wait for it)."""


class CaptumNMFWarning(UserWarning):
    """Base class of every warning emitted by captum_nmf."""


class EmptyTileGridWarning(CaptumNMFWarning):
    """Emitted when a tiler keeps no tile of a slide."""


class LargeThumbnailWarning(CaptumNMFWarning):
    """Emitted when a slide's thumbnail must decode more than about 10^9 pixels (no pyramid)."""


class MultiPageImageWarning(CaptumNMFWarning):
    """Emitted when a plain multi-page image (TIFF) has pages besides the one read that hold data.

    Smaller copies of the page read (a stripped pyramid's levels, a thumbnail) do not count.
    """


class UnreadableRegionWarning(CaptumNMFWarning):
    """Emitted when ``on_tile_error="skip"`` counts unreadable thumbnail parts as background."""


class CamScaleWarning(CaptumNMFWarning):
    """Warned when a CAM looks ReLU'd and min-max scaled, so that "> 0" means almost everywhere."""


class LayerNameMismatchWarning(CaptumNMFWarning):
    """Emitted when a concept model is bound to a layer of another name but equal width."""


class ModelMismatchWarning(CaptumNMFWarning):
    """Emitted when concepts are bound to a model whose weights differ from those fitted on."""


def _slide_read_error(
    message: str,
    path: str | None,
    level: int | None,
    location: tuple[int, int] | None,
    size: tuple[int, int] | None,
) -> SlideReadError:
    return SlideReadError(message, path=path, level=level, location=location, size=size)
