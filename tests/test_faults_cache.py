"""Fault injection on the prediction cache, through the `zsa` CLI (in process, or as subprocesses).

Every case asserts the exit code, the words of the message, that no traceback is printed, and that no
complete cache that existed before was damaged (the other split's cache still passes a full verify and
keeps its bytes). The caches of a small image folder (bundled tiny CLIP teacher, 24 images in a train
and a test split) are built once per module and copied for each case.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_image_folder

from zeroshot_adapt import cache as cache_module
from zeroshot_adapt import pipeline
from zeroshot_adapt.cli import main

EXIT_USER_ERROR = 2
PER_CLASS = 8  # 3 classes x 8 images; holdout 0.25: 18 train, 6 test


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=PER_CLASS)


def dataset_args(folder: Path) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", str(folder), "--model", "zsa-tiny-digits",
            "--pretrained", "bundled", "--set", "data.holdout_fraction=0.25", "--set", "teacher.batch_size=4",
            "--set", "teacher.shard_size=4"]


def run_cli(argv: list[str], capsys, caplog) -> tuple[int, str]:
    """Run `zsa argv` in process; (exit code, stdout + stderr + log records)."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out + err + caplog.text


def cache_dir_of(root: Path, split: str, folder: Path) -> Path:
    config = pipeline.resolve_config("imagefolder", overrides=[
        f"data.data_dir={folder}", "data.holdout_fraction=0.25", "teacher.model=zsa-tiny-digits",
        "teacher.pretrained=bundled", "teacher.batch_size=4", f"teacher.cache_dir={root}"])
    table = pipeline.load_table(config, split)
    identity = pipeline.cache_identity(config, table, pipeline.prompts_for(config, table))
    return cache_module.cache_directory(root, identity)


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "build.json"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, folder) -> Path:
    """A cache root holding the folder's train and test caches (built once)."""
    root = tmp_path_factory.mktemp("pristine") / "cache"
    assert main(["cache", *dataset_args(folder), "--cache-dir", str(root)]) == 0
    return root


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    """A private copy of the pristine cache root."""
    copy = tmp_path / "cache"
    shutil.copytree(pristine, copy)
    return copy


def assert_test_cache_intact(root: Path, pristine: Path, folder: Path) -> None:
    """The other complete cache (the test split's) is untouched: full verify and the same bytes as before."""
    test_dir = cache_dir_of(root, "test", folder)
    cache_module.verify_cache(test_dir)
    assert file_bytes(test_dir) == file_bytes(pristine / test_dir.name)


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path, by: int) -> None:
    path.write_bytes(path.read_bytes()[:-by])


DAMAGE = {
    "truncated logits": lambda d: truncate(d / "fields" / "logits.npy", 100),
    "bit flip in logits": lambda d: flip(d / "fields" / "logits.npy", -33),
    "bit flip in prediction": lambda d: flip(d / "fields" / "prediction.npy", -8),
    "bit flip in valid": lambda d: flip(d / "fields" / "valid.npy", -1),
    "deleted identity.json": lambda d: (d / "identity.json").unlink(),
    "deleted meta.json": lambda d: (d / "meta.json").unlink(),
    "garbage meta.json": lambda d: (d / "meta.json").write_text("{\"num_samples\": "),
}


@pytest.mark.parametrize(
    ("how", "command", "named", "then_rebuild"),
    [
        ("truncated logits", "zeroshot", "field logits", False),
        ("bit flip in logits", "zeroshot", "field logits", True),
        ("bit flip in prediction", "pseudolabel", "field prediction", False),
        ("bit flip in valid", "pseudolabel", "field valid", False),
        ("deleted identity.json", "pseudolabel", "identity.json", True),
        ("deleted meta.json", "pseudolabel", "meta.json", False),
        ("garbage meta.json", "zeroshot", "meta.json", False),
    ],
)
def test_a_damaged_cache_is_a_clear_error_and_rebuild_repairs_it(root, pristine, folder, tmp_path, capsys, caplog,
                                                                 how, command, named, then_rebuild):
    train_dir = cache_dir_of(root, "train", folder)
    DAMAGE[how](train_dir)
    argv = [command, *dataset_args(folder), "--cache-dir", str(root), "--out", str(tmp_path / "out")]
    code, text = run_cli(argv, capsys, caplog)
    assert code == EXIT_USER_ERROR
    assert f"prediction cache {train_dir} is damaged ({named}" in text and "delete it or run with --rebuild" in text
    assert "Traceback" not in text
    assert_test_cache_intact(root, pristine, folder)

    code, text = run_cli(["cache", "--verify", "--cache-dir", str(root)], capsys, caplog)
    assert code == EXIT_USER_ERROR and "DAMAGED" in text and f"{train_dir}" in text and "Traceback" not in text

    if not then_rebuild:
        return
    caplog.clear()
    code, text = run_cli([*argv, "--rebuild"], capsys, caplog)
    assert code == 0, text
    assert file_bytes(train_dir) == file_bytes(pristine / train_dir.name), "rebuilt byte for byte"
    code, text = run_cli(["cache", "--verify", "--cache-dir", str(root)], capsys, caplog)
    assert code == 0 and "verified 2 cache(s)" in text
    assert_test_cache_intact(root, pristine, folder)


