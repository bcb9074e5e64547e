"""Test configuration: one KeOps cache folder per pytest-xdist worker, so that first compiles never race."""

import os
from pathlib import Path

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and "KEOPS_CACHE_FOLDER" not in os.environ:
    _base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "keops2.3-driftops-tests"
    os.environ["KEOPS_CACHE_FOLDER"] = str(_base / _worker)
