"""The device input pipeline on CPU: the same per-item parameters as the CPU pipeline, the recipe's statistics,
tensor ops that do what the PIL ops do, skip-and-count decoding, bit-exact resume, worker planning, launch."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from synthetic import COLOURS, NUM_CLASSES, TinyNet

from zeroshot_adapt.algorithms import ALGORITHMS
from zeroshot_adapt.config import AlgorithmConfig
from zeroshot_adapt.data import device, transforms, workers
from zeroshot_adapt.data.augment_ops import (
    IMAGENET_POOL,
    PIL_OPS,
    TENSOR_OPS,
    BatchParams,
    op_argument,
    recipe_for,
    render_batch,
    render_pil,
    sample_view,
)
from zeroshot_adapt.data.base import SampleTable, fingerprint_of
from zeroshot_adapt.data.datasets import LabeledViews, UnlabeledViews
from zeroshot_adapt.data.device import (
    DeviceViews,
    EncodedLabeledViews,
    EncodedUnlabeledViews,
    Prefetcher,
    TensorPreprocess,
    decode_images,
    encode_source,
)
from zeroshot_adapt.data.sampling import SeededItems
from zeroshot_adapt.data.sources import FileImageLoader
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.launch import check_launch
from zeroshot_adapt.models.student import EmanTeacher
from zeroshot_adapt.train import train

REPO = Path(__file__).resolve().parents[1]


def smooth_image(seed: int, height: int = 40, width: int = 48, colour: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W, 3]: a colour plus gradients and mild noise (JPEG-friendly, every op acts on it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 3.0, y * 3.5, (x + y) * 1.5], -1) + (40 if colour is None else colour * 0.6)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_table(root: Path, n: int = 24, size: tuple[int, int] = (40, 48)) -> SampleTable:
    """n JPEG files of colour-coded images (label = colour), loaded by the file loader."""
    root.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n) % NUM_CLASSES
    paths = []
    for i, label in enumerate(labels):
        path = root / f"img{i:03d}.jpg"
        path.write_bytes(jpeg_bytes(smooth_image(i, *size, colour=COLOURS[label])))
        paths.append(str(path))
    keys = [Path(p).name for p in paths]
    return SampleTable("jpegs", "train", keys, labels.astype(np.int64), ["red", "green", "blue", "black"],
                       FileImageLoader(paths), fingerprint_of(keys))


@pytest.fixture
def table(tmp_path) -> SampleTable:
    return jpeg_table(tmp_path / "jpegs")


# ------------------------------------------------------------------------------------------ parameters


def test_both_pipelines_draw_identical_parameters_per_item(table, monkeypatch):
    """CPU views (PIL, in workers) and the device items draw the same ViewParams from each item's seed, in the
    same order (weak views, then strong views), for both recipes and multi-view."""
    recorded: list = []
    original = transforms.sample_view

    def recording(*args, **kwargs):
        recorded.append(original(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(transforms, "sample_view", recording)
    for size in (32, 96):
        views = transforms.build_transforms(size)
        cpu = SeededItems(UnlabeledViews(table, np.arange(len(table)), views.weak, views.strong, num_views=2))
        dev = SeededItems(EncodedUnlabeledViews(table, np.arange(len(table)), views.spec, num_views=2))
        cpu_lab = SeededItems(LabeledViews(table, [3, 5], [0, 1], views.weak))
        dev_lab = SeededItems(EncodedLabeledViews(table, [3, 5], [0, 1], views.spec))
        for position, seed in [(0, 11), (5, 12345), (23, 2**31 - 2)]:
            recorded.clear()
            cpu[(position, seed)]
            item = dev[(position, seed)]
            assert recorded == item["weak"] + item["strong"], (size, position)
            assert any(p.ops for p in recorded)  # strong views drew ops
            recorded.clear()
            cpu_lab[(position % 2, seed)]
            assert recorded == [dev_lab[(position % 2, seed)]["weak"]]


def test_device_views_have_the_recipe_statistics(table):
    """Parameters drawn by the device pipeline's datasets: RandomResizedCrop's area and aspect ranges, flip rate,
    uniform op choice, magnitudes 1..9, every op applied (imagenet); p = 0.5 and Cutout (small)."""
    for size, name in ((96, "imagenet"), (32, "small")):
        spec = transforms.build_transforms(size).spec
        dataset = SeededItems(EncodedUnlabeledViews(table, np.arange(len(table)), spec))
        items = [dataset[(i % len(table), seed)] for i, seed in enumerate(range(1500))]
        weak = [item["weak"][0] for item in items]
        strong = [item["strong"][0] for item in items]
        height, width = 40, 48
        if name == "imagenet":
            area = np.array([p.crop[2] * p.crop[3] / (height * width) for p in weak])
            aspect = np.array([p.crop[3] / p.crop[2] for p in weak])
            assert area.min() >= 0.08 * 0.8 and area.max() <= 1.0  # (integer rounding of tiny crops)
            assert np.quantile(area, 0.1) < 0.25 and np.quantile(area, 0.9) > 0.75
            assert aspect.min() >= 0.75 * 0.85 and aspect.max() <= 4 / 3 * 1.15
            assert all(p.applied == (True, True) and p.cutout is None for p in strong)
        else:
            assert all(p.crop == (0, 0, height, width) for p in weak)
            shifts = np.array([p.shift for p in weak])
            assert shifts.min() == 0 and shifts.max() == 2 * spec.pad
            applied = np.array([p.applied for p in strong])
            assert abs(applied.mean() - 0.5) < 0.03 and all(p.cutout is not None for p in strong)
        assert abs(np.mean([p.flip for p in weak + strong]) - 0.5) < 0.03
        ops = np.array([op for p in strong for op in p.ops])
        counts = np.bincount(ops, minlength=len(spec.pool))
        expected = len(ops) / len(spec.pool)
        assert float(((counts - expected) ** 2 / expected).sum()) < 37.7, counts  # chi-square, p = 0.001
        assert set(m for p in strong for m in p.magnitudes) == set(range(1, 10))


# ------------------------------------------------------------------------------------------ executors


@pytest.mark.parametrize("spec", IMAGENET_POOL, ids=lambda spec: spec.name)
def test_each_tensor_op_does_what_the_pil_op_does(spec):
    """Same op, same argument (v = 3 and 9, both signs): the batched tensor op reproduces the PIL op up to
    rounding (direction of translate / shear / rotate, thresholds, bits)."""
    pixels = smooth_image(0, 40, 48)
    image, tensor = Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    for magnitude in (3, 9):
        for sign in (1, -1):
            argument = op_argument(spec, magnitude, sign, 48)
            expected = np.asarray(PIL_OPS[spec.name](image, argument)).astype(int)
            batch = torch.stack([tensor, tensor.flip(-1)])  # a batch of two: ops act per sample
            got = TENSOR_OPS[spec.name](batch, argument)[0].permute(1, 2, 0).numpy().astype(int)
            difference = np.abs(got - expected)
            assert difference.mean() < 1.0 and (difference > 2).mean() < 0.03, (spec.name, magnitude, sign)


@pytest.mark.parametrize("recipe", ["imagenet", "small"])
def test_batched_views_match_the_pil_views(recipe):
    """render_batch on a batch of different-size images reproduces render_pil view by view (small rounding)."""
    spec = recipe_for(recipe, 32)
    sources = [smooth_image(i, 40 + 6 * (i % 3), 48) for i in range(24)]
    generator = torch.Generator().manual_seed(0)
    params = [sample_view(spec, s.shape[0], s.shape[1], strong=True, generator=generator) for s in sources]
    batch = render_batch([torch.from_numpy(s).permute(2, 0, 1) for s in sources], BatchParams.stack(params), spec)
    assert batch.shape == (24, 3, 32, 32) and batch.dtype == torch.uint8
    for i, (source, view) in enumerate(zip(sources, params, strict=True)):
        expected = np.asarray(render_pil(Image.fromarray(source), view, spec)).astype(int)
        difference = np.abs(batch[i].permute(1, 2, 0).numpy().astype(int) - expected)
        assert difference.mean() < 3.0, (i, view)


def test_batch_params_round_trip():
    spec = recipe_for("small", 32)
    generator = torch.Generator().manual_seed(3)
    views = [sample_view(spec, 30, 40, strong=True, generator=generator) for _ in range(5)]
    stacked = BatchParams.stack(views)
    assert len(stacked) == 5 and [stacked.row(i) for i in range(5)] == views
    weak = [sample_view(spec, 30, 40, strong=False, generator=generator) for _ in range(3)]
    assert BatchParams.stack(weak).ops.shape == (3, 0)


# ------------------------------------------------------------------------------------------ decoding


def test_a_corrupt_jpeg_in_a_batch_is_skipped_and_counted(tmp_path):
    good = smooth_image(1)
    data = jpeg_bytes(good)
    png = io.BytesIO()
    Image.fromarray(good).save(png, format="PNG")
    items = [
        encode_source(data, "good.jpg"),
        encode_source(data[: len(data) // 2], "truncated.jpg"),  # header fine, data cut: fails at decode
        encode_source(png.getvalue(), "image.png"),  # not a JPEG: decoded by the worker, arrives as pixels
        encode_source(b"\xff\xd8\xff garbage", "garbage.jpg"),  # header unreadable: corrupt at read time
        encode_source(str(tmp_path / "missing.jpg"), "missing.jpg"),
    ]
    assert [item.kind for item in items] == ["jpeg", "jpeg", "pixels", "corrupt", "corrupt"]
    decoded = decode_images(items, "cpu")
    assert decoded.ok.tolist() == [True, False, True, False, False]
    assert len(decoded.failures) == 3 and "truncated.jpg" in decoded.failures[0]
    reference = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    assert (decoded.images[0].int() - reference.int()).abs().max() <= 1  # libjpeg in both
    assert torch.equal(decoded.images[2], torch.from_numpy(good).permute(2, 0, 1))
    assert all(image.shape[0] == 3 and image.dtype == torch.uint8 for image in decoded.images)


def test_device_views_keep_the_batch_and_count_the_corrupt_image(table, tmp_path):
    spec = transforms.build_transforms(32).spec
    (tmp_path / "jpegs" / "img002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = SeededItems(EncodedUnlabeledViews(table, np.arange(len(table)), spec))
    batch_items = [dataset[(i, 100 + i)] for i in range(4)]
    unlabeled = EncodedUnlabeledViews.collate_fn(batch_items)
    views = DeviceViews(spec, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
    batch = views(None, unlabeled, torch.device("cpu"))
    assert batch.labeled is None and batch.unlabeled.weak[0].shape == (4, 3, 32, 32)
    assert batch.unlabeled.strong[0].dtype == torch.float32 and views.decode_failures == 1


def test_predict_indices_device_marks_corrupt_images_invalid(table, tmp_path):
    from zeroshot_adapt.teacher.clip import load_clip
    from zeroshot_adapt.teacher.predict import predict_indices, predict_indices_device

    (tmp_path / "jpegs" / "img001.jpg").write_bytes(jpeg_bytes(smooth_image(1))[:200])  # truncated
    clip = load_clip("zsa-tiny-digits", "bundled")
    torch.manual_seed(0)
    classifier = torch.nn.functional.normalize(torch.randn(clip.model.text_projection.shape[1], 4), dim=0)
    indices = np.arange(8)
    dev = predict_indices_device(clip, classifier, table, indices, batch_size=3, num_workers=0)
    cpu = predict_indices(clip, classifier, table, indices, batch_size=3, num_workers=0)
    assert dev["valid"].tolist() == cpu["valid"].tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    assert dev["prediction"][1] == -1 and dev["confidence"][1] == 0
    valid = dev["valid"].astype(bool)
    agreement = (dev["prediction"][valid] == cpu["prediction"][valid]).mean()
    assert agreement == 1.0 and np.abs(dev["features"][valid].astype(np.float32)
                                       - cpu["features"][valid].astype(np.float32)).max() < 0.05


def test_tensor_preprocess_reproduces_clips_pil_preprocess():
    from torchvision import transforms as T

    from zeroshot_adapt.teacher.clip import load_clip

    clip = load_clip("zsa-tiny-digits", "bundled")
    preprocess = TensorPreprocess.from_transform(clip.preprocess)
    assert preprocess is not None and preprocess.crop == (32, 32)
    sources = [smooth_image(i, 40 + 10 * i, 48) for i in range(3)]
    tensors = preprocess([torch.from_numpy(s).permute(2, 0, 1) for s in sources])
    for source, tensor in zip(sources, tensors, strict=True):
        assert (tensor - clip.preprocess(Image.fromarray(source))).abs().mean() < 0.02
    assert TensorPreprocess.from_transform(T.Compose([T.RandomCrop(8), T.ToTensor()])) is None


# ------------------------------------------------------------------------------------------ training


def _device_world(table: SampleTable):
    torch.manual_seed(0)
    student = TinyNet()
    ema = EmanTeacher(student)
    config = AlgorithmConfig(name="debiaspl", threshold=0.3, lambda_u=1.0, tau=0.5, prior_momentum=0.9)
    algorithm = ALGORITHMS.get("debiaspl")(NUM_CLASSES, config)
    spec = transforms.build_transforms(16).spec  # small recipe: flip, pad-crop, RandAugment, Cutout
    chosen = np.arange(len(table) // 2)
    labeled = EncodedLabeledViews(table, chosen, np.asarray(table.labels)[chosen], spec)
    unlabeled = EncodedUnlabeledViews(table, np.arange(len(table)), spec)
    views = DeviceViews(spec, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD, channels_last=True)
    return student, ema, algorithm, labeled, unlabeled, views


def _train(table, run_dir, stop_after=None, **loop):
    from synthetic import settings

    student, ema, algorithm, labeled, unlabeled, views = _device_world(table)
    result = train(accelerator=Accelerator(cpu=True), student=student, ema=ema, algorithm=algorithm,
                   labeled=labeled, unlabeled=unlabeled, settings=settings(**loop), num_classes=NUM_CLASSES,
                   run_dir=run_dir, stop_after_steps=stop_after, batch_pipeline=views)
    return result, student, ema, algorithm


def test_resume_with_the_device_pipeline_equals_uninterrupted(table, tmp_path, single_thread):
    """Stopped mid-epoch and at an epoch boundary, resumed with DataLoader workers: the same weights, EMA
    teacher and class prior as one uninterrupted run without workers (the parameters travel with the items)."""
    full, student_a, ema_a, algo_a = _train(table, tmp_path / "a")
    assert full.completed and full.step == 6
    first, *_ = _train(table, tmp_path / "b", stop_after=2)
    second, *_ = _train(table, tmp_path / "b", stop_after=2, num_workers=2)
    assert (first.step, second.step) == (2, 4)
    last, student_b, ema_b, algo_b = _train(table, tmp_path / "b")
    assert last.completed and last.step == 6
    for mine, theirs in ((student_a, student_b), (ema_a, ema_b)):
        for name, tensor in mine.state_dict().items():
            assert torch.equal(tensor, theirs.state_dict()[name]), name
    prior = algo_a.state_dict()["adjuster"]["class_prior"]
    assert torch.equal(prior, algo_b.state_dict()["adjuster"]["class_prior"])
    assert not torch.allclose(prior, torch.full((NUM_CLASSES,), 1 / NUM_CLASSES))  # it trained


def test_prefetcher_hands_out_every_item_in_order():
    prepared: list[int] = []

    def prepare(item: int) -> int:
        prepared.append(item)
        return item * 10

    feed = Prefetcher(iter(range(5)), prepare, "cpu")
    assert list(feed) == [0, 10, 20, 30, 40] and prepared == [0, 1, 2, 3, 4]
    with pytest.raises(StopIteration):
        next(feed)


# ------------------------------------------------------------------------------------------ workers


@pytest.mark.parametrize(("total", "loads", "expected"), [
    (0, [1.0, 10.0], [0, 0]),
    (1, [1.0, 10.0], [0, 1]),  # one worker: the expensive stream; the cheap one loads in the main process
    (2, [1.0, 10.0], [1, 1]),  # every stream with work gets one first
    (6, [1.0, 10.0], [1, 5]),
    (4, [3.0, 3.0], [2, 2]),
    (3, [0.0, 5.0], [0, 3]),  # no labeled set
    (2, [0.0, 0.0], [0, 0]),
])
def test_split_workers_minimises_the_largest_load_per_worker(total, loads, expected):
    assert workers.split_workers(total, loads) == expected
    assert sum(workers.split_workers(total, loads)) == (total if any(loads) else 0)


def test_worker_plan_uses_measured_item_costs(monkeypatch):
    costs = {"labeled": 0.004, "unlabeled": 0.010}  # seconds per item (a weak view vs weak + strong)
    monkeypatch.setattr(workers, "seconds_per_item", lambda dataset: costs[dataset])
    # per step: 8 labeled items (0.032 s) vs 16 unlabeled items (0.160 s)
    assert workers.plan_stream_workers(6, [("labeled", 8), ("unlabeled", 16)]) == [1, 5]
    costs["labeled"] = 0.040  # labeled items got expensive: 0.32 s vs 0.16 s per step
    assert workers.plan_stream_workers(6, [("labeled", 8), ("unlabeled", 16)]) == [4, 2]


def test_measuring_items_leaves_the_random_state_alone(table):
    views = transforms.build_transforms(32)
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    assert workers.seconds_per_item(UnlabeledViews(table, np.arange(4), views.weak, views.strong)) > 0
    assert torch.equal(torch.rand(3), before)
    assert workers.seconds_per_item(None) == 0.0


# ------------------------------------------------------------------------------------------ config, models, launch


def test_pipeline_choice():
    assert device.resolve_pipeline("auto", "cpu") == "cpu" and device.resolve_pipeline("auto", "cuda") == "device"
    assert device.resolve_pipeline("device", "cpu") == "device"
    with pytest.raises(UserError, match="cpu, device, auto"):
        device.resolve_pipeline("gpu", "cpu")
    from zeroshot_adapt import pipeline

    with pytest.raises(UserError, match=r"data.pipeline \(--pipeline\)='gpu' must be one of cpu, device, auto"):
        pipeline.resolve_config("digits", overrides=["data.pipeline=gpu"])


def test_cache_identity_records_the_device_pipeline_only_when_chosen(monkeypatch):
    from zeroshot_adapt import pipeline

    config = pipeline.resolve_config("digits")
    table = pipeline.load_table(config, "train")
    prompts = pipeline.prompts_for(config, table)
    default = pipeline.cache_identity(config, table, prompts)["compute"]
    assert "input_pipeline" not in default and "channels_last" not in default  # caches built before still match
    on_device = pipeline.resolve_config("digits", overrides=["data.pipeline=device", "teacher.precision=bf16"])
    compute = pipeline.cache_identity(on_device, table, prompts)["compute"]
    assert compute["input_pipeline"] == "device" and compute["precision"] == "float32"  # a CPU runs in fp32
    monkeypatch.setattr(pipeline, "_compute_device", lambda: torch.device("cuda"))
    assert pipeline.cache_identity(config, table, prompts)["compute"]["precision"] == "float16-autocast"
    assert pipeline.cache_identity(on_device, table, prompts)["compute"]["precision"] == "bfloat16-autocast"


def test_prepare_module_channels_last_and_compile(monkeypatch):
    from zeroshot_adapt.models.acceleration import inference_autocast, prepare_module

    model = TinyNet()
    compiled = []
    monkeypatch.setattr(type(model), "compile", lambda self, *a, **k: compiled.append(self), raising=False)
    keys = list(model.state_dict())
    prepare_module(model, channels_last=True, compile=True)
    conv = model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert compiled == [model] and list(model.state_dict()) == keys
    assert isinstance(inference_autocast("cpu", "bf16"), type(inference_autocast("cpu", "fp16")))  # CPU: fp32
    with pytest.raises(ValueError):
        inference_autocast("cpu", "int8")


@pytest.mark.parametrize(("environ", "refused"), [
    ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_PORT": "29500", "MASTER_ADDR": "127.0.0.1"}, True),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, False),  # accelerate launch, one process asked for
    ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, False),
    ({"MASTER_PORT": "29500"}, False),  # not launched by accelerate
])
def test_check_launch_refuses_a_multi_process_launch_that_started_one_process(environ, refused):
    if refused:
        with pytest.raises(UserError, match="--multi_gpu"):
            check_launch(environ)
    else:
        check_launch(environ)


def _accelerate(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


PROBE = """
import sys
from accelerate import PartialState
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.launch import check_launch, use_cpu
try:
    check_launch()  # what pipeline.adapt and the cache build call first
