"""Test configuration: one KeOps cache folder per pytest-xdist worker (``python -m pytest -n auto``), so that two
workers never compile into the same folder at once. Each worker's folder lies under ``KEOPS_CACHE_FOLDER`` when it is
set, else under ``~/.cache/keops2.3-driftops-tests``; subprocesses started by the tests inherit it."""

import os
from pathlib import Path

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker:
    _default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "keops2.3-driftops-tests"
    os.environ["KEOPS_CACHE_FOLDER"] = str(Path(os.environ.get("KEOPS_CACHE_FOLDER", _default)) / _worker)
