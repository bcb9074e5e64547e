"""Atomic writes: the old file or the new one after any failure, no temp file left, a plain open()'s permissions."""

from __future__ import annotations

import os
import stat

import pytest

from driftops.files import atomic_path, atomic_write_bytes, atomic_write_text, remove_stale_temporaries


def _temp_files(folder) -> list:
    return [p.name for p in folder.iterdir() if ".tmp." in p.name]


def test_atomic_writes_keep_the_umask_permissions(tmp_path):
    """Written files get a plain open()'s mode (0o666 less the umask), a replaced file too; no temp file is left."""
    old = os.umask(0o027)
    try:
        path = tmp_path / "config.json"
        atomic_write_text(path, "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        os.umask(0o022)
        atomic_write_text(path, "[]")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_text() == "[]"
    finally:
        os.umask(old)
    assert _temp_files(tmp_path) == []


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "particles.npy"
    atomic_write_bytes(path, lambda fh: fh.write(b"old"))

    def crash(fh):
        fh.write(b"half")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(path, crash)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and _temp_files(tmp_path) == []


def test_temp_paths_keep_the_suffix_and_stale_ones_are_found(tmp_path):
    """Writers that pick a format by the suffix (matplotlib, Pillow) see the target's; a killed writer's temp
    file is what remove_stale_temporaries deletes, and nothing else."""
    with atomic_path(tmp_path / "sub" / "flow.gif") as tmp:
        assert tmp.parent == tmp_path / "sub" and tmp.suffix == ".gif" and tmp.name.startswith(".")
        tmp.write_bytes(b"GIF89a")
        (tmp.parent / "kept.gif").write_bytes(b"")
        stale = tmp.with_name(tmp.name.replace("flow", "curves"))
        stale.write_bytes(b"")  # another write, killed
    remove_stale_temporaries(tmp_path / "sub")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["flow.gif", "kept.gif"]
