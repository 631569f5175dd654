"""The training loop: learning, resume == no interruption, multi-process class prior, checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from synthetic import NUM_CLASSES, settings, world

from zeroshot_adapt.train import train

TESTS = Path(__file__).parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(run_dir, stop_after=None, algorithm="debiaspl", **loop):
    student, ema, algo, labeled, unlabeled = world(algorithm)
    accelerator = Accelerator(cpu=True)
    result = train(accelerator=accelerator, student=student, ema=ema, algorithm=algo, labeled=labeled,
                   unlabeled=unlabeled, settings=settings(**loop), num_classes=NUM_CLASSES, run_dir=run_dir,
                   stop_after_steps=stop_after)
    return result, student, ema, algo


def _records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds_per_step"} for line in lines]


def test_resume_equals_uninterrupted(tmp_path):
    full, student_a, ema_a, algo_a = _run(tmp_path / "a")
    assert full.completed and full.step == 6
    # killed after 2 steps (mid-epoch), then after 2 more (an epoch boundary), then to the end
    first, *_ = _run(tmp_path / "b", stop_after=2)
    assert not first.completed and first.step == 2
    second, *_ = _run(tmp_path / "b", stop_after=2)
    assert second.step == 4
    last, student_b, ema_b, algo_b = _run(tmp_path / "b")
    assert last.completed and last.step == 6
    for name, tensor in student_a.state_dict().items():
        assert torch.equal(tensor, student_b.state_dict()[name]), name
    for name, tensor in ema_a.state_dict().items():
        assert torch.equal(tensor, ema_b.state_dict()[name]), name
    prior_a = algo_a.state_dict()["adjuster"]["class_prior"]
    assert torch.equal(prior_a, algo_b.state_dict()["adjuster"]["class_prior"])
    assert not torch.allclose(prior_a, torch.full((NUM_CLASSES,), 1 / NUM_CLASSES))  # it did move
    assert _records(tmp_path / "a") == _records(tmp_path / "b")


def test_resume_with_workers_and_accumulation(tmp_path):
    """Augmentation seeds travel with the items, so worker count does not change the result."""
    _, student_a, *_ = _run(tmp_path / "a", grad_accum=2, num_workers=0)
    _run(tmp_path / "b", stop_after=3, grad_accum=2, num_workers=2)
    _, student_b, *_ = _run(tmp_path / "b", grad_accum=2, num_workers=2)
    for name, tensor in student_a.state_dict().items():
        assert torch.equal(tensor, student_b.state_dict()[name]), name


def test_epoch_records_hold_the_pseudo_label_statistics(tmp_path):
    _run(tmp_path)
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        for key in ("loss", "loss_x", "loss_u", "mask_ratio", "prior_entropy", "pseudo_label_counts", "lr"):
            assert key in record, key
        assert len(record["pseudo_label_counts"]) == NUM_CLASSES
        # 3 steps x 8 unlabeled images, all pseudo-labeled (unmasked counts)
        assert sum(record["pseudo_label_counts_unmasked"]) == 3 * 8
        assert 0 < record["prior_entropy"] <= np.log(NUM_CLASSES) + 1e-6


def test_student_learns_the_colours(tmp_path):
    from synthetic import colour_table, weak

    result, student, ema, _ = _run(tmp_path, total_steps=30, steps_per_epoch=10, lr=0.1)
    table = colour_table(48, seed=5)
    images = torch.stack([weak(table.load_image(i)) for i in range(len(table))])
    student.eval()
    with torch.no_grad():
        accuracy = (student(images).argmax(1).numpy() == table.labels).mean()
    assert accuracy >= 0.9, accuracy


def test_two_processes_keep_one_class_prior(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()),
               str(TESTS / "helpers" / "ddp_prior.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    p0, p1 = np.load(tmp_path / "prior_rank0.npy"), np.load(tmp_path / "prior_rank1.npy")
    np.testing.assert_array_equal(p0, p1)
    assert not np.allclose(p0, 1 / NUM_CLASSES)
    s0, s1 = torch.load(tmp_path / "student_rank0.pt"), torch.load(tmp_path / "student_rank1.pt")
    for name in s0:  # DDP keeps the replicas' parameters identical (BN buffers are per-rank between broadcasts)
        assert torch.equal(s0[name], s1[name]), name


# ----------------------------------------------------------------------------- guards, checkpoints, corrupt images


class _Poisoned:
    """Wraps an algorithm: at optimizer step `at` (1-based) it either returns a NaN loss or, with
    `buffers`, poisons the student's BatchNorm running mean (the loss stays finite: train-mode BN uses
    batch statistics) — the "NaN weights with nothing to evaluate" case."""

    def __init__(self, inner, at: int, buffers: bool = False) -> None:
        self.inner, self.at, self.buffers, self.calls = inner, at, buffers, 0

    def step(self, batch, *, student, teacher):
        self.calls += 1
        out = self.inner.step(batch, student=student, teacher=teacher)
        if self.calls == self.at:
            if self.buffers:
                student.features[1].running_mean.data.fill_(float("nan"))
            else:
                out.loss = out.loss * float("nan")
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _run_with(run_dir, algorithm_wrapper=None, evaluate=None, stop_after=None, labeled_table=None, **loop):
    student, ema, algo, labeled, unlabeled = world("debiaspl")
    if algorithm_wrapper is not None:
        algo = algorithm_wrapper(algo)
    return train(accelerator=Accelerator(cpu=True), student=student, ema=ema, algorithm=algo, labeled=labeled,
                 unlabeled=unlabeled, settings=settings(**loop), num_classes=NUM_CLASSES, run_dir=run_dir,
                 evaluate=evaluate, stop_after_steps=stop_after, run_config={"seed": 1}), student


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    import pytest

    from zeroshot_adapt.errors import UserError
    from zeroshot_adapt.train import read_checkpoint

    checkpoint = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(UserError) as info:  # checkpoints every 2 steps; NaN at step 5, caught at step 6's save
        _run_with(tmp_path, lambda a: _Poisoned(a, at=5))
    message = str(info.value)
    assert "loss became NaN or inf at optimizer step 5 of 6" in message
    assert "learning rate" in message and "last good checkpoint (step 4)" in message
    state = read_checkpoint(checkpoint)
    assert state["step"] == 4
    assert all(bool(torch.isfinite(t).all()) for t in state["student"].values() if t.is_floating_point())
    assert len(_records(tmp_path)) == 1  # epoch 1 only: nothing of the bad epoch was recorded


def test_nan_weights_with_nothing_to_evaluate_do_not_succeed(tmp_path):
    import pytest

    from zeroshot_adapt.errors import UserError
    from zeroshot_adapt.train import read_checkpoint

    with pytest.raises(UserError, match=r"weights became NaN or inf by optimizer step 6 .*running_mean"):
        _run_with(tmp_path, lambda a: _Poisoned(a, at=6, buffers=True))  # the last step: its loss is finite
    assert read_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4


def test_checkpoints_hold_plain_data_and_the_run_config(tmp_path):
    _run_with(tmp_path, stop_after=2)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"] == {"seed": 1} and state["step"] == 2 and state["format"] == 2
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}


def test_evaluation_changes_nothing(tmp_path):
    """Evaluation (which here draws from every global RNG, like a DataLoader does) leaves the training
    stream untouched: same weights with and without it, whatever epochs it runs at."""
    import random

    def evaluate(model):
        random.random()
        np.random.rand()
        torch.rand(3)
        return {"top1": 0.5}

    _, plain = _run_with(tmp_path / "plain")
    _, evaluated = _run_with(tmp_path / "evaluated", evaluate=evaluate)
    _, once = _run_with(tmp_path / "once", evaluate=evaluate, eval_every_epochs=2)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, evaluated.state_dict()[name]), name
        assert torch.equal(tensor, once.state_dict()[name]), name
    assert [("student/top1" in r) for r in _records(tmp_path / "once")] == [False, True]


def test_an_epoch_is_checkpointed_before_its_evaluation_and_resume_finishes_it_once(tmp_path):
    import pytest

    from zeroshot_adapt.train import read_checkpoint

    calls = []

    def evaluate(model):
        calls.append(1)
        if len(calls) == 3:  # epoch 2's first evaluation: the process dies here
            raise KeyboardInterrupt
        return {"top1": 0.25}

    whole, _ = _run_with(tmp_path / "whole", evaluate=lambda m: {"top1": 0.25})
    with pytest.raises(KeyboardInterrupt):
        _run_with(tmp_path / "crash", evaluate=evaluate)
    state = read_checkpoint(tmp_path / "crash" / "checkpoints" / "last.pt")
    assert state["step"] == 6 and state["pending_record"]["epoch"] == 2  # saved before the evaluation
    resumed, _ = _run_with(tmp_path / "crash", evaluate=evaluate)
    assert resumed.completed and resumed.final_evaluation["student"] == {"top1": 0.25}
    assert _records(tmp_path / "crash") == _records(tmp_path / "whole")  # two lines, none repeated
    assert read_checkpoint(tmp_path / "crash" / "checkpoints" / "last.pt")["pending_record"] is None


def test_resume_rewrites_metrics_from_the_checkpoint(tmp_path):
    """Lines of epochs the checkpoint does not hold (a crash between the line and the checkpoint, or a
    torn line) are dropped on resume; the finished file equals an uninterrupted run's."""
    _run_with(tmp_path / "whole")
    _run_with(tmp_path / "b", stop_after=4)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "step": 6, "lo')  # a torn, duplicate line
    _run_with(tmp_path / "b")
    assert _records(tmp_path / "b") == _records(tmp_path / "whole")