def test_rebuild_on_the_cache_command(root, pristine, folder, capsys, caplog):
    train_dir = cache_dir_of(root, "train", folder)
    flip(train_dir / "fields" / "features.npy", -3)
    code, text = run_cli(["cache", *dataset_args(folder), "--split", "train", "--rebuild", "--cache-dir", str(root)],
                         capsys, caplog)
    assert code == 0 and f"rebuilt 18 predictions in {train_dir}" in text
    cache_module.verify_cache(train_dir)
    assert_test_cache_intact(root, pristine, folder)


def test_disk_full_during_the_merge_is_a_clear_error(root, pristine, folder, capsys, caplog, monkeypatch):
    """ENOSPC in the middle of writing the merged files (monkeypatched: runs everywhere)."""
    train_dir = cache_dir_of(root, "train", folder)
    cache_module.delete_cache(train_dir)
    real_put = cache_module._NpyWriter._put
    calls = []

    def disk_fills(self, data):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_put(self, data)

    monkeypatch.setattr(cache_module._NpyWriter, "_put", disk_fills)
    code, text = run_cli(["cache", *dataset_args(folder), "--split", "train", "--cache-dir", str(root)], capsys, caplog)
    assert code == EXIT_USER_ERROR and "Traceback" not in text
    assert "no space left on the device" in text and str(train_dir) in text and "bytes needed" in text
    partial = train_dir.with_name(train_dir.name + ".partial")
    assert not train_dir.exists() and not list(partial.glob("merge-*")), "no half-written cache or merge files"
    assert list((partial / "shards").glob("*.npz")), "the predictions already made are kept for the re-run"
    assert_test_cache_intact(root, pristine, folder)

    monkeypatch.setattr(cache_module._NpyWriter, "_put", real_put)
    code, text = run_cli(["cache", *dataset_args(folder), "--split", "train", "--cache-dir", str(root)], capsys, caplog)
    assert code == 0
    assert file_bytes(train_dir) == file_bytes(pristine / train_dir.name)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs (needs the right to mount; skipped with the reason where the machine refuses)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {(done.stderr or done.stdout).strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_really_full_disk(small_filesystem, pristine, folder, capsys, caplog, monkeypatch):
    root = small_filesystem / "cache"
    test_dir = cache_dir_of(pristine, "test", folder)
    (root).mkdir()
    shutil.copytree(test_dir, root / test_dir.name)  # a complete cache that must survive
    train_dir = root / cache_dir_of(pristine, "train", folder).name
    argv = ["cache", *dataset_args(folder), "--split", "train", "--cache-dir", str(root)]

    # 1. The shards fit, the merged cache does not: refused before writing it, with the size it needs.
    code, text = run_cli(argv, capsys, caplog)
    assert code == EXIT_USER_ERROR and "Traceback" not in text
    assert "no space left on the device" in text and str(train_dir) in text and "bytes needed" in text
    partial = train_dir.with_name(train_dir.name + ".partial")
    assert not train_dir.exists() and list((partial / "shards").glob("*.npz"))
    assert_test_cache_intact(root, pristine, folder)

    # 2. The free-space check is fooled and the disk really fills mid-merge: ENOSPC, not SIGBUS; files removed.
    filler = small_filesystem / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_filesystem).free - 4096))  # leave one page
    free_before = shutil.disk_usage(small_filesystem).free
    real_usage = shutil.disk_usage
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1 << 40))
    code, text = run_cli(argv, capsys, caplog)
    assert code == EXIT_USER_ERROR and "Traceback" not in text and "no space left on the device" in text
    assert not list(partial.glob("merge-*")) and real_usage(small_filesystem).free == free_before
    monkeypatch.setattr(cache_module.shutil, "disk_usage", real_usage)
    assert_test_cache_intact(root, pristine, folder)

    # 3. With room again, the same command finishes from the kept shards.
    filler.unlink()
    remount = subprocess.run(["mount", "-o", "remount,size=8m", str(small_filesystem)], capture_output=True)
    assert remount.returncode == 0
    code, text = run_cli(argv, capsys, caplog)
    assert code == 0, text
    assert file_bytes(train_dir) == file_bytes(pristine / train_dir.name)
    assert_test_cache_intact(root, pristine, folder)


