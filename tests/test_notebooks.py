"""The notebooks run top to bottom (their code cells, in order, in a fresh process) on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import CORPUS
from helpers import REPO, cli_env


def notebook_code(name: str) -> str:
    cells = json.loads((REPO / "notebooks" / name).read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_python_api_notebook_edits_evaluates_saves_and_reverts(tiny_model_dir, tmp_path):
    env = cli_env(tmp_path)
    env.update(SPHERE_PL_MODEL=tiny_model_dir, SPHERE_PL_CORPUS=str(CORPUS), SPHERE_PL_STATS_SAMPLES="20")
    script = tmp_path / "python_api.py"
    script.write_text(notebook_code("python_api.ipynb") + "\nprint('NOTEBOOK OK')\n")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO / "notebooks", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "max |W - W_pretrained| after revert: 0.0" in result.stdout
    assert "NOTEBOOK OK" in result.stdout