def _corrupt_world(bad: set[int]):
    from synthetic import colour_table

    from zeroshot_adapt.data.sources import CorruptImageError

    table = colour_table(48)

    def load(i, inner=table.load_image):
        if i in bad:
            raise CorruptImageError(f"img{i:03d}.png", "truncated")
        return inner(i)

    return table.__class__(dataset="colours", split="train", keys=table.keys, labels=table.labels,
                           class_names=table.class_names, load_image=load, fingerprint=table.fingerprint)


def test_training_views_replace_a_corrupt_image_by_the_next_readable_one():
    from synthetic import strong, weak

    from zeroshot_adapt.data.datasets import LabeledViews, UnlabeledViews

    table = _corrupt_world({3, 4})
    labeled = LabeledViews(table, [2, 3, 4, 5], [9, 8, 7, 6], weak)
    item = labeled[1]  # table rows 3 and 4 are corrupt: position 3 (row 5) stands in, with row 5's target
    assert (item["position"], item["corrupt_skipped"], item["target"]) == (3, 2, 6)
    assert labeled[0]["corrupt_skipped"] == 0
    unlabeled = UnlabeledViews(table, [4, 7], weak, strong, clip_label=np.array([1, 2]))
    item = unlabeled[0]
    assert (item["index"], item["corrupt_skipped"], item["clip_label"], item["true_label"]) == (1, 1, 2, 7 % 4)


