"""The ``captum-nmf`` command: fit, explain, analyse, export, demo, info.

Every command exits 0 on success; on any error it prints one line
``captum-nmf: error: <message>`` to stderr and exits 1 (130 on Ctrl-C,
2 for bad command-line usage), with the traceback only under ``--debug``.

Models are given as ``--model torchvision:vgg16`` (any torchvision model
builder; ``--weights`` required, since torchvision's builders are random without
a download), ``--model
package.module:factory`` (any importable callable returning an ``nn.Module``;
like any Python import, this imports and runs that module's code)
or ``--model zoo:efficientnet_lite0`` (the offline ImageNet model), with
``--weights FILE`` (a ``.safetensors`` file, or a state dict loaded with
``torch.load(..., weights_only=True)``), ``--layer features.29`` (a dotted
module path; numbers index ``Sequential`` containers) and ``--device`` (``auto``:
CUDA when available, else the CPU; the model is moved there once).

Modules: :mod:`~captum_nmf.cli.parser` (the arguments), :mod:`~captum_nmf.cli.models`
(model specs, normalisations, devices), :mod:`~captum_nmf.cli.commands` (one function per
command), :mod:`~captum_nmf.cli.errors` (one-line errors in flag spelling) and
:mod:`~captum_nmf.cli.main`. An application on top of the library: nothing in the library
imports it.
"""

from __future__ import annotations

from captum_nmf.cli.errors import CLIError, flag_spelling
from captum_nmf.cli.main import main
from captum_nmf.cli.models import load_model, resolve_device, resolve_layer

__all__ = ["CLIError", "flag_spelling", "load_model", "main", "resolve_device", "resolve_layer"]