except UserError as error:
    print(error, file=sys.stderr)
    sys.exit(2)
state = PartialState(cpu=use_cpu())
print(f"rank {state.process_index} of {state.num_processes} {state.distributed_type}", flush=True)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only launch")
def test_accelerate_launch_of_two_processes_that_starts_one_is_refused(tmp_path):
    """A real `accelerate launch --num_processes 2` on a CPU-only machine starts ONE process: refused with the
    fix-it message (exit 2) instead of silently running on one."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = _accelerate("--num_processes", "2", str(probe))
    assert done.returncode != 0 and "returned non-zero exit status 2" in done.stderr  # accelerate re-raises
    assert "started only ONE process" in done.stderr and "--multi_gpu" in done.stderr
    assert "rank 0" not in done.stdout


@pytest.mark.slow  # two torchrun processes importing torch + accelerate: 14-33 s measured on 2 shared cores
@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only launch")
def test_accelerate_launch_multi_gpu_flag_starts_two_cpu_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2`, what the message recommends, starts two CPU
    processes that the project's PartialState(cpu=use_cpu()) joins with gloo."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = _accelerate("--multi_gpu", "--num_processes", "2", str(probe), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2 DistributedType.MULTI_CPU", "rank 1 of 2 DistributedType.MULTI_CPU"]


@pytest.mark.slow  # three digits adapt runs + a cache build: 20 s on an idle 2-core machine, 140 s under load
def test_adapt_with_the_device_pipeline_resumes_to_the_same_result(tmp_path, single_thread):
    """`zsa adapt` with data.pipeline=device (the digits arrays arrive as pixels, are augmented as tensors):
    stopped after 3 steps and re-run, it ends with the weights of an uninterrupted run."""
    from dataclasses import replace

    from zeroshot_adapt import pipeline

    overrides = [f"teacher.cache_dir={tmp_path / 'cache'}", "optim.epochs=2", "optim.steps_per_epoch=3",
                 "data.num_workers=0", "optim.batch_size=8", "optim.mu=2", "data.pipeline=device"]
    config = pipeline.resolve_config("digits", overrides=overrides)
    whole = pipeline.adapt(replace(config, run_dir=str(tmp_path / "whole")))
    first = pipeline.adapt(replace(config, run_dir=str(tmp_path / "split")), stop_after_steps=3)
    second = pipeline.adapt(replace(config, run_dir=str(tmp_path / "split")))
    assert not first["completed"] and second["completed"] and second["step"] == whole["step"] == 6
    a, b = (torch.load(tmp_path / run / "student.pt") for run in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second["student"]["top1"] == whole["student"]["top1"]
