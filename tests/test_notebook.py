"""notebooks/quickstart.ipynb runs top to bottom on the CPU, opened from its own folder."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # trains every stage of the smoke config: minutes on two cores
def test_quickstart_notebook_executes(tmp_path):
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  # Write the run under tmp_path instead of the checkout's runs/.
  train_cell, = [c for c in nb.cells if c.cell_type == "code" and 'WORKDIR = "runs/quickstart"' in c.source]
  train_cell.source = train_cell.source.replace('"runs/quickstart"', repr(str(tmp_path / "run")))
  # Started in notebooks/, as Jupyter starts it: the install cell finds the checkout above and, with the
  # package already importable here, installs (and downloads) nothing.
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "nothing installed" in outputs
  assert "(4, 32, 32, 3) uint8" in outputs  # the smoke config trains on 32x32 images
  assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "all/color" in outputs
