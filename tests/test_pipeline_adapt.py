"""`zsa adapt` as a user drives it: the resolved config is saved, a re-run resumes, a changed config is refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml

from zeroshot_adapt import pipeline
from zeroshot_adapt.cli import main
from zeroshot_adapt.errors import UserError

TINY = ["optim.epochs=2", "optim.steps_per_epoch=4", "data.num_workers=0", "optim.batch_size=8", "optim.mu=2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _config(cache_dir, run_dir, *extra):
    config = pipeline.resolve_config("digits", overrides=[f"teacher.cache_dir={cache_dir}", *TINY, *extra])
    return replace(config, run_dir=str(run_dir))


def test_rerun_resumes_to_the_same_result(cache_dir, tmp_path):
    whole = pipeline.adapt(_config(cache_dir, tmp_path / "whole"))
    first = pipeline.adapt(_config(cache_dir, tmp_path / "split"), stop_after_steps=3)
    assert not first["completed"] and first["step"] == 3
    second = pipeline.adapt(_config(cache_dir, tmp_path / "split"))
    assert second["completed"] and second["step"] == whole["step"] == 8
    assert second["student"]["top1"] == whole["student"]["top1"]
    a, b = torch.load(tmp_path / "whole" / "student.pt"), torch.load(tmp_path / "split" / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())
    assert saved["optim"]["steps_per_epoch"] == 4 and saved["data"]["dataset"] == "digits"


def test_resuming_with_a_different_config_is_refused(cache_dir, tmp_path):
    pipeline.adapt(_config(cache_dir, tmp_path), stop_after_steps=2)
    with pytest.raises(UserError, match="algorithm.tau: 0.5 in the checkpoint, 0.1 now"):
        pipeline.adapt(_config(cache_dir, tmp_path, "algorithm.tau=0.1"))


def test_yaml_config_and_set_overrides_through_the_cli(cache_dir, tmp_path, capsys):
    config_file = tmp_path / "exp.yaml"
    config_file.write_text(yaml.safe_dump({"algorithm": {"name": "fixmatch", "threshold": 0.9},
                                           "optim": {"epochs": 1, "steps_per_epoch": 3}}))
    run_dir = tmp_path / "run"
    argv = ["adapt", "--dataset", "digits", "--config", str(config_file), "--cache-dir", str(cache_dir),
            "--run-dir", str(run_dir), "--set", "algorithm.threshold=0.7", "--set", "data.num_workers=0",
            "--set", "optim.batch_size=8", "--set", "optim.mu=2"]
    assert main(argv) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["algorithm"]["name"] == "fixmatch" and saved["algorithm"]["threshold"] == 0.7  # --set wins
    assert saved["student"]["arch"] == "zsa_cnn_small"  # the dataset preset still applies
    report = json.loads((run_dir / "report.json").read_text())
    assert report["total_steps"] == 3 and {"student", "ema", "clip_zeroshot"} <= set(report)
    assert "CLIP zero-shot top-1" in capsys.readouterr().out
    for name in ("metrics.jsonl", "confusion_student.png", "pseudo_label_distribution.png", "student.pt"):
        assert (run_dir / name).is_file(), name


def test_ctrl_c_writes_a_checkpoint_and_exits_130(cache_dir, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "zeroshot_adapt.cli", "adapt", "--dataset", "digits", "--cache-dir", str(cache_dir),
            "--run-dir", str(run_dir), "--set", "optim.epochs=1", "--set", "optim.steps_per_epoch=5000",
            "--set", "data.num_workers=0", "--set", "optim.batch_size=8", "--set", "optim.mu=2",
            "--set", "checkpoint_every_steps=1000"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ))
        deadline = time.time() + 240
        while time.time() < deadline and max(map(int, re.findall(r"(\d+)/5000", log.read_text())), default=0) < 3:
            time.sleep(0.2)  # until a few steps are done
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log.read_text()[-2000:]
    assert "interrupted: re-run the same command to resume" in out
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 3 <= state["step"] < 5000
    assert not (run_dir / "report.json").exists() or not json.loads((run_dir / "report.json").read_text())["completed"]
