"""`sdjax train` never imports PyTorch (sdjax/_torchless.py), though transformers and tensorboardX would; a plain
`import sdjax.models` leaves transformers' PyTorch classes to the export; sdjax imports no diffusers at all."""

import json
import os
import subprocess
import sys

import pytest
from tiny import FAST_COMPILE_FLAGS

TESTS = os.path.dirname(os.path.abspath(__file__))

# A sample grid, an evaluation and a checkpoint: every module a training run imports (the VAE stage adds
# none that imports diffusers, transformers or tensorboardX).
CONFIG_FILE = f"""
import sys
sys.path.insert(0, {TESTS!r})
from tiny import tiny_config


def get_config():
    c = tiny_config()
    c.train.steps = c.train.sample_every = c.train.eval_every = c.train.checkpoint_every = 2
    c.sample.steps = 2
    return c
"""

# `sdjax ARGS...` in this process, then the torch modules it holds.
RUN_SDJAX = """
import json, sys
from sdjax import cli
code = cli.main(["sdjax"] + sys.argv[1:])
print(json.dumps({"exit": code, "torch": sorted(m for m, v in sys.modules.items()
                                             if m.split(".")[0] == "torch" and v is not None)}))
"""


@pytest.mark.slow  # compiles the train step, sampler and evaluation in a fresh process
def test_sdjax_train_never_imports_torch(tmp_path):
    pytest.importorskip("torch")  # installed with the test extra: the case that matters
    (tmp_path / "tiny_demo.py").write_text(CONFIG_FILE)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_FLAGS}  # one CPU device: quicker
    argv = ["train", "--config", str(tmp_path / "tiny_demo.py"), "--workdir", str(tmp_path / "run")]
    run = subprocess.run([sys.executable, "-c", RUN_SDJAX] + argv, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"exit": 0, "torch": []}, run.stdout[-2000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    assert os.listdir(tmp_path / "run" / "samples")  # the sample grid was drawn


def test_torch_stays_importable_and_a_plain_import_keeps_the_pytorch_classes():
    pytest.importorskip("torch")
    code = """
import sys
from sdjax._torchless import import_without_torch
import_without_torch()
import torch  # hidden only while the libraries were imported
print(torch.nn.Linear(2, 3).weight.shape[0], "diffusers" in sys.modules)
"""
    plain = "import sdjax.models\nfrom transformers import CLIPTextModel\nprint(CLIPTextModel.__module__)"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    hidden = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert hidden.returncode == 0, hidden.stderr[-3000:]
    width, diffusers_imported = hidden.stdout.split()[-2:]
    assert width == "3" and diffusers_imported == "False"
    run = subprocess.run([sys.executable, "-c", plain], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split()[-1].startswith("transformers.models."), run.stderr[-3000:]
