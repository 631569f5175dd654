"""Fault injection: the catalogue of bad inputs and faults of issue 12 (configs, files, data folders,
prompt files, checkpoints, signals, full disks, concurrent runs, the hub).

Each case runs a command (``cli.main(argv)`` in-process, or a subprocess where signals or hangs are
involved, always with a timeout) and checks the exit code, the words of the message, that no traceback
reached the user, and that nothing was left behind or damaged: no run directory or config.yaml from a
refused command, prior results byte-identical, no partial temp files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from zeroshot_adapt import pipeline
from zeroshot_adapt.cli import main
from zeroshot_adapt.data import sources
from zeroshot_adapt.data.registry import load_split
from zeroshot_adapt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["optim.epochs=2", "optim.steps_per_epoch=4", "data.num_workers=0", "optim.batch_size=8", "optim.mu=2",
        "checkpoint_every_steps=2", "eval_every_epochs=2"]  # checkpoints at steps 2, 4, 6, 8; one evaluation
TEACHER = ["--model", "zsa-tiny-digits", "--pretrained", "bundled"]  # for image folders (no dataset preset)
SUBPROCESS_TIMEOUT_S = 240


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared machine: one intra-op thread (here and in subprocesses) is much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if previous is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A digits prediction cache shared by the module (built by `finished_run` or the first command)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished_run(cache_dir, tmp_path_factory) -> Path:
    """A finished tiny digits run (read-only for the tests: they copy or compare, never change it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(adapt_argv(cache_dir, run_dir)) == 0
    return run_dir


def zsa(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def adapt_argv(cache_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    argv = ["adapt", "--dataset", "digits", "--cache-dir", str(cache_dir), "--run-dir", str(run_dir)]
    for item in (*TINY, *overrides):
        argv += ["--set", item]
    return argv


def assert_refused(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "Original Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes (the run directory's lock file aside: it exists while anyone looks)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != pipeline.RUN_LOCK_NAME}


# ============================================================================ configuration and input files


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("optim.epochs=-3", ["optim.epochs (--epochs)=-3", ">= 1"]),
        ("optim.epochs=0", ["optim.epochs (--epochs)=0", ">= 1"]),
        ("optim.epochs=true", ["optim.epochs", "boolean"]),
        ("optim.batch_size=2.7", ["optim.batch_size=2.7", "not a valid int"]),
        ("optim.batch_size=0", ["optim.batch_size=0", ">= 1"]),
        ("run_dir=null", ["run_dir", "null"]),
        ("optim.lr=nan", ["optim.lr", "finite"]),
        ("optim.lr=-1", ["optim.lr=-1.0", "> 0"]),
        ("algorithm.lambda_u=nan", ["algorithm.lambda_u", "finite"]),
        ("seed=-5", ["seed (--seed)=-5", "[0, 4294967295]"]),
        ("seed=4294967296", ["seed (--seed)=4294967296"]),
        ("optim.grad_accum=0", ["optim.grad_accum=0"]),
        ("checkpoint_every_steps=0", ["checkpoint_every_steps=0"]),
        ("data.image_size=0", ["data.image_size=0"]),
        ("optim.mixed_precision=fp64", ["optim.mixed_precision='fp64'", "one of no, fp16, bf16"]),
        ("teacher.shard_size=0", ["teacher.shard_size=0"]),
        ("optim.lr=[0.1", ["optim.lr", "not valid YAML"]),
    ],
)
def test_bad_config_values_are_refused_before_anything_is_written(capsys, tmp_path, override, words):
    run_dir = tmp_path / "run"
    code, _, err = zsa(capsys, *adapt_argv(tmp_path / "cache", run_dir, override))
    assert_refused(code, err, *words)
    assert not run_dir.exists() and not (tmp_path / "cache").exists() and not Path("None").exists()


def test_bad_config_files_are_refused(capsys, tmp_path):
    cases = {
        "malformed.yaml": (b"optim: {epochs: 3\n", ["not valid YAML", "line"]),
        "latin1.yaml": ("optim:\n  lr: 0.1 # d\xe9j\xe0\n".encode("latin-1"), ["not UTF-8"]),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        code, _, err = zsa(capsys, "adapt", "--dataset", "digits", "--config", tmp_path / name,
                           "--run-dir", tmp_path / "run")
        assert_refused(code, err, repr(str(tmp_path / name)), *words)
    code, _, err = zsa(capsys, "adapt", "--dataset", "digits", "--config", tmp_path, "--run-dir", tmp_path / "run")
    assert_refused(code, err, "is a directory")
    assert not (tmp_path / "run").exists()


def test_bad_labels_files_are_refused_leaving_no_run_behind(capsys, tmp_path, cache_dir):
    (tmp_path / "keys.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for labels, words in ((tmp_path / "keys.txt", ["not UTF-8"]), (tmp_path, ["is a directory"])):
        run_dir = tmp_path / "run"
        code, _, err = zsa(capsys, "ssl", "--dataset", "digits", "--labels-file", labels, "--run-dir", run_dir,
                           "--cache-dir", cache_dir, "--set", "data.num_workers=0")
        assert_refused(code, err, "labeled-keys file", *words)
        assert not run_dir.exists()


# ============================================================================ checkpoints and the resume guard


class _Marker:
    """Unpickling this creates a directory: what an attacker's payload would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(capsys, tmp_path, cache_dir):
    run_dir, marker = tmp_path / "run", tmp_path / "MARKER"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"format": 2, "step": 1, "config": {}, "extra": _Marker(marker)}, run_dir / "checkpoints" / "last.pt")
    before = snapshot(run_dir)
    code, _, err = zsa(capsys, *adapt_argv(cache_dir, run_dir))
    assert_refused(code, err, "last.pt", "refused unread", "could run code")
    assert not marker.exists()
    assert snapshot(run_dir) == before  # no config.yaml written, the file untouched


def test_a_damaged_checkpoint_is_a_clear_error(capsys, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"\x00garbage" * 50)
    code, _, err = zsa(capsys, *adapt_argv(cache_dir, run_dir))
    assert_refused(code, err, "last.pt", "delete it")


def _partial_run(cache_dir: Path, run_dir: Path, *overrides: str) -> None:
    config = pipeline.resolve_config("digits", overrides=[f"teacher.cache_dir={cache_dir}", *TINY, *overrides])
    report = pipeline.adapt(replace(config, run_dir=str(run_dir)), stop_after_steps=2)
    assert not report["completed"]


def test_resume_guard_reads_the_checkpoint_names_keys_and_ignores_what_cannot_matter(capsys, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    _partial_run(cache_dir, run_dir)
    (run_dir / "config.yaml").unlink()  # a missing config.yaml no longer bypasses the guard
    before = snapshot(run_dir)
    code, _, err = zsa(capsys, *adapt_argv(cache_dir, run_dir, "algorithm.name=fixmatch", "seed=7"))
    assert_refused(code, err, "algorithm.name: 'debiaspl' in the checkpoint, 'fixmatch' now",
                   "seed: 0 in the checkpoint, 7 now", "2 key(s) differ")
    assert snapshot(run_dir) == before
    # a moved cache, another worker count and another checkpoint frequency resume the same run
    moved = tmp_path / "moved-cache"
    shutil.copytree(cache_dir, moved)
    code, out, err = zsa(capsys, *adapt_argv(moved, run_dir, "data.num_workers=1", "checkpoint_every_steps=3"))
    assert code == 0, err
    assert "step 8/8" in out


def test_a_finished_run_reopened_prints_its_saved_report_without_recomputing(capsys, tmp_path, cache_dir,
                                                                             finished_run, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    saved = snapshot(run_dir)
    first = json.loads((run_dir / "report.json").read_text())
    def no_work(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(pipeline, "prepare_training_data", no_work)
    code, again, err = zsa(capsys, *adapt_argv(cache_dir, run_dir))
    assert code == 0, err
    assert "adapted student top-1" in again and f"{100 * first['student']['top1']:.2f}%" in again
    assert snapshot(run_dir) == saved
    with pytest.raises(AssertionError, match="recomputed"):  # --reevaluate does recompute
        main(adapt_argv(cache_dir, run_dir) + ["--reevaluate"])


# ============================================================================ NaN guard (CLI level)


def test_a_diverging_run_stops_with_the_step_and_the_likely_cause(capsys, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    code, _, err = zsa(capsys, *adapt_argv(cache_dir, run_dir, "optim.lr=1e30", "optim.warmup_epochs=0"))
    assert_refused(code, err, "NaN or inf", "optimizer step", "learning rate is too high (optim.lr=1e+30")
    assert not (run_dir / "report.json").exists() and not (run_dir / "student.pt").exists()
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if checkpoint.exists():  # whatever was saved before the divergence is finite
        state = torch.load(checkpoint, weights_only=True)
        assert all(bool(torch.isfinite(t).all()) for t in state["student"].values() if t.is_floating_point())


# ============================================================================ disk full


def _fail_checkpoint_writes(monkeypatch, number: int) -> list[int]:
    """Make the `number`-th write of a checkpoint temp file run out of space after 4 KiB (a real OSError
    raised by the file object torch.save writes through)."""
    import zeroshot_adapt.fileio as fileio

    real_fdopen = fileio.os.fdopen
    opened: list[int] = []

    class Full:
        def __init__(self, handle) -> None:
            self.handle, self.written = handle, 0

        def write(self, data) -> int:
            if self.written + len(data) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            opened.append(fd)
            if len(opened) == number:
                return Full(handle)
        return handle

    monkeypatch.setattr(fileio.os, "fdopen", fdopen)
    return opened


def test_a_full_disk_while_checkpointing_names_the_file_and_loses_nothing(capsys, tmp_path, cache_dir, monkeypatch,
                                                                          finished_run):
    """Checkpoints at steps 2, 4 (epoch 1) and 6 (the third write hits ENOSPC) and 8; then resume."""
    whole = finished_run
    run_dir = tmp_path / "run"
    _fail_checkpoint_writes(monkeypatch, number=3)
    code, _, err = zsa(capsys, *adapt_argv(cache_dir, run_dir))
    assert_refused(code, err, "no space left on the device while writing", str(run_dir / "checkpoints" / "last.pt"))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.pt"]  # no temp file left
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.undo()
    code, out, err = zsa(capsys, *adapt_argv(cache_dir, run_dir))
    assert code == 0, err
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]  # resumed: no duplicate line
    a, b = torch.load(whole / "student.pt", weights_only=True), torch.load(run_dir / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # and nothing lost: same weights as without the fault


@pytest.mark.slow  # two fresh processes in a mount namespace: ~80 s on the shared 2-core machine
def test_a_full_small_filesystem_while_checkpointing(tmp_path, cache_dir, finished_run):
    """A real full disk: the run directory on a 2.5 MB tmpfs (one 1.7 MB checkpoint fits, its atomic
    replacement does not). Needs a private mount namespace (unshare -rm); skipped where not permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mount}"],
                           capture_output=True, text=True, timeout=30) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {probe.stderr.strip() if probe else 'no unshare'}")
    run_dir = mount / "run"
    command = [sys.executable, "-m", "zeroshot_adapt.cli", *adapt_argv(cache_dir, run_dir, "optim.epochs=1",
                                                                       "optim.steps_per_epoch=6")]
    quoted = " ".join(f"'{c}'" for c in command)
    read_step = f"import torch; print('step=%d' % torch.load('{run_dir}/checkpoints/last.pt')['step'])"
    script = textwrap.dedent(f"""
        mount -t tmpfs -o size=2500k tmpfs {mount} || exit 99
        {quoted} >/dev/null 2>{tmp_path}/err1.txt; echo "rc1=$?"
        ls -A {run_dir}/checkpoints | tr '\\n' ' '; echo
        {sys.executable} -c "{read_step}"
        mount -o remount,size=64m {mount}
        {quoted} >/dev/null 2>{tmp_path}/err2.txt; echo "rc2=$?"
        wc -l < {run_dir}/metrics.jsonl
    """)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, env=dict(os.environ, PYTHONPATH=str(REPO)))
    out = done.stdout.split("\n")
    err1 = (tmp_path / "err1.txt").read_text()
    assert "rc1=2" in out, (done.stdout, done.stderr, err1[-2000:])
    assert "no space left on the device while writing" in err1 and "last.pt" in err1 and "Traceback" not in err1
    assert out[1].split() == ["last.pt"]  # no partial temp file
    assert "step=2" in out  # the last good checkpoint is intact
    assert "rc2=0" in out, (tmp_path / "err2.txt").read_text()[-2000:]
    assert out[out.index("rc2=0") + 1].strip() == "1"  # one epoch, one line


# ============================================================================ signals and concurrent runs


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_steps(log: Path, total: int, steps: int, process: subprocess.Popen) -> None:
    deadline = time.time() + SUBPROCESS_TIMEOUT_S
    while time.time() < deadline and process.poll() is None:
        done = max(map(int, re.findall(rf"(\d+)/{total}", log.read_text())), default=0)
        if done >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach step {steps}: {log.read_text()[-2000:]}")


def test_sigterm_to_the_process_group_with_workers_checkpoints_and_a_second_run_is_locked_out(
    capsys, tmp_path, cache_dir, finished_run
):
    """`kill -TERM -- -PGID` (Slurm's scancel, systemd) of a run with 2 DataLoader workers: the workers
    survive it, the run checkpoints and exits 130, and the checkpoint resumes. While it runs, a second run
    in the same run directory is refused, naming the first one's pid and host."""
    run_dir, total = tmp_path / "run", 5000
    long_run = ["optim.epochs=1", f"optim.steps_per_epoch={total}", "checkpoint_every_steps=1000"]
    command = [sys.executable, "-m", "zeroshot_adapt.cli",
               *adapt_argv(cache_dir, run_dir, *long_run, "data.num_workers=2")]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                   env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            _wait_for_steps(log, total, 3, process)
            code, _, second = zsa(capsys, *adapt_argv(cache_dir, run_dir, *long_run))
            assert_refused(code, second, "is in use by process", str(process.pid), socket.gethostname())
            os.killpg(process.pid, signal.SIGTERM)
            out, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert process.returncode == 130, stderr[-3000:]
    deadline = time.time() + 30  # the workers (which ignored the signal) ended with the main process
    while time.time() < deadline and _group_alive(process.pid):
        time.sleep(0.2)
    assert not _group_alive(process.pid), "DataLoader workers outlived the run"
    assert "interrupted: re-run the same command to resume" in out
    assert "killed by signal" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    step = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 3 <= step < total
    config = pipeline.resolve_config("digits", overrides=[f"teacher.cache_dir={cache_dir}", *TINY, *long_run])
    resumed = pipeline.adapt(replace(config, run_dir=str(run_dir)), stop_after_steps=2)
    assert resumed["step"] == step + 2 and not resumed["completed"]


# ============================================================================ data sources


def _folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4) -> Path:
    from conftest import write_image_folder

    return write_image_folder(root, classes, per_class)


