"""kdfast.atomic: a file is replaced whole or not at all, and no temporary file is left behind."""

import os
import stat

import pytest

from kdfast.atomic import atomic_path, atomic_write


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_bytes_text_and_writer_functions(tmp_path):
    assert atomic_write(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "a.txt", "h\u00e9").read_text(encoding="utf-8") == "h\u00e9"
    assert atomic_write(tmp_path / "a.out", lambda f: f.write(b"xyz")).read_bytes() == b"xyz"
    assert _leftovers(tmp_path) == []


def test_a_failing_writer_keeps_the_old_content_and_removes_its_temp_file(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")

    def half_then_fail(f):
        f.write(b"half-written")
        raise KeyboardInterrupt  # Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_gives_a_unique_name_per_call_and_replaces_on_success(tmp_path):
    target = tmp_path / "model.onnx"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_bytes(b"first")
        second.write_bytes(b"second")
        assert not target.exists()  # nothing appears before the writer is done
    assert target.read_bytes() == b"first"  # the outer context finished last
    assert _leftovers(tmp_path) == []


def test_new_files_get_the_umask_permissions_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "student.pt", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
