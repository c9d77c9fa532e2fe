"""notebooks/quickstart.ipynb runs top to bottom on the CPU."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path):
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  # Run in a copy of the layout the notebook expects (the project root), writing its run under tmp_path.
  nb.cells[3].source = nb.cells[3].source.replace('"runs/quickstart"', repr(str(tmp_path / "run")))
  NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "(4, 32, 32, 3) uint8" in outputs  # the smoke config trains on 32x32 images
  assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "all/color" in outputs
