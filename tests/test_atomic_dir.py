"""model_dir.atomic_dir: a directory appears whole or not at all, with each caller's overwrite policy."""
import os
import stat

import pytest

from baichuan2.model_dir import atomic_dir


def write(directory, name, text):
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        f.write(text)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_new_directory_appears_with_its_files(tmp_path):
    target = tmp_path / "sub" / "model"
    with atomic_dir(str(target)) as tmp:
        write(tmp, "a.txt", "new")
        assert not target.exists()  # nothing visible until the block ends
        assert os.path.dirname(tmp) == str(target.parent)  # beside the target: the rename stays on one filesystem
    assert read(target / "a.txt") == "new"
    assert os.listdir(target.parent) == ["model"]  # no temp directory left
    mode = stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # ordinary permissions, not mkdtemp's 0700


def test_error_leaves_nothing_and_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    write(target, "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(str(target), replace=True) as tmp:
            write(tmp, "a.txt", "half")
            raise RuntimeError("crash mid-write")
    assert read(target / "a.txt") == "old"
    assert os.listdir(tmp_path) == ["model"]


def test_existing_target_is_refused_unless_replace(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    write(target, "a.txt", "old")
    with pytest.raises(FileExistsError):
        with atomic_dir(str(target)) as tmp:
            write(tmp, "a.txt", "new")
    assert read(target / "a.txt") == "old" and os.listdir(tmp_path) == ["model"]
    with atomic_dir(str(target), replace=True) as tmp:
        write(tmp, "b.txt", "new")
    assert os.listdir(target) == ["b.txt"]  # replaced, not merged
    assert os.listdir(tmp_path) == ["model"]
