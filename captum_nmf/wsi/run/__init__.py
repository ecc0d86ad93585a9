"""The slide run of ``explain_slide``: configuration, plan, assemblers, executor.

Data flows one way: :mod:`.config` (the options, checked and hashed) ->
:mod:`.plan` (grid, cells, tissue, regions, chunks; every check before work)
-> :mod:`captum_nmf.wsi.store` (the run folder) -> :mod:`.execute` (reader ->
device -> model) -> :mod:`.assemble` (stitch and solve, chunk by chunk) ->
:mod:`.explain` (the :class:`~captum_nmf.wsi.SlideExplanation`).
"""

from captum_nmf.wsi.run.config import check_run_options, model_fingerprint
from captum_nmf.wsi.run.explain import explain_slide
from captum_nmf.wsi.run.plan import check_output_location
from captum_nmf.wsi.store import MANIFEST_FILE

__all__ = [
    "MANIFEST_FILE",
    "check_output_location",
    "check_run_options",
    "explain_slide",
    "model_fingerprint",
]