def test_a_symlink_loop_is_followed_once_and_reported(tmp_path, caplog):
    root = _folder(tmp_path / "flat")
    (root / "cat" / "loop").symlink_to("..")  # the Forest/loop -> ..
    (root / "dog" / "again").symlink_to(root / "dog")
    table = load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0)
    assert len(table) == 12  # not 12 + every class again, labelled cat
    assert sorted(np.bincount(table.labels).tolist()) == [4, 4, 4]
    assert all(key.split("/")[0] == table.class_names[label] for key, label in zip(table.keys, table.labels,
                                                                                    strict=True))
    assert "link(s) to a directory already listed" in caplog.text and "loop" in caplog.text

    split = tmp_path / "split"
    _folder(split / "train")
    _folder(split / "test", per_class=2)
    (split / "train" / "cat" / "up").symlink_to("../..")  # would pull the test split into train
    train = load_split("imagefolder", "train", data_dir=str(split))
    assert len(train) == 12 and not any(key.startswith("test/") for key in train.keys)


def test_fifos_sockets_and_dangling_links_are_skipped_and_counted(tmp_path, caplog):
    root = _folder(tmp_path / "images")
    os.mkfifo(root / "cat" / "x.png")  # opening it would block forever
    (root / "dog" / "gone.png").symlink_to(root / "nowhere.png")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "fox" / "s.png"))
    def hung(signum, frame):
        raise TimeoutError("listing or reading the folder hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)  # a hang fails the test instead of blocking the suite
    try:
        table = load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0)
        images = [table.load_image(i) for i in range(len(table))]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        listener.close()
    assert len(table) == len(images) == 12
    assert "1 dangling link(s)" in caplog.text and "2 FIFO(s), socket(s) or device(s)" in caplog.text


