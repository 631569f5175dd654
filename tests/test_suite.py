"""`zsa suite`: a grid over digits + two local folders (an image folder and a saved HF dataset) + an evaluation-only
subset + a broken dataset, x {zeroshot, fixmatch, debiaspl} x seeds {0, 1}, interrupted after a few cells and
resumed; tables, records (read the way CLIP_benchmark's build step reads them), plots, failures, exit codes."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import build_hf_dataset, write_image_folder
from zeroshot_adapt import suite
from zeroshot_adapt.cli import main
from zeroshot_adapt.data.registry import load_split
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.reports import records as rec

METHODS = ["zeroshot", "fixmatch", "debiaspl"]
SEEDS = [0, 1]
TINY = ["student.arch=zsa_cnn_small", "data.image_size=16", "optim.epochs=1", "optim.steps_per_epoch=2",
        "optim.batch_size=4", "optim.mu=2", "optim.warmup_epochs=0", "data.num_workers=0", "algorithm.threshold=0.5",
        "pseudo.select=topk", "pseudo.per_class=2"]  # the tiny teacher is unsure of the 8 px pets: none at 0.95
TEACHER = ["teacher.model=zsa-tiny-digits", "teacher.pretrained=bundled"]
STOP_AFTER = 7  # cells finished (ok or failed) before the simulated kill
DATASETS = ["digits", "pets", "hfpets", "pets-sub", "broken"]


class Killed(KeyboardInterrupt):
    """What Ctrl-C / a kill looks like to the suite loop."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    pets = write_image_folder(root / "pets", per_class=10)  # cat / dog / fox, 8 px
    sub = write_image_folder(root / "pets_sub", classes=("cat", "fox"), per_class=3, seed=5)
    from datasets import DatasetDict

    hf = root / "hfpets"
    DatasetDict({"train": build_hf_dataset(24, seed=1), "test": build_hf_dataset(9, seed=2)}).save_to_disk(str(hf))
    wrong = root / "ten_classes.json"
    wrong.write_text(json.dumps({"classes": [str(i) for i in range(10)], "templates": ["a photo of {c}."]}))
    datasets_file = root / "datasets.yaml"
    datasets_file.write_text(yaml.safe_dump([
        "digits",
        {"name": "pets", "dataset": "imagefolder", "data_dir": str(pets)},
        {"name": "hfpets", "dataset": "imagefolder", "data_dir": "hfpets"},  # relative to the file
        {"name": "pets-sub", "dataset": "imagefolder", "data_dir": str(sub), "student_from": "pets"},
        {"name": "broken", "dataset": "imagefolder", "data_dir": str(pets), "prompts": str(wrong)},
    ]))
    out = root / "out"
    settings = suite.SuiteSettings(out_dir=out, overrides=(*TEACHER, f"teacher.cache_dir={root / 'cache'}", *TINY))
    entries = suite.dataset_entries([str(datasets_file)])

    done: list[tuple[str, str]] = []

    def kill_after_some(cell, status):
        done.append((cell.label, status))
        if len(done) == STOP_AFTER:
            raise Killed

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: one thread is faster than contending
    try:
        with pytest.raises(Killed):
            suite.run_suite(entries, METHODS, SEEDS, settings, on_cell_done=kill_after_some)
        first = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / suite.RECORDS_DIR).rglob("*.json")}
        partial_csv = (out / suite.RESULTS_CSV).read_text()
        resumed: list[tuple[str, str]] = []
        summary = suite.run_suite(entries, METHODS, SEEDS, settings,
                                  on_cell_done=lambda c, s: resumed.append((c.label, s)))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "out": out, "datasets_file": datasets_file, "settings": settings, "entries": entries,
            "first_done": done, "first_records": first, "partial_csv": partial_csv, "resumed": resumed,
            "summary": summary}


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / suite.RESULTS_CSV).read_text().splitlines()))


def test_the_grid_has_one_cell_per_seed_for_training_and_one_for_zeroshot(world):
    cells = world["summary"].cells
    assert len(cells) == len(DATASETS) * (1 + 2 * len(SEEDS))
    assert [c.label for c in cells[:5]] == ["digits/zeroshot", "digits/fixmatch/seed0", "digits/fixmatch/seed1",
                                            "digits/debiaspl/seed0", "digits/debiaspl/seed1"]


def test_a_killed_suite_resumes_without_recomputing_finished_cells(world):
    first_ok = [label for label, status in world["first_done"] if status == "ok"]
    assert len(world["first_done"]) == STOP_AFTER == len(first_ok)  # digits (5 cells) and 2 of pets
    assert len(world["first_records"]) == len(first_ok)
    assert "pending" in world["partial_csv"]  # the interrupted run still wrote its (partial) table
    skipped = [label for label, status in world["resumed"] if status == "skipped"]
    assert skipped == first_ok  # exactly the finished cells, and none of them ran again ...
    for path, (mtime, content) in world["first_records"].items():  # ... their records are untouched
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
    ran = {label for label, status in world["resumed"] if status != "skipped"}
    assert ran == {c.label for c in world["summary"].cells} - set(first_ok)
    assert set(world["summary"].ran) | set(world["summary"].failed) == ran


