"""captum-nmf: explain CNNs by clustering their activations into NMF concepts.

The public API is flat, like Captum's ``captum.attr``::

    from captum_nmf import NMF, NMFConceptAttribution
"""

from __future__ import annotations

from captum_nmf import exceptions
from captum_nmf._core.nmf import NMF, NMFStatistics
from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._version import __version__

__all__ = ["NMF", "NMFConceptAttribution", "NMFStatistics", "__version__", "exceptions"]