def test_an_unlistable_class_folder_fails_with_its_path(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images")
    real = os.scandir
    monkeypatch.setattr(sources, "RETRY_DELAYS_S", (0.0, 0.0))

    def scandir(path="."):
        if str(path).endswith("dog"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    with pytest.raises(UserError, match=r"cannot list directory .*dog.*Permission denied \(EACCES\)"):
        load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0)


def _flaky_open(monkeypatch, path: Path, failures: int, code: int = errno.EACCES) -> list[int]:
    """PIL's Image.open raises an OSError with `code` for `path`, `failures` times (forked workers too)."""
    from PIL import Image

    real = Image.open
    calls: list[int] = []

    def open_(fp, *args, **kwargs):
        if str(fp) == str(path) and len(calls) < failures:
            calls.append(1)
            raise OSError(code, os.strerror(code), str(fp))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(sources.Image, "open", open_)
    monkeypatch.setattr(sources, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    return calls


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.EMFILE])
def test_a_passing_os_error_is_retried(tmp_path, monkeypatch, code):
    root = _folder(tmp_path / "images")
    calls = _flaky_open(monkeypatch, root / "cat" / "cat_0.png", failures=2, code=code)
    table = load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0)
    assert table.load_image(list(table.keys).index("cat/cat_0.png")).size == (8, 8)
    assert len(calls) == 2


