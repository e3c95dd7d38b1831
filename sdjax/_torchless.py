"""Keep PyTorch out of a process that never uses it: `import_without_torch()`, which the `sdjax` command
calls first for every subcommand but `export`.

diffusers imports torch at import time whenever it is installed, whatever classes are used
(utils/logging.py -> utils/distributed_utils.py, for a rank-zero check of torch.distributed; with torch
available, utils/torch_utils.py too), and so does tensorboardX (writer.py, to accept torch tensors in
`add_*`). sdjax's training, planning and sampling use the Flax classes and numpy summaries only, and torch
(here its CUDA build) costs such a process ~0.7 GiB of resident memory (measured: 893 vs 214 MiB after
`import sdjax.models`).

So the command imports those libraries, through sdjax's modules, while torch is hidden: they take it for not
installed, keep their Flax classes, and never load it. Hidden only during those imports: `import torch`
itself works afterwards (loading PyTorch `.bin` weights does that), but the libraries' PyTorch classes are
placeholders in that process, which is why `sdjax export` does not call this, nor does `import sdjax`.
tests/test_imports.py checks that `sdjax train` never loads torch.
"""

from __future__ import annotations

import importlib
import sys

# sdjax's modules that import diffusers, transformers and tensorboardX.
MODULES = ("sdjax.models", "sdjax.models.schedulers", "sdjax.metrics")


def import_without_torch() -> None:
    """Imports MODULES with torch hidden (`import torch` raises ImportError and `find_spec("torch")` is None
    meanwhile), unless torch or one of the libraries is imported already (they made their choice then)."""
    if any(name in sys.modules for name in ("torch", "diffusers", "transformers", "tensorboardX")):
        return
    sys.modules["torch"] = None
    try:
        for name in MODULES:
            importlib.import_module(name)
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
