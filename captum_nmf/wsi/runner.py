"""``explain_slide`` and its helpers, kept importable from here (they live in ``wsi.run``)."""

from captum_nmf.wsi.run import (
    MANIFEST_FILE,
    check_output_location,
    check_run_options,
    explain_slide,
    model_fingerprint,
)

__all__ = [
    "MANIFEST_FILE",
    "check_output_location",
    "check_run_options",
    "explain_slide",
    "model_fingerprint",
]