def test_the_table_is_complete_and_a_failing_dataset_does_not_stop_the_others(world):
    out, rows = world["out"], _rows(world["out"])
    assert len(rows) == len(world["summary"].cells)
    by_status = {(r["dataset"], r["method"], r["seed"]): r for r in rows}
    for (dataset, _, _), row in by_status.items():
        assert row["status"] == ("failed" if dataset == "broken" else "ok"), row
        if dataset != "broken":
            assert 0.0 <= float(row["acc1"]) <= 1.0 and row["record"]
    broken = [r for r in rows if r["dataset"] == "broken"]
    assert len(broken) == 5 and all("do not match those of dataset" in r["error"] for r in broken)
    table = (out / suite.RESULTS_MD).read_text()
    assert "| dataset | zeroshot | fixmatch | debiaspl |" in table
    assert "| broken | failed | failed | failed |" in table
    assert "- broken / fixmatch / seed 0: the classes of prompt file" in table
    for dataset in ("digits", "pets", "hfpets", "pets-sub"):
        line = next(line for line in table.splitlines() if line.startswith(f"| {dataset} |"))
        assert line.count("**") >= 2, line  # the best method of each dataset is bold
        assert "±" in line  # the training methods: mean ± std over 2 seeds
    assert (out / suite.FIGURE9).is_file()
    for dataset in ("digits", "pets", "hfpets", "pets-sub"):
        assert (out / suite.PLOTS_DIR / f"imbalance_{dataset}.png").is_file()
    assert not (out / suite.PLOTS_DIR / "imbalance_broken.png").exists()


def test_mean_and_std_in_the_table_are_those_of_the_records(world):
    out = world["out"]
    values = [100 * json.loads((out / "records" / "digits" / f"debiaspl-seed{s}.json").read_text())["metrics"]["acc1"]
              for s in SEEDS]
    mean = sum(values) / 2
    std = abs(values[0] - values[1]) / 2 ** 0.5  # sample std of two values
    assert f"{mean:.2f} ± {std:.2f}" in (out / suite.RESULTS_MD).read_text()


def test_every_record_has_clip_benchmark_fields_and_survives_its_build_step(world):
    import pandas as pd

    paths = sorted((world["out"] / suite.RECORDS_DIR).rglob("*.json"))
    assert len(paths) == 20  # 4 working datasets x 5 cells
    rows = []
    for path in paths:
        data = json.load(open(path))  # what CLIP_benchmark's build does: json.load, then flatten
        assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(data)
        assert data["task"] == "zeroshot_classification" and data["language"] == "en"
        assert {"acc1", "acc5", "mean_per_class_recall"} <= set(data["metrics"])
        assert {"method", "student", "seed", "tau_clip", "recipe", "split_protocol", "dataset_fingerprint"} <= set(data)
        row = {}
        row.update(data["metrics"])
        row.update(data)
        del row["metrics"]
        rows.append(row)
        assert rec.flatten_record(data) == {**row, "model_fullname": f"{data['model']} {data['pretrained']}"}
    frame = pd.DataFrame(rows)
    frame["model_fullname"] = frame.apply(lambda s: s["model"] + " " + s["pretrained"], axis=1)
    assert set(frame["model_fullname"]) == {"zsa-tiny-digits bundled"}
    assert set(frame["dataset"]) == {"digits", "pets", "hfpets", "pets-sub"}
    assert frame["acc1"].between(0, 1).all() and frame["acc5"].isna().all() == False  # noqa: E712
    zeroshot = frame[frame["method"] == "zeroshot"]
    assert zeroshot["seed"].isna().all() and zeroshot["student"].isna().all()
    trained = frame[frame["method"] != "zeroshot"]
    assert set(trained["student"]) == {"zsa_cnn_small"} and set(trained["seed"]) == {0, 1}
    assert (trained["tau_clip"] == 0.95).all()
    pd.json_normalize([json.load(open(p)) for p in paths])  # the notebooks' other reader: nested fields flatten