def test_corrupt_training_images_are_counted_once_and_resume_stays_exact(tmp_path, caplog):
    from synthetic import strong, weak

    from zeroshot_adapt.data.datasets import LabeledViews, UnlabeledViews

    def run(run_dir, stop_after=None, workers=0):
        student, ema, algo, *_ = world("debiaspl")
        table = _corrupt_world({1, 6, 7})
        labeled = LabeledViews(table, np.arange(24), np.asarray(table.labels)[:24], weak)
        unlabeled = UnlabeledViews(table, np.arange(48), weak, strong)
        result = train(accelerator=Accelerator(cpu=True), student=student, ema=ema, algorithm=algo, labeled=labeled,
                       unlabeled=unlabeled, settings=settings(num_workers=workers, total_steps=12,
                                                              steps_per_epoch=6),
                       num_classes=NUM_CLASSES, run_dir=run_dir, stop_after_steps=stop_after)
        return result, student

    _, whole = run(tmp_path / "a")
    logged = [r.getMessage() for r in caplog.records if "corrupt image skipped in training" in r.getMessage()]
    assert sorted(m.rsplit(" ", 1)[-1] for m in logged) == ["img001", "img006", "img007"]  # each once
    run(tmp_path / "b", stop_after=5, workers=2)
    _, resumed = run(tmp_path / "b")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    records = _records(tmp_path / "a")
    assert records == _records(tmp_path / "b")
    assert records[-1]["corrupt_images_skipped"] == 3  # 12 steps x (4 + 8) draws meet every one of them
