"""The layers of sdjax (pyproject.toml's import-linter contracts; docs/architecture.md): no module imports a
layer above its own, function-level imports included, and there are no import circles."""

import os
import shutil
import subprocess
import sys

from tiny import ROOT


def lint_imports(project: str) -> subprocess.CompletedProcess:
    """import-linter's `lint-imports` over the sdjax package in `project` (with that project's contracts)."""
    env = {**os.environ, "PYTHONPATH": project}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def test_sdjax_keeps_its_layers_and_has_no_import_circles():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path):
    """The contract has teeth: config.py (the bottom layer) importing the trainer in a function body fails it."""
    shutil.copytree(os.path.join(ROOT, "sdjax"), tmp_path / "sdjax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    config_file = tmp_path / "sdjax" / "config.py"
    source = config_file.read_text()
    signature = "def load_config_file(path: str) -> ml_collections.ConfigDict:\n"
    assert signature in source
    config_file.write_text(source.replace(signature, signature + "    from sdjax import train  # noqa: F401\n"))
    result = lint_imports(str(tmp_path))
    assert result.returncode == 1
    assert "sdjax.config is not allowed to import sdjax.train" in result.stdout
    assert "1 kept, 1 broken" in result.stdout or "0 kept, 2 broken" in result.stdout
