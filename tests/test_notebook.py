"""notebooks/colab_tpu.ipynb: executed top to bottom in smoke mode (CPU, tiny sweep), and stored clean.

The notebook runs in a real IPython kernel (nbclient + ipykernel, the `test` extra) of this Python, in
the repository root, with FLATJAX_NOTEBOOK_SMOKE=1 and the shared real data. About a minute on 2 cores.
"""

import csv
import json
import math
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
DATA_DIR = ROOT.parent / "shared" / "data"
CELL_TIMEOUT_S = 400  # the sweep cell takes about a minute; this only stops a hang
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"cell {cell.get('id')} has stored outputs; clear them before committing")
        assert "execution" not in cell.metadata, f"cell {cell.get('id')} stores run timings"
    assert "widgets" not in nb.metadata
    assert any("SMOKE = bool(int(os.environ.get(\"FLATJAX_NOTEBOOK_SMOKE\", \"0\")))" in c.source
               for c in nb.cells)


def kernel_of_this_python(folder: Path) -> Path:
    """A `python3` kernelspec running this interpreter, so no other installed python3 kernel is used."""
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (flatjax test)", "language": "python"}))
    return folder


def text_of(cell) -> str:
    """The printed text of a cell, and the plain-text form of what it displayed (e.g. a DataFrame)."""
    return "".join(out.get("text", "") or out.get("data", {}).get("text/plain", "")
                   for out in cell.outputs)


def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    if not (DATA_DIR / "cifar10").is_dir():
        pytest.skip(f"the shared real data is absent ({DATA_DIR / 'cifar10'}); "
                    "see the README's Data section")
    workdir = tmp_path / "work"
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_of_this_python(tmp_path / "jupyter")))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("FLATJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("FLATJAX_DATA_DIR", str(DATA_DIR))
    monkeypatch.setenv("FLATJAX_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.delenv("FLATJAX_SOURCE", raising=False)
    # Most of the run is XLA compiling VGG11 for the CPU; unoptimized code compiles about 40%
    # faster and is fast enough for a one-epoch sweep.
    monkeypatch.setenv("XLA_FLAGS", " ".join(filter(None, (
        os.environ.get("XLA_FLAGS"), *FAST_COMPILE))))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on any error
    cells = {cell.get("id"): cell for cell in nb.cells}

    # The sweep wrote its table and figure into the workdir the test gave it, and the
    # notebook displayed the figure as an image.
    assert (workdir / "batch_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(workdir / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted(float(row["lr"]) for row in rows) == [0.05, 0.2]
    for row in rows:
        assert row["status"] in ("converged", "not_converged"), row
        assert math.isfinite(float(row["lambda_max"])) and float(row["lambda_max"]) > 0
    assert any("image/png" in out.get("data", {}) for out in cells["figure"].outputs)
    table = text_of(cells["table"])
    assert "lambda_max" in table and len(table.strip().splitlines()) == 1 + len(rows)

    # The notebook printed the Lanczos and the dense-Hessian lambda_max; they agree.
    printed = text_of(cells["hessian"])
    lanczos = float(re.search(r"lambda_max \(Lanczos\): (\S+)", printed).group(1))
    dense = float(re.search(r"lambda_max \(dense\): +(\S+)", printed).group(1))
    assert lanczos > 0 and abs(lanczos - dense) <= 1e-3 * abs(dense), printed
    more = text_of(cells["hessian-more"])
    assert "top 3 (Lanczos)" in more and "largest magnitude (Lanczos)" in more