def test_a_persistent_os_error_fails_the_cache_build_with_the_path_and_is_not_cached_as_corrupt(
    capsys, tmp_path, monkeypatch
):
    root = _folder(tmp_path / "images")
    bad = root / "dog" / "dog_1.png"
    _flaky_open(monkeypatch, bad, failures=10**6)
    argv = ["cache", "--dataset", "imagefolder", "--data-dir", root, "--cache-dir", tmp_path / "cache",
            "--set", "data.holdout_fraction=0", "--split", "train", "--num-workers", "1", *TEACHER]
    code, _, err = zsa(capsys, *argv)  # decoded in a DataLoader worker: its message, not its traceback
    assert_refused(code, err, f"cannot read image {str(bad)!r}", "Permission denied (EACCES)",
                   "not recorded as corrupt")
    monkeypatch.undo()
    code, out, err = zsa(capsys, *argv)  # the cause fixed: the image is read, not remembered as corrupt
    assert code == 0, err
    config = pipeline.resolve_config("imagefolder", overrides=[
        f"data.data_dir={root}", f"teacher.cache_dir={tmp_path / 'cache'}", "data.holdout_fraction=0",
        "teacher.model=zsa-tiny-digits", "teacher.pretrained=bundled"])
    assert pipeline.teacher_predictions(config, "train").valid.all()


