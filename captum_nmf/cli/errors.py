"""The command line's one-line errors: :class:`CLIError` and library messages in flag spelling."""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["CLIError", "flag_spelling"]


class CLIError(Exception):
    """A user error the command line reports in one line."""


# The library's messages name its Python arguments; on the command line they name the flags.
# None: the argument's own name as a flag (tile_size=64 -> --tile-size 64).
_SPELLINGS: tuple[tuple[str, str | Callable[[re.Match[str]], str] | None], ...] = (
    (r"\bresume=True\b", "--resume"),
    (r"\bresume=False\b", "no --resume"),
    (r"\boverwrite=True\b", "--overwrite"),
    (r"\bon_tile_error=['\"](skip|raise)['\"]", r"--on-tile-error \1"),
    (  # no flag detects tissue by brightness: the command line's way is every tile
        r"detect it by brightness, tissue_mask=detect_tissue\(slide, saturation_threshold=0\), "
        r"or pass tissue_mask=None\.",
        "the command line detects tissue by colour only: pass --no-tissue-mask to use every tile.",
    ),
    (r"\btissue_mask=None\b", "--no-tissue-mask"),
    (r" \(or Slide\(path, mpp=MPP\)\)", ""),
    # a scale the slide records wins over --slide-mpp: only Python's Slide(path, mpp=) overrides it
    (r" \(in Python, Slide\(path, mpp=\.\.\.\) states the scale to use instead\)", ""),
    (r"\bSlide\(path, mpp=\.\.\.\)", "--slide-mpp MPP"),
    (r"\bslide_mpp=", "--slide-mpp "),
    (r"\bfallback_mpp\b", "--slide-mpp"),  # Slide's name for it (info --slide-mpp 0)
    (r"\bmode=['\"](tile|region)['\"]", r"--mode \1"),
    (r"\bperturbation=['\"](resample|init)['\"]", r"--perturbation \1"),
    (r"\bpass level= or mpp=", "pass --level or --mpp"),
    (r"\bn_concepts(?=: recorded)", "K (of --concepts)"),  # explain's K is its concepts'
    (r"\bn_concepts=(?=\S)", "--k "),
    (r"\bn_concepts\b", "--k"),
    (r"\bn_epochs=(?=\S)", "--epochs "),
    (r"\bn_epochs\b", "--epochs"),
    (r"\bmax_locations_per_batch=(?=\S)", "--max-locations "),
    (r"\bmax_locations_per_batch\b", "--max-locations"),
    (r"\brandom_state=(?=\S)", "--seed "),
    (r"\brandom_state\b", "--seed"),
    (r"\bks=range\((\d+), (\d+)\)", lambda m: f"--ks {m.group(1)}-{int(m.group(2)) - 1}"),
    (r"\bks\b(?= is empty)", "--ks"),
    (r"\bslide=(?=['\"])", "--slide "),
    (
        r"\b(tile_size|stride|border|region_size|region_margin|min_tissue|batch_size|top_n|level"
        r"|mpp|n_seeds|holdout|max_rows|locations_per_tile|gain_threshold|stable_cosine)"
        r"=(?=[^\s,])",
        None,
    ),
    (
        r"\b(min_tissue|batch_size|num_workers|tile_size|region_size|region_margin|top_n"
        r"|intensity_scale|n_seeds|holdout|max_rows|locations_per_tile|gain_threshold"
        r"|stable_cosine)\b",
        None,
    ),
    (r"\bout_dir\b", "--out"),
)


def _flag(match: re.Match[str]) -> str:
    text = match.group(0)
    name = match.group(1) if match.re.groups else text
    return "--" + name.replace("_", "-") + (" " if text.endswith("=") else "")


def flag_spelling(message: str) -> str:
    """A library message with Python argument spellings replaced by the command's flags.

    ``resume=True`` becomes ``--resume``, ``on_tile_error='skip'`` becomes
    ``--on-tile-error skip``, ``tile_size=64`` becomes ``--tile-size 64``, and so on.

    Args:
        message (str): a message of the library.

    Returns:
        *str*: the message as the command line should show it.
    """
    for pattern, flag in _SPELLINGS:
        message = re.sub(pattern, _flag if flag is None else flag, message)
    return message