# ---------------------------------------------------------------------------------------------- concurrency


def zsa_process(*argv: str, stderr_path: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "zeroshot_adapt.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=open(stderr_path, "w"), text=True)  # noqa: SIM115


@pytest.mark.slow  # two fresh interpreters importing torch: ~50 s here; test_cache.py has the fast in-process twin
def test_two_concurrent_cache_commands_on_one_directory(root, pristine, folder, tmp_path):
    test_dir = cache_dir_of(root, "test", folder)
    cache_module.delete_cache(test_dir)
    argv = ("cache", *dataset_args(folder), "--split", "test", "--cache-dir", str(root))
    processes = [zsa_process(*argv, stderr_path=tmp_path / f"err{i}.txt") for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    errors = [(tmp_path / f"err{i}.txt").read_text() for i in range(2)]
    assert [p.returncode for p in processes] == [0, 0], errors
    assert all("Traceback" not in e and "FileNotFoundError" not in e for e in errors), errors
    assert all(f"6 predictions cached in {test_dir}" in out for out in outputs)
    cache_module.verify_cache(test_dir)
    assert file_bytes(test_dir) == file_bytes(pristine / test_dir.name)
    assert sorted(p.name for p in root.iterdir() if p.name != ".locks") == sorted(
        p.name for p in pristine.iterdir() if p.name != ".locks"), "no partial or temporary directory left"


@pytest.mark.slow  # a fresh interpreter: ~25 s here; test_cache.py has the fast in-process twin
def test_a_second_builder_waits_with_a_message(root, pristine, folder, tmp_path):
    test_dir = cache_dir_of(root, "test", folder)
    cache_module.delete_cache(test_dir)
    held = cache_module._BuildLock(root, test_dir.name).acquire()  # as if another process were building it
    stderr_path = tmp_path / "err.txt"
    try:
        process = zsa_process("cache", *dataset_args(folder), "--split", "test", "--cache-dir", str(root),
                              stderr_path=stderr_path)
        deadline = time.monotonic() + 240
        while "waiting for it to finish" not in stderr_path.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, stderr_path.read_text()
            time.sleep(0.2)
        assert "another process is building the prediction cache" in stderr_path.read_text()
        assert not test_dir.exists()
    finally:
        held.release()
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in stderr_path.read_text()
    assert f"6 predictions cached in {test_dir}" in out
    assert file_bytes(test_dir) == file_bytes(pristine / test_dir.name)


def test_list_and_prune_through_the_cli(root, folder, capsys, caplog):
    test_dir = cache_dir_of(root, "test", folder)
    partial = root / ("0" * 16 + ".partial")
    (partial / "shards").mkdir(parents=True)  # a build that died before writing its plan
    code, text = run_cli(["cache", "--list", "--cache-dir", str(root)], capsys, caplog)
    assert code == 0
    assert "imagefolder/test" in text and "imagefolder/train" in text and "zsa-tiny-digits" in text
    assert "partial (stopped)" in text and "complete" in text and " 18 " in text
    code, text = run_cli(["cache", "--prune", "--dry-run", "--cache-dir", str(root)], capsys, caplog)
    assert code == 0 and "would remove" in text and partial.exists()
    code, text = run_cli(["cache", "--prune", "--cache-dir", str(root)], capsys, caplog)
    assert code == 0 and "removed" in text and not partial.exists() and test_dir.exists()
    code, text = run_cli(["cache", "--prune", "--older-than", "0", "--dataset", "imagefolder",
                          "--cache-dir", str(root)], capsys, caplog)
    assert code == 0 and not test_dir.exists() and "removed" in text
    code, text = run_cli(["cache", "--older-than", "3", "--cache-dir", str(root)], capsys, caplog)
    assert code == EXIT_USER_ERROR and "go with --prune" in text and "Traceback" not in text