def test_records_pin_the_protocol_and_the_content_of_the_scored_split(world):
    out = world["out"]
    record = json.loads((out / "records" / "hfpets" / "fixmatch-seed1.json").read_text())
    table = load_split("imagefolder", "test", data_dir=str(world["root"] / "hfpets"))
    assert record["dataset_fingerprint"]["test"] == table.fingerprint
    assert record["split_protocol"]["num_test"] == 9 == sum(record["prediction_counts"])
    assert record["recipe"]["resolved"]["algorithm"]["name"] == "fixmatch" and record["recipe"]["resolved"]["seed"] == 1
    assert record["recipe"]["resolved"]["data"]["data_dir"] == str(world["root"] / "hfpets")
    digits = json.loads((out / "records" / "digits" / "zeroshot.json").read_text())
    from zeroshot_adapt import pipeline

    config = pipeline.resolve_config("digits", overrides=list(world["settings"].overrides))
    assert digits["metrics"]["acc1"] == pipeline.teacher_predictions(config, "test").zeroshot_report()["top1"]


def test_evaluation_only_cells_score_the_source_students_on_the_subset(world):
    out = world["out"]
    record = json.loads((out / "records" / "pets-sub" / "debiaspl-seed0.json").read_text())
    assert record["student_from"] == "pets"
    assert record["class_mapping"]["dataset_classes"] == 2 and record["class_mapping"]["model_outputs"] == 3
    assert record["split_protocol"]["train_is_test"] and sum(record["prediction_counts"]) == 6  # the whole folder
    assert not (out / "runs" / "pets-sub").exists()  # nothing was trained on the subset


def test_rerunning_through_the_cli_retries_only_failed_cells_and_exits_1(world, capsys):
    out, root = world["out"], world["root"]
    before = {p: p.stat().st_mtime_ns for p in (out / suite.RECORDS_DIR).rglob("*.json")}
    argv = ["suite", "--datasets", str(world["datasets_file"]), "--methods", *METHODS, "--seeds", "0", "1",
            "--out", str(out), "--model", "zsa-tiny-digits", "--pretrained", "bundled",
            "--cache-dir", str(root / "cache"), *[arg for item in TINY for arg in ("--set", item)]]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "0 cells run, 20 finished before, 5 failed" in printed and "| broken | failed |" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / suite.RECORDS_DIR).rglob("*.json")} == before


def test_a_suite_folder_refuses_other_settings_but_not_another_cache_dir(world):
    settings = world["settings"]
    changed = suite.SuiteSettings(out_dir=settings.out_dir, overrides=(*settings.overrides, "algorithm.tau=0.1"))
    with pytest.raises(UserError, match="other settings \\(overrides changed\\)"):
        suite.run_suite(world["entries"][:1], ["zeroshot"], [0], changed)
    moved = tuple(o for o in settings.overrides if not o.startswith("teacher.cache_dir"))
    moved += (f"teacher.cache_dir={world['root'] / 'elsewhere'}", "data.num_workers=1")
    summary = suite.run_suite(world["entries"][:1], ["zeroshot"], [0],
                              suite.SuiteSettings(settings.out_dir, None, moved))
    assert summary.skipped == ["digits/zeroshot"]


# --------------------------------------------------------------------------------- parsing, fast checks


def test_dataset_items_and_files(tmp_path, image_folder_tree):
    assert suite.parse_dataset_item("vtab/eurosat") == suite.DatasetEntry("vtab/eurosat", "vtab/eurosat")
    assert suite.parse_dataset_item(f"imagefolder={image_folder_tree}").name == image_folder_tree.name
    assert suite.parse_dataset_item("mnist=/data/mnist").data_dir == "/data/mnist"
    with pytest.raises(UserError, match="not DATASET or DATASET=PATH"):
        suite.parse_dataset_item("mnist=")
    (tmp_path / "list.txt").write_text(
        f"# CLIP_benchmark style\nimagenet1k\ncifar10  # small\nimagefolder={image_folder_tree}\n"
    )
    (tmp_path / "list.csv").write_text(f"name,dataset,data_dir,overrides\nmine,imagefolder,{image_folder_tree},"
                                       "optim.epochs=30;algorithm.tau=0.2\nflowers,flowers,,\n")
    txt = suite.dataset_entries([str(tmp_path / "list.txt")])
    assert [e.name for e in txt] == ["imagenet1k", "cifar10", image_folder_tree.name]
    from_csv = suite.dataset_entries([str(tmp_path / "list.csv")])
    assert from_csv[0] == suite.DatasetEntry("mine", "imagefolder", str(image_folder_tree),
                                             overrides=("optim.epochs=30", "algorithm.tau=0.2"))
    assert from_csv[1] == suite.DatasetEntry("flowers", "flowers")
    config = suite.entry_config(from_csv[0], suite.SuiteSettings(tmp_path))
    assert (config.optim.epochs, config.algorithm.tau) == (30, 0.2)


@pytest.mark.parametrize(("items", "message"), [
    (["digits", "digits"], "two datasets are named 'digits'"),
    (["nosuch"], "unknown dataset 'nosuch'; valid: "),
    (["mnist=/no/such/dir"], "data_dir '/no/such/dir' of dataset 'mnist' does not exist"),
    (["missing.yaml"], "datasets file 'missing.yaml' does not exist"),
])
def test_bad_dataset_lists_are_user_errors(items, message):
    with pytest.raises(UserError, match=message):
        suite.dataset_entries(items)


