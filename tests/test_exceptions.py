"""The exception hierarchy: every class also is the builtin its meaning matches."""

from __future__ import annotations

import pytest
from sklearn.exceptions import NotFittedError as SklearnNotFittedError

from captum_nmf import exceptions as ex


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (ex.SlideNotFoundError, (ex.SlideError, FileNotFoundError, OSError)),
        (ex.UnsupportedSlideError, (ex.SlideError, ValueError)),
        (ex.SlideReadError, (ex.SlideError, OSError)),
        (ex.NoTissueError, (ex.SlideError, ValueError)),
        (ex.NotFittedError, (ValueError, AttributeError, SklearnNotFittedError)),
        (ex.NegativeActivationError, (ex.ActivationError, ValueError)),
        (ex.NonFiniteActivationError, (ex.ActivationError, ValueError)),
        (ex.LayerError, (ex.ActivationError, ValueError)),
        (ex.ConceptModelFormatError, (ex.ConceptModelError, ValueError)),
        (ex.ConceptModelMismatchError, (ex.ConceptModelError, ValueError)),
        (ex.RunStateError, (ValueError,)),
        (ex.RunLockedError, (ex.RunStateError, ValueError)),
        (ex.EmptyTileGridWarning, (ex.CaptumNMFWarning, UserWarning)),
        (ex.LayerNameMismatchWarning, (ex.CaptumNMFWarning, UserWarning)),
        (ex.CamScaleWarning, (ex.CaptumNMFWarning, UserWarning)),
        (ex.LargeThumbnailWarning, (ex.CaptumNMFWarning, UserWarning)),
        (ex.UnreadableRegionWarning, (ex.CaptumNMFWarning, UserWarning)),
        (ex.MultiPageImageWarning, (ex.CaptumNMFWarning, UserWarning)),
        (ex.ModelMismatchWarning, (ex.CaptumNMFWarning, UserWarning)),
    ],
)
def test_mro(cls: type, bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(cls, base), (cls, base)
    if not issubclass(cls, Warning):
        assert issubclass(cls, ex.CaptumNMFError)
    assert cls.__doc__
    assert cls.__doc__.strip()


def test_every_public_name_is_exported() -> None:
    public = {
        name
        for name, obj in vars(ex).items()
        if isinstance(obj, type)
        and issubclass(obj, (Exception, Warning))
        and obj.__module__ == ex.__name__
    }
    assert public == set(ex.__all__)