def test_worker_errors_come_back_as_the_original_message():
    from torch.utils.data import DataLoader, Dataset

    from zeroshot_adapt.data.datasets import unwrap_worker_errors

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):
            raise sources.ImageReadError("/data/cat/1.png", "Input/output error (EIO)")

    with pytest.raises(UserError) as info:
        list(unwrap_worker_errors(iter(DataLoader(Broken(), num_workers=1))))
    assert str(info.value).startswith("cannot read image '/data/cat/1.png': Input/output error (EIO)")
    assert "Traceback" not in str(info.value)


def test_ssl_without_a_clip_cache_skips_and_counts_corrupt_images(capsys, tmp_path):
    """Training and test images that are corrupt: SSL trains (each replaced by the next readable image),
    the evaluator skips them, and the report counts them."""
    root = _folder(tmp_path / "images", per_class=10)
    for name in ("cat/cat_3.png", "fox/fox_7.png"):
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run_dir = tmp_path / "run"
    settings = ["data.holdout_fraction=0.5", "student.arch=zsa_cnn_small", "data.image_size=16",
                "optim.warmup_epochs=0.5", *TINY]
    code, out, err = zsa(capsys, "ssl", "--dataset", "imagefolder", "--data-dir", root, "--labels-per-class", "2",
                         "--run-dir", run_dir, *[x for o in settings for x in ("--set", o)])
    assert code == 0, err
    report = json.loads((run_dir / "report.json").read_text())
    assert report["completed"] and "student" in report
    assert report["corrupt_training_images_skipped"] + report["test_set"]["corrupt_skipped"] == 2
    assert report["test_set"]["size"] == 15


# ============================================================================ class identity of prompt files