def test_student_from_must_name_an_earlier_dataset(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump([{"dataset": "imagenet-r", "student_from": "imagenet"}, "imagenet"]))
    with pytest.raises(UserError, match="student_from='imagenet' must name a dataset listed before it"):
        suite.dataset_entries([str(path)])


def test_methods_resolve_to_one_kind_each_and_unknown_names_list_the_valid_ones():
    from zeroshot_adapt.algorithms import ALGORITHMS

    assert suite.method_kind("zeroshot").name == "zeroshot" and not suite.method_kind("zeroshot").seeded
    for name in ALGORITHMS.names():
        assert suite.method_kind(name).name == "train"
    assert set(suite.METHOD_KINDS.names()) == {"zeroshot", "train", "transduct"}
    for name in ("transclip", "sinkhorn", "label-propagation,sinkhorn", "zeroshot,debias"):
        assert suite.method_kind(name).name == "transduct" and not suite.method_kind(name).seeded
    for bad in ("label-propagation,nonsense", "fixmatch,sinkhorn", "nonsense"):
        with pytest.raises(UserError) as error:
            suite.method_kind(bad)
        assert f"unknown suite method {bad!r}; valid: zeroshot, " in str(error.value)
        assert all(name in str(error.value) for name in [*ALGORITHMS.names(), "transclip", "label-propagation"])
    with pytest.raises(UserError, match="methods given twice: fixmatch"):
        suite.plan_cells([suite.DatasetEntry("digits", "digits")], ["fixmatch", "fixmatch"], [0])


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    argv = ["suite", "--datasets", "digits", "--methods", "zeroshot", "transclap", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown suite method 'transclap'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["suite", "--datasets", "digits", "--methods", "zeroshot", "--out", str(tmp_path / "o"),
                 "--set", "optim.lr=-1"]) == 2
    assert "dataset 'digits': invalid configuration" in capsys.readouterr().err


def test_results_table_marks_ties_failures_and_pending():
    rows = [
        rec.ResultRow("a", "m1", 0, "ok", {"acc1": 0.5}),
        rec.ResultRow("a", "m1", 1, "failed", error="boom\nmore"),
        rec.ResultRow("a", "m2", None, "ok", {"acc1": 0.5}),
        rec.ResultRow("b", "m1", 0, "pending"),
        rec.ResultRow("b", "m2", None, "ok", {"acc1": None}),
    ]
    table = rec.markdown_table(rows, ["a", "b"], ["m1", "m2"])
    assert "| a | **50.00 (1 failed)** | **50.00** |" in table
    assert "| b | — | n/a |" in table
    assert rec.failure_lines(rows) == ["- a / m1 / seed 1: boom"]
    assert os.linesep not in rec.results_csv(rows).replace("\n", "")


def test_a_transduct_chain_is_one_deterministic_cell_scored_like_zsa_transduct(tmp_path):
    from zeroshot_adapt import pipeline

    chain = "label-propagation,sinkhorn"
    overrides = (*TEACHER, f"teacher.cache_dir={tmp_path / 'cache'}", *TINY)
    settings = suite.SuiteSettings(out_dir=tmp_path / "out", overrides=overrides)
    summary = suite.run_suite(suite.dataset_entries(["digits"]), ["zeroshot", chain], [0, 1], settings)
    assert [c.label for c in summary.cells] == ["digits/zeroshot", f"digits/{chain}"]
    record = json.loads(next((tmp_path / "out" / suite.RECORDS_DIR).rglob("*label-propagation*.json")).read_text())
    config = pipeline.resolve_config("digits", overrides=[*overrides, f"transduct.method={chain}"])
    report = pipeline.transduct_report(config, tmp_path / "transduct", splits=("test",))
    assert record["metrics"]["acc1"] == pytest.approx(report["test"]["top1"])
    assert record["seed"] is None


def test_the_recipe_flag_reaches_every_cell(tmp_path, monkeypatch):
    seen = []

    def record_config(context):
        seen.append((context.config.recipe, context.config.algorithm.multiview, context.config.algorithm.lambda_cld))
        return suite.CellResult(metrics={"acc1": 0.5, "acc5": None, "mean_per_class_recall": None})

    from dataclasses import replace as dc_replace

    kind = suite.METHOD_KINDS.get("zeroshot")
    monkeypatch.setitem(suite.METHOD_KINDS._items, "zeroshot", dc_replace(kind, run=record_config))
    argv = ["suite", "--datasets", "digits", "--methods", "zeroshot", "--out", str(tmp_path / "o"),
            "--recipe", "paper", "--set", f"teacher.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 0
    assert seen == [("paper", True, 0.3)]
