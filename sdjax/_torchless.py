"""Keep PyTorch out of a process that never uses it: `import_without_torch()`, which the `sdjax` command
calls first for every subcommand but `export`.

transformers may import torch when it is installed (its CLIP tokenizer and config are all sdjax uses of it), and
tensorboardX does (writer.py, to accept torch tensors in `add_*`). sdjax's training, planning and sampling
use its own Flax models and numpy summaries only, and torch (here its CUDA build) costs such a process ~0.7
GiB of resident memory (measured: 893 vs 214 MiB after `import sdjax.models`, when it imported diffusers).

So the command imports those libraries, through sdjax's modules, while torch is hidden: they take it for not
installed and never load it. Hidden only during those imports: `import torch` itself works afterwards
(loading PyTorch `.bin` weights does that), but transformers' PyTorch classes are placeholders in that
process, which is why `sdjax export` does not call this, nor does `import sdjax`. tests/test_imports.py
checks that `sdjax train` never loads torch.
"""

from __future__ import annotations

import importlib
import os
import sys

# sdjax's modules that import transformers and tensorboardX.
MODULES = ("sdjax.models", "sdjax.metrics")
_NO_ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def import_without_torch() -> None:
    """Imports MODULES with torch hidden (`import torch` raises ImportError and `find_spec("torch")` is None
    meanwhile), unless torch or one of the libraries is imported already (they made their choice then)."""
    if any(name in sys.modules for name in ("torch", "transformers", "tensorboardX")):
        return
    sys.modules["torch"] = None
    # transformers 5 would advise at import that without PyTorch its models are unavailable: sdjax uses none.
    advisory = os.environ.get(_NO_ADVICE)
    os.environ[_NO_ADVICE] = "1"
    try:
        for name in MODULES:
            importlib.import_module(name)
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
        if advisory is None:
            del os.environ[_NO_ADVICE]
        else:
            os.environ[_NO_ADVICE] = advisory
