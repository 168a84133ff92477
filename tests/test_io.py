"""fdistill.io: the one atomic-write idiom (temporary sibling .NAME.tmp-PID, then a rename), for files and folders."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fdistill import io


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    path = tmp_path / "ckpt"
    with io.atomic_dir(path, durable=True) as tmp:
        assert tmp == tmp_path / f".ckpt.tmp-{os.getpid()}" and tmp.is_dir() and not path.exists()
        (tmp / "a.txt").write_text("first")
    assert sorted(p.name for p in path.iterdir()) == ["a.txt"] and hidden(tmp_path) == []
    with io.atomic_dir(path) as tmp:  # the same name again: the old folder goes, the new one takes its place
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in path.iterdir()) == ["b.txt"] and hidden(tmp_path) == []
    with pytest.raises(RuntimeError, match="stopped"), io.atomic_dir(path) as tmp:
        (tmp / "c.txt").write_text("half")
        raise RuntimeError("stopped")
    assert sorted(p.name for p in path.iterdir()) == ["b.txt"] and hidden(tmp_path) == []


def test_atomic_dir_removes_a_link_planted_at_its_temporary_name(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    folder = tmp_path / "run"
    folder.mkdir()
    io.temp_name(folder / "shard").symlink_to(outside)
    with io.atomic_dir(folder / "shard") as tmp:
        assert not tmp.is_symlink()
        (tmp / "x").write_text("new")
    assert sorted(p.name for p in outside.iterdir()) == ["precious"] and (outside / "precious").read_text() == "keep"
    assert (folder / "shard" / "x").read_text() == "new" and not (folder / "shard").is_symlink()


def test_other_temps_are_the_stopped_writers_not_this_process(tmp_path):
    mine = io.temp_name(tmp_path / "log.jsonl")
    theirs = tmp_path / f".log.jsonl.tmp-{os.getpid() + 1}"
    for p in (mine, theirs, tmp_path / "log.jsonl", tmp_path / ".hidden"):
        p.write_text("")
    assert io.other_temps(tmp_path) == [theirs]
    assert sorted(p.name for p in tmp_path.glob(io.TEMP_GLOB)) == sorted([mine.name, theirs.name])


@pytest.fixture
def planted(tmp_path):
    """A symlink at folder/name to a file outside holding a secret; returns (path, target)."""
    def plant(name: str) -> tuple[Path, Path]:
        (tmp_path / "out").mkdir(exist_ok=True)
        target = tmp_path / f"secret-{name}"
        target.write_bytes(b"secret")
        (tmp_path / "out" / name).symlink_to(target)
        return tmp_path / "out" / name, target

    return plant


def test_npz_and_teacher_files_replace_a_planted_link(planted):
    from fdistill.evaluation.evaluate import save_npz
    from fdistill.networks.mlp import MLPDenoiser
    from fdistill.teachers.loading import save_network

    path, target = planted("stats.npz")
    save_npz(path, mu=np.arange(3.0))
    assert not path.is_symlink() and target.read_bytes() == b"secret" and hidden(path.parent) == []
    with np.load(path) as f:  # the name as given: np.savez adds no second .npz
        np.testing.assert_array_equal(f["mu"], np.arange(3.0))

    path, target = planted("teacher.safetensors")
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=4, depth=1)
    save_network(net, "mlp", {"dim": 2, "hidden": 4, "depth": 1}, path)
    assert not path.is_symlink() and target.read_bytes() == b"secret" and hidden(path.parent) == []
    loaded, state = load_file(path), net.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