def test_a_prompt_file_in_another_order_is_remapped_by_name(capsys, tmp_path, cache_dir, caplog):
    own = json.loads((REPO / "prompts" / "digits.json").read_text())
    reversed_file = tmp_path / "reversed.json"
    reversed_file.write_text(json.dumps({**own, "classes": own["classes"][::-1]}))
    base = ["pseudolabel", "--dataset", "digits", "--cache-dir", cache_dir]
    code, default, err = zsa(capsys, *base, "--out", tmp_path / "default")
    assert code == 0, err
    code, remapped, err = zsa(capsys, *base, "--out", tmp_path / "remapped", "--prompts", reversed_file)
    assert code == 0, err
    assert "another order" in caplog.text and "re-mapped by name" in caplog.text
    precision = re.search(r"precision (\d+\.\d)%", remapped).group(1)
    assert precision == re.search(r"precision (\d+\.\d)%", default).group(1) and float(precision) > 50
    csv_name = "pseudo_labels.csv"
    assert (tmp_path / "default" / csv_name).read_bytes() == (tmp_path / "remapped" / csv_name).read_bytes()
    reports = [json.loads((tmp_path / d / "pseudolabels.json").read_text()) for d in ("default", "remapped")]
    assert [{k: v for k, v in r.items() if k != "sweep_plot"} for r in reports][0] == \
        [{k: v for k, v in r.items() if k != "sweep_plot"} for r in reports][1]


def test_a_prompt_file_with_other_class_names_is_refused_listing_both_sides(capsys, tmp_path, cache_dir):
    own = json.loads((REPO / "prompts" / "digits.json").read_text())
    other = tmp_path / "words.json"
    other.write_text(json.dumps({**own, "classes": ["zero", *own["classes"][1:]]}))
    code, _, err = zsa(capsys, "pseudolabel", "--dataset", "digits", "--cache-dir", cache_dir, "--prompts", other,
                       "--out", tmp_path / "out")
    assert_refused(code, err, "matched by name", "Only in the prompt file: 'zero'", "Only in the dataset: '0'")
    assert not (tmp_path / "out").exists()


# ============================================================================ the hub


def _hub_fails(monkeypatch, error: Exception) -> None:
    import datasets

    def load_dataset(*args, **kwargs):
        raise error

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(sources, "hub_offline", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_a_hub_repo_with_a_loading_script_says_what_to_pass_instead(monkeypatch, capsys):
    _hub_fails(monkeypatch, RuntimeError("Dataset scripts are no longer supported, but found eurosat.py"))
    code, _, err = zsa(capsys, "cache", "--dataset", "eurosat")
    assert_refused(code, err, "still holds a loading script (eurosat.py)", "data.hf_revision=refs/convert/parquet",
                   "data.hf_id=timm/eurosat-rgb", "--data-dir")


def test_a_hub_failure_that_is_not_a_connection_problem_reports_its_real_cause(monkeypatch):
    _hub_fails(monkeypatch, ValueError('Unknown split "test". Should be one of [\'train\', \'validation\'].'))
    with pytest.raises(UserError) as info:
        load_split("cifar10", "test")
    message = str(info.value)
    assert 'ValueError: Unknown split "test"' in message and "data.test_split" in message
    assert "could not download" not in message and "unreachable" not in message


def test_hub_id_and_revision_reach_load_dataset(monkeypatch):
    import datasets

    seen = {}

    def load_dataset(path, name=None, **kwargs):
        seen.update(path=path, revision=kwargs.get("revision"))
        raise ConnectionError("offline")

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(sources, "hub_offline", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = pipeline.resolve_config("eurosat", overrides=["data.hf_id=timm/eurosat-rgb",
                                                           "data.hf_revision=refs/convert/parquet"])
    with pytest.raises(UserError, match="could not download"):
        pipeline.load_table(config, "train")
    assert seen == {"path": "timm/eurosat-rgb", "revision": "refs/convert/parquet"}


def test_the_run_lock_dies_with_its_holder(tmp_path):
    """flock is released by the kernel however the holder ends (here SIGKILL): no stale lock."""
    from zeroshot_adapt.locks import LockedError, exclusive_lock

    lock = tmp_path / "run" / pipeline.RUN_LOCK_NAME
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from zeroshot_adapt.locks import exclusive_lock\n"
         f"with exclusive_lock({str(lock)!r}, what='x'):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"process {holder.pid} on host"):
            with exclusive_lock(lock, what="x"):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with exclusive_lock(lock, what="x"):
        pass
