"""notebooks/history.ipynb runs against a history produced by real syncs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_history_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gen.py"), "tree", "--files", "300", "--big", "1",
                    "--big-size", "2MB", str(src)], check=True, capture_output=True)
    env = dict(os.environ, RESYNC_HISTORY=str(db), RESYNC_HISTORY_MERGE="inline")
    for i, extra in enumerate([[], ["--no-whole-file"], ["--no-whole-file", "--delete"]]):
        if i:
            subprocess.run([sys.executable, str(ROOT / "bench" / "gen.py"), "change", "--fraction", "0.1",
                            "--seed", str(i), str(src)], check=True, capture_output=True)
        r = subprocess.run([sys.executable, "-m", "resync", "sync", *extra, str(src), str(dst)],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
    nb = nbformat.read(ROOT / "notebooks" / "history.ipynb", as_version=4)
    old = os.environ.get("RESYNC_HISTORY")
    os.environ["RESYNC_HISTORY"] = str(db)          # the kernel inherits it
    try:
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if old is None:
            os.environ.pop("RESYNC_HISTORY", None)
        else:
            os.environ["RESYNC_HISTORY"] = old
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "3 runs" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 3
