"""Export a finished run's student as a timm / Hugging Face hub folder, and load one back.

``zsa export RUN_DIR --out DIR`` (:func:`export_run`) writes three files, weights only (never a pickle):

- ``model.safetensors``: the run's final **student** (``RUN_DIR/student.pt``, the network trained by gradient
  descent, what the stages and ``zsa evaluate`` use; the default), or with ``weights="ema"`` its EMA (EMAN)
  teacher at the last step (``RUN_DIR/checkpoints/last.pt``). report.json scores both.
- ``config.json``: timm's hub config, written by ``timm.models.save_for_hf``: ``architecture``,
  ``num_classes``, ``num_features``, ``label_names`` (the class names, in output order), ``model_args`` and
  ``pretrained_cfg`` (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``,
  ...: the run's own eval preprocessing), plus a ``zsa`` entry timm ignores (weights, run, teacher, prompts,
  the preprocessing check; ``zsa.clip`` for a CLIP student).
- ``README.md``: a model card (teacher, prompts, selection rule, algorithm, recipe, data fingerprints and the
  run's metrics from its report.json, nothing else).

Loading (:func:`load_exported`): a timm architecture loads with plain timm, no zeroshot-adapt needed,
``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``"hf-hub:USER/NAME"`` once uploaded); this
package's own architectures (``zsa_cnn_small``, ``wrn28_*``) need ``import zeroshot_adapt.models`` first,
which registers them with timm. A CLIP student (``student.arch=clip``) loads with
``zeroshot_adapt.load_exported(DIR)`` only (``ClipStudent.from_export_config(config["zsa"]["clip"])``).
The export is checked before it is kept: the folder is loaded back and must give the same logits as the
run's model, and timm's transform built from config.json must equal the run's eval transform on probe images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zeroshot_adapt.errors import UserError

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
WEIGHT_CHOICES = ("student", "ema")
DEFAULT_WEIGHTS = "student"
CLIP_ARCHITECTURE = "clip"  # config.json "architecture" of a CLIP student (not a timm model)
# pretrained_cfg entries that describe where the INITIAL weights came from (timm's default tag), not ours
SOURCE_CFG_KEYS = ("tag", "url", "hf_hub_id", "hf_hub_filename", "file", "source", "state_dict", "license",
                   "origin_url", "paper_ids", "paper_name", "notes", "test_input_size", "test_crop_pct")
PROBE_IMAGE_SIZES = ((37, 23), (16, 16), (300, 211))  # (width, height) of the preprocessing check's images
LOGIT_TOLERANCE = 1e-5  # max |logit difference| between the run's model and the folder loaded back
MAX_CARD_CLASSES = 100  # class names listed in the card (all of them are in config.json)


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class FinishedRun:
    """A finished `zsa adapt` / `zsa ssl` run directory: its saved config and report.json."""

    run_dir: Path
    config: Any  # RunConfig
    report: dict[str, Any]


# An absolute local path inside a string ("/home/me/data/classes.txt", also inside prose), not a URL's path.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~])/(?:[^\s'\"`|,;()/]+/)+([^\s'\"`|,;()/]+)")


def shareable(value: Any) -> Any:
    """`value` (JSON-like) with every absolute local path cut to its file name: an export is meant to be uploaded,
    and the user's folders (user name, data layout) are not part of the model."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda match: match.group(1), value)
    if isinstance(value, dict):
        return {key: shareable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [shareable(item) for item in value]
    return value


def open_finished_run(run_dir: str | Path) -> FinishedRun:
    """The finished run in `run_dir`, or a UserError naming the path and what is missing."""
    from zeroshot_adapt.stages import REPORT_NAME, STUDENT_NAME, run_config

    path = Path(run_dir).expanduser()
    expected = "the folder `zsa adapt` / `zsa ssl` wrote (config.yaml, report.json, student.pt)"
    if not path.exists():
        raise UserError(f"run directory {str(path)!r} does not exist; expected {expected}")
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is not a directory; expected a run directory, {expected}")
    try:
        report = json.loads((path / REPORT_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        report = None
    except (OSError, ValueError) as error:
        raise UserError(f"{str(path / REPORT_NAME)!r} is unreadable ({error}); is {str(path)!r} a run directory?") \
            from None
    if isinstance(report, dict) and ("generations" in report or "rounds" in report):
        subruns = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / STUDENT_NAME).is_file())
        raise UserError(f"{str(path)!r} is a multi-run stage directory ({report.get('method')}); export one of its "
                        f"runs instead: {', '.join(subruns) or '(none finished yet)'}")
    if not (path / "config.yaml").is_file():
        raise UserError(f"{str(path)!r} is not a run directory: it holds no config.yaml; expected {expected}")
    if not isinstance(report, dict) or not report.get("completed") or report.get("step") != report.get("total_steps"):
        where = "no report.json" if report is None else (
            f"report.json says step {report.get('step')} of {report.get('total_steps')}, completed="
            f"{report.get('completed')}" if isinstance(report, dict) else "report.json is not a JSON object")
        raise UserError(f"run {str(path)!r} has not finished ({where}): run the same `zsa adapt` / `zsa ssl` "
                        "command again to finish it, then export")
    if not (path / STUDENT_NAME).is_file():
        raise UserError(f"run {str(path)!r} has not finished: it holds no {STUDENT_NAME} (the final student)")
    return FinishedRun(path, run_config(path), report)


def run_class_names(run: FinishedRun) -> list[str]:
    """The student's output classes in order: report.json's provenance, else the run's prompt file."""
    recorded = (run.report.get("provenance") or {}).get("class_names")
    if recorded:
        return [str(name) for name in recorded]
    from zeroshot_adapt.pipeline import model_classes

    return [str(name) for name in model_classes(run.config).classes]


def trained_model(run: FinishedRun, num_classes: int, weights: str = DEFAULT_WEIGHTS) -> nn.Module:
    """The run's final student (``weights="student"``) or its EMA teacher at the last step (``"ema"``), eval mode."""
    from zeroshot_adapt.stages import STUDENT_NAME, load_trained_student

    if weights not in WEIGHT_CHOICES:
        raise UserError(f"--weights {weights!r} is not valid; choose one of {', '.join(WEIGHT_CHOICES)}")
    model = load_trained_student(run.config, num_classes, run.run_dir / STUDENT_NAME)
    if weights == "ema":
        from zeroshot_adapt.train import CHECKPOINT_NAME, read_checkpoint

        path = run.run_dir / "checkpoints" / CHECKPOINT_NAME
        if not path.is_file():
            raise UserError(f"run {str(run.run_dir)!r} holds no {str(path)!r}, so no EMA teacher to export; use "
                            "--weights student")
        try:
            checkpoint = read_checkpoint(path)
        except UserError as error:  # not read_checkpoint's advice (start the run over): the run is finished
            raise UserError(f"cannot read the EMA teacher: {str(error).split(';')[0]}; export the "
                            "student instead (--weights student)") from None
        if checkpoint.get("step") != run.report.get("total_steps"):
            raise UserError(f"{str(path)!r} is from step {checkpoint.get('step')}, the run ended at step "
                            f"{run.report.get('total_steps')}: its EMA teacher is not the final one")
        from zeroshot_adapt.models.student import EmanTeacher

        ema = EmanTeacher(model)  # the loop saved the teacher as an EmanTeacher: load it the same way
        ema.load_state_dict(checkpoint["ema"])
        model = ema.module
    return model.eval()


def run_eval_transform(config: Any):
    """The eval transform the run scored its student with (the student's own: CLIP's for a CLIP student)."""
    from zeroshot_adapt.stages import _eval_transform

    return _eval_transform(config)


def crop_pct_for(image_size: int, resize: int) -> float:
    """crop_pct such that timm's eval transform resizes to `resize` (``floor(image_size / crop_pct)``)."""
    if resize == image_size:
        return 1.0
    for candidate in (round(image_size / resize, 4), image_size / resize):
        if math.floor(image_size / candidate) == resize:
            return candidate
    candidate = image_size / resize
    while math.floor(image_size / candidate) < resize:  # float rounding put it just below: step down
        candidate = math.nextafter(candidate, 0.0)
    return candidate


def describe_eval_transform(transform) -> dict[str, Any]:
    """timm's data config (input_size, interpolation, crop_pct, crop_mode, mean, std) of an eval transform of
    the form Resize(shorter side, or both to a square) -> CenterCrop -> ToTensor -> Normalize (what this package
    and open_clip use; a convert-to-RGB step is a no-op on decoded images). UserError for any other form."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", [transform]))
    resize = crop = normalize = None
    for step in steps:
        if isinstance(step, T.Resize):
            resize = step
        elif isinstance(step, T.CenterCrop):
            crop = step
        elif isinstance(step, T.Normalize):
            normalize = step
        elif isinstance(step, T.ToTensor) or "rgb" in getattr(step, "__name__", "").lower():
            continue
        elif type(step).__name__ == "MaybeToTensor" or getattr(step, "mode", None) == "RGB":
            continue  # open_clip 3's ToTensor and convert("RGB") steps (a CLIP student's eval transform)
        else:
            raise UserError(f"cannot describe the run's eval transform for timm: unexpected step {step!r}")
    if resize is None or crop is None or normalize is None:
        raise UserError(f"cannot describe the run's eval transform for timm (needs Resize, CenterCrop, Normalize): "
                        f"{transform!r}")
    size, crop_mode = resize.size, "center"  # center: resize the shorter side, keep the aspect ratio
    if not isinstance(size, int):
        if len(size) == 2 and size[0] == size[1]:
            crop_mode = "squash"  # both sides to the same length (open_clip's resize_mode="squash")
        elif len(size) != 1:
            raise UserError(f"the run's eval transform resizes to {size!r}, neither its shorter side nor a square")
        size = size[0]
    crop_size = crop.size if isinstance(crop.size, int) else crop.size[0]
    if not isinstance(crop.size, int) and len(set(crop.size)) != 1:
        raise UserError(f"the run's eval transform crops a non-square {crop.size!r}")
    mode = getattr(resize.interpolation, "value", resize.interpolation)
    return {
        "input_size": (3, int(crop_size), int(crop_size)),
        "interpolation": str(mode),
        "crop_pct": crop_pct_for(int(crop_size), int(size)),
        "crop_mode": crop_mode,
        "mean": tuple(float(m) for m in normalize.mean),
        "std": tuple(float(s) for s in normalize.std),
    }


def timm_eval_transform(data_config: dict[str, Any]):
    """timm's eval transform for a data config (``resolve_data_config`` + ``create_transform``)."""
    from timm.data import create_transform, resolve_data_config

    resolved = resolve_data_config(pretrained_cfg=dict(data_config))
    return create_transform(**resolved, is_training=False)


def preprocessing_difference(run_transform, data_config: dict[str, Any], seed: int = 0) -> float:
    """Max |difference| between the run's eval transform and timm's from `data_config` on random probe images
    of PROBE_IMAGE_SIZES (0.0: the same tensors)."""
    from PIL import Image

    timm_transform = timm_eval_transform(data_config)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for width, height in PROBE_IMAGE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        a, b = run_transform(image), timm_transform(image)
        if a.shape != b.shape:
            return math.inf
        worst = max(worst, float((a - b).abs().max()))
    return worst


# ----------------------------------------------------------------------------- writing a folder


def _clean_timm_cfg(model: nn.Module) -> None:
    """Drop the init weights' origin (timm's default tag, its license and URLs) from the model's pretrained_cfg:
    the exported weights are the run's, not those."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    model.pretrained_cfg = {k: v for k, v in cfg.items() if k not in SOURCE_CFG_KEYS}
    if hasattr(model, "default_cfg"):
        model.default_cfg = model.pretrained_cfg


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors that share no storage (what safetensors accepts)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def is_clip_student(model: nn.Module) -> bool:
    return callable(getattr(model, "export_config", None)) and callable(getattr(type(model), "from_export_config",
                                                                                None))


def save_exported(
    model: nn.Module,
    directory: str | Path,
    *,
    class_names: list[str],
    data_config: dict[str, Any],
    zsa: dict[str, Any],
    card: str,
) -> None:
    """Write model.safetensors, config.json and README.md for `model` into `directory` (which must exist).

    A timm model goes through ``timm.models.save_for_hf`` (safetensors only); a CLIP student (a model with
    ``export_config``) gets the same files, with ``architecture="clip"`` and ``zsa.clip`` = its export config."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if len(class_names) != getattr(model, "num_classes", len(class_names)):
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} outputs")
    if is_clip_student(model):
        save_file(_plain_state(model), str(directory / WEIGHTS_FILE))
        pretrained_cfg = {**{k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
                          "num_classes": len(class_names), "classifier": "head"}
        config = {"architecture": CLIP_ARCHITECTURE, "num_classes": len(class_names),
                  "num_features": int(getattr(model, "num_features", 0)), "label_names": list(class_names),
                  "pretrained_cfg": pretrained_cfg, "zsa": shareable({**zsa, "clip": model.export_config()})}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        from timm.models import save_for_hf

        _clean_timm_cfg(model)
        save_for_hf(model, str(directory), model_config={"label_names": list(class_names), "zsa": zsa},
                    safe_serialization=True, data_config=dict(data_config))
    (directory / CARD_FILE).write_text(card, encoding="utf-8")


def _registered_by_this_package(architecture: str) -> bool:
    import timm
    from timm.models import model_entrypoint

    return timm.is_model(architecture) and model_entrypoint(architecture).__module__.startswith("zeroshot_adapt")


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    weights: str  # "student" | "ema"
    architecture: str
    files: tuple[str, ...]
    max_logit_difference: float  # the folder loaded back vs the run's model, on a random batch
    preprocessing_difference: float  # timm's transform from config.json vs the run's eval transform
    notes: list[str] = field(default_factory=list)


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"--out {str(out_dir)!r} exists and is not empty; choose a new or empty folder, or pass "
                        f"--force to replace its {', '.join(EXPORT_FILES)}")


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    weights: str = DEFAULT_WEIGHTS,
    force: bool = False,
) -> ExportResult:
    """Export the finished run in `run_dir` to `out_dir` (see the module docstring).

    weights: "student" (default: the final student, ``student.pt``) or "ema" (the EMA teacher at the last step).
    force: replace the export files of a non-empty `out_dir` (other files there are left alone); without it a
    non-empty `out_dir` is refused. The files are written to a temporary folder beside `out_dir`, checked (loaded
    back: same logits as the run's model), then moved in."""
    from zeroshot_adapt import __version__

    out_dir = Path(out_dir).expanduser()
    if weights not in WEIGHT_CHOICES:
        raise UserError(f"--weights {weights!r} is not valid; choose one of {', '.join(WEIGHT_CHOICES)}")
    _check_out_dir(out_dir, force)
    run = open_finished_run(run_dir)
    class_names = run_class_names(run)
    model = trained_model(run, len(class_names), weights)
    run_transform = run_eval_transform(run.config)
    data_config = describe_eval_transform(run_transform)
    difference = preprocessing_difference(run_transform, data_config)
    notes = []
    if difference > 0:
        notes.append(f"timm's transform from config.json differs from the run's eval transform by up to "
                     f"{difference:.3g} on probe images")
        log.warning("%s", notes[-1])
    clip = is_clip_student(model)
    architecture = CLIP_ARCHITECTURE if clip else run.config.student.arch.partition(".")[0]
    needs_import = None if clip else ("zeroshot_adapt.models" if _registered_by_this_package(architecture) else "")
    zsa = {
        "format": EXPORT_FORMAT,
        "exported_by": f"zeroshot-adapt {__version__}",
        "weights": weights,
        "loader": "zeroshot_adapt.load_exported" if clip else "timm",
        "needs_import": needs_import or None,
        "run": {"dir": run.run_dir.resolve().name, "dataset": run.config.data.dataset,
                "algorithm": run.report.get("algorithm"), "step": run.report.get("step")},
        "provenance": run.report.get("provenance"),
        "labeled_set": run.report.get("labeled_set"),
        "method": run.report.get("method"),
        "preprocessing_check": {"max_abs_difference": difference, "probe_images": len(PROBE_IMAGE_SIZES)},
    }
    zsa = shareable(zsa)
    card = shareable(model_card(run, class_names, weights=weights, architecture=architecture, data_config=data_config,
                                needs_import=needs_import, preprocessing_difference=difference))
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=parent))
    try:
        save_exported(model, staging, class_names=class_names, data_config=data_config, zsa=zsa, card=card)
        logit_difference = _check_round_trip(model, staging, data_config)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in EXPORT_FILES:
            os.replace(staging / name, out_dir / name)
            os.chmod(out_dir / name, 0o644)  # readable like any model download (a temp-file writer may leave 0600)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
    if others:
        notes.append(f"{out_dir} also holds files this export did not write: {', '.join(others[:10])}")
        log.warning("%s", notes[-1])
    return ExportResult(out_dir, weights, architecture, EXPORT_FILES, logit_difference, difference, notes)


def _check_round_trip(model: nn.Module, directory: Path, data_config: dict[str, Any]) -> float:
    """Load the written folder back (as a user would) and compare its logits with `model`'s on a random batch;
    an export that does not reproduce the run's model is never kept."""
    loaded, _ = load_exported(directory, device="cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, *data_config["input_size"], generator=generator)
    model = model.to("cpu").eval()
    with torch.no_grad():
        difference = float((model(images) - loaded(images)).abs().max())
    if not difference <= LOGIT_TOLERANCE:
        raise RuntimeError(f"the exported folder {directory} gives logits up to {difference:.3g} away from the run's "
                           "model: export aborted (please report this)")
    return difference


# ----------------------------------------------------------------------------- loading a folder


@dataclass(frozen=True)
class ExportInfo:
    """What an exported folder says about its model."""

    directory: Path
    architecture: str
    class_names: list[str]
    data_config: dict[str, Any]  # timm's: input_size, interpolation, crop_pct, crop_mode, mean, std
    config: dict[str, Any]  # the whole config.json

    @property
    def transform(self):
        """PIL RGB image -> normalized tensor [3, H, W]: timm's eval transform for data_config."""
        return timm_eval_transform(self.data_config)


def read_export_config(model_dir: str | Path) -> dict[str, Any]:
    directory = Path(model_dir).expanduser()
    if not directory.is_dir():
        raise UserError(f"model folder {str(directory)!r} does not exist; expected a folder written by `zsa export` "
                        f"({', '.join(EXPORT_FILES)})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"{str(directory)!r} holds no {name}: is it a folder written by `zsa export`?")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{str(directory / CONFIG_FILE)!r} is unreadable: {error}") from None
    if not isinstance(config, dict) or "architecture" not in config or "pretrained_cfg" not in config:
        raise UserError(f"{str(directory / CONFIG_FILE)!r} is not a timm hub config (architecture, pretrained_cfg)")
    return config


def load_exported(model_dir: str | Path, *, device: str | torch.device | None = None) -> tuple[nn.Module, ExportInfo]:
    """(model in eval mode on `device` (default cpu), ExportInfo) of a folder written by `zsa export`.

    timm architectures load through ``timm.create_model("local-dir:DIR", pretrained=True)`` (this package's
    own ones are registered first); a CLIP student through ``ClipStudent.from_export_config(config["zsa"]["clip"])``
    and the safetensors weights (strict)."""
    directory = Path(model_dir).expanduser()
    config = read_export_config(directory)
    architecture = str(config["architecture"])
    if architecture == CLIP_ARCHITECTURE:
        from safetensors.torch import load_file

        from zeroshot_adapt.models.clip_student import ClipStudent  # the CLIP student (issue 11, part 2)

        clip_cfg = (config.get("zsa") or {}).get("clip")
        if not isinstance(clip_cfg, dict):
            raise UserError(f"{str(directory / CONFIG_FILE)!r} names a CLIP student but holds no zsa.clip config")
        model = ClipStudent.from_export_config(clip_cfg)
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    else:
        import timm

        import zeroshot_adapt.models  # noqa: F401  (registers this package's own architectures with timm)

        if not timm.is_model(architecture):
            raise UserError(f"{str(directory)!r} holds a {architecture!r}, which this timm {timm.__version__} "
                            "does not know; upgrade timm")
        try:
            model = timm.create_model(f"local-dir:{directory}", pretrained=True)
        except ValueError as error:
            if "local-dir" in str(error):
                raise UserError(f"timm {timm.__version__} cannot load local folders (local-dir:); upgrade timm") \
                    from None
            raise
    model = model.to(torch.device(device or "cpu")).eval()
    from timm.data import resolve_data_config

    data_config = resolve_data_config(pretrained_cfg=dict(config["pretrained_cfg"]))
    names = config.get("label_names") or (config.get("pretrained_cfg") or {}).get("label_names")
    if isinstance(names, dict):  # timm allows {id: name} with gaps
        names = [names.get(str(i), names.get(i, str(i))) for i in range(int(config.get("num_classes", 0)))]
    class_names = [str(n) for n in names] if names else [str(i) for i in range(int(config.get("num_classes", 0)))]
    return model, ExportInfo(directory, architecture, class_names, data_config, config)


# ----------------------------------------------------------------------------- the model card


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _scalar_rows(entry: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, value) of the scalar entries of a nested metrics dict (lists and None left out)."""
    rows = []
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _scalar_rows(value, f"{name}.")
        elif isinstance(value, bool) or value is None or isinstance(value, (list, tuple)):
            continue
        elif isinstance(value, float):
            rows.append((name, f"{value:.4g}"))
        elif isinstance(value, (int, str)):
            rows.append((name, str(value)))
    return rows


METRIC_KEYS = ("top1", "top5", "mean_per_class_recall")
METRIC_BLOCKS = (("student", "final student"), ("ema", "EMA (EMAN) teacher"), ("clip_zeroshot", "CLIP zero-shot"),
                 ("student_la", "student, logit-adjusted"))


def metrics_section(report: dict[str, Any], weights: str) -> list[str]:
    """The run's metrics from report.json: labeled ones where measured, its label_free diagnostics where given;
    nothing is computed here."""
    lines = ["## Metrics (from the run's report.json)", ""]
    test = (report.get("provenance") or {}).get("test") or {}
    if test:
        lines.append(f"Test split: `{test.get('dataset')}/{test.get('split')}`, {test.get('size')} images.")
        lines.append("")
    labeled = [(key, title) for key, title in METRIC_BLOCKS
               if isinstance(report.get(key), dict) and any(report[key].get(m) is not None for m in METRIC_KEYS)]
    if labeled:
        lines += ["| model | top-1 | top-5 | mean per-class recall |", "|---|---|---|---|"]
        for key, title in labeled:
            mark = " (these weights)" if key == weights else ""
            entry = report[key]
            lines.append(f"| {title}{mark} | {_pct(entry.get('top1'))} | {_pct(entry.get('top5'))} | "
                         f"{_pct(entry.get('mean_per_class_recall'))} |")
        lines.append("")
    free = [(title, report[key]["label_free"]) for key, title in METRIC_BLOCKS
            if isinstance(report.get(key), dict) and isinstance(report[key].get("label_free"), dict)]
    if isinstance(report.get("label_free"), dict):
        free.append(("run", report["label_free"]))
    for title, entry in free:
        lines += [f"Label-free diagnostics, {title}:", "", "| diagnostic | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in _scalar_rows(entry)]
        lines.append("")
    for note in report.get("notes") or []:
        lines += [f"Note: {note}", ""]
    if not labeled and not free:
        lines += ["The run measured no metric (no labeled test split and no label-free diagnostics in its report).",
                  ""]
    return lines


def model_card(
    run: FinishedRun,
    class_names: list[str],
    *,
    weights: str,
    architecture: str,
    data_config: dict[str, Any],
    needs_import: str | None,
    preprocessing_difference: float,
) -> str:
    """README.md of an exported folder: what the weights are, how to load them, how they were made (from the run's
    config.yaml and report.json) and the run's metrics."""
    config, report = run.config, run.report
    provenance = report.get("provenance") or {}
    method = report.get("method") or {}
    labeled = report.get("labeled_set") or {}
    clip = architecture == CLIP_ARCHITECTURE
    front = ["---", "tags:", "- image-classification", "- zeroshot-adapt"]
    if not clip:
        front = ["---", "library_name: timm", "tags:", "- image-classification", "- timm", "- zeroshot-adapt"]
    front += ["pipeline_tag: image-classification", "---", ""]
    which = ("the run's final **student** (`student.pt`: the network trained by gradient descent)"
             if weights == "student" else "the run's **EMA (EMAN) teacher** at the last step (`checkpoints/last.pt`)")
    lines = [*front, f"# {config.student.arch} adapted to `{config.data.dataset}` with {report.get('algorithm')} "
             "(zeroshot-adapt)", "",
             f"`model.safetensors` holds {which}, {len(class_names)} classes, trained for {report.get('step')} steps "
             f"by zeroshot-adapt on unlabeled images"
             + (" with CLIP's pseudo-labels as its labeled set." if labeled.get("source") == "clip"
                else f" and {labeled.get('size')} human labels."), "",
             "## Load", ""]
    if clip:
        lines += ["A CLIP student (CLIP's image encoder + a linear head) is not a timm model; load it with "
                  "zeroshot-adapt:", "", "```python", "import zeroshot_adapt",
                  "model, info = zeroshot_adapt.load_exported(\"path/to/this/folder\")  # eval mode",
                  "transform = info.transform  # PIL image -> tensor, from config.json", "```", ""]
    else:
        register = ["import zeroshot_adapt.models  # registers " + architecture + " with timm (pip install "
                    "zeroshot-adapt)"] if needs_import else []
        lines += (["With timm alone:" if not needs_import else
                   f"With timm; `{architecture}` is registered with timm by zeroshot-adapt, so import it first:"]
                  + ["", "```python", "import timm", *register,
                     "model = timm.create_model(\"local-dir:path/to/this/folder\", pretrained=True).eval()",
                     "# or, once uploaded: timm.create_model(\"hf-hub:USER/NAME\", pretrained=True)",
                     "config = timm.data.resolve_data_config({}, model=model)",
                     "transform = timm.data.create_transform(**config)",
                     "labels = model.pretrained_cfg[\"label_names\"]", "```", "",
                     "or `model, info = zeroshot_adapt.load_exported(\"path/to/this/folder\")`.", ""])
    lines += ["Predict a folder of images: `zsa predict --model path/to/this/folder --data-dir images/ "
              "--out predictions.csv`.", "", "## Preprocessing", "",
              f"input {data_config['input_size'][1]}x{data_config['input_size'][2]} px, "
              + ("resize both sides (squash, no crop)" if data_config.get("crop_mode") == "squash" else
                 "resize the shorter side")
              + f" with {data_config['interpolation']} interpolation"
              + ("" if data_config.get("crop_mode") == "squash" else
                 f" then center-crop (crop_pct {data_config['crop_pct']:.4g})")
              + f", mean {[round(m, 4) for m in data_config['mean']]}, "
              f"std {[round(v, 4) for v in data_config['std']]}. "
              + ("timm's transform from config.json equals the run's eval transform on "
                 f"{len(PROBE_IMAGE_SIZES)} probe images." if preprocessing_difference == 0 else
                 f"timm's transform from config.json differs from the run's eval transform by up to "
                 f"{preprocessing_difference:.3g} on probe images."), "", "## How it was trained", "",
              "| | |", "|---|---|"]
    teacher = provenance.get("teacher")
    if teacher:
        prompts = teacher.get("prompts") or {}
        kind = ("per-class prompts (CuPL style)" if prompts.get("per_class_prompts")
                else f"{prompts.get('num_templates')} template(s)")
        lines += [f"| teacher | CLIP `{teacher.get('model')}`, weights `{teacher.get('pretrained')}` |",
                  f"| prompts | {kind} from `{prompts.get('source') or 'the dataset'}`; provenance: "
                  f"{(prompts.get('provenance') or 'not recorded').replace('|', '/')} |"]
    elif labeled.get("source") == "clip":
        lines.append(f"| teacher | CLIP `{config.teacher.model}`, weights `{config.teacher.pretrained}` (prompts not "
                     "recorded by this run) |")
    else:
        lines.append("| teacher | none (semi-supervised on human labels only) |")
    if labeled.get("source") == "clip":
        rule = (f"CLIP confidence >= tau_clip = {labeled.get('tau_clip')}" if labeled.get("select") == "threshold"
                else f"the most confident images of each predicted class ({labeled.get('select')})")
        lines.append(f"| labeled set | {labeled.get('size')} images: {rule}; teacher method "
                     f"`{labeled.get('teacher_method')}` |")
    else:
        lines.append(f"| labeled set | {labeled.get('size')} human-labeled images |")
    lines += [f"| algorithm | `{report.get('algorithm')}` |",
              f"| recipe | `{method.get('recipe', config.recipe)}` ({method.get('mode', '')}); views "
              f"{method.get('views', '')}; multi-view {method.get('multiview')}; CLD {method.get('lambda_cld')}; "
              f"CLIP fill {method.get('clip_fill_threshold')} |",
              f"| student | `{config.student.arch}`, initialised from "
              f"{f'`{config.student.pretrained}`' if config.student.pretrained else 'random weights'}, "
              f"{report.get('step')} steps, seed {config.seed} |"]
    for name in ("train", "test"):
        split = provenance.get(name)
        if split:
            lines.append(f"| {name} data | `{split.get('dataset')}/{split.get('split')}`, {split.get('size')} images, "
                         f"fingerprint `{split.get('fingerprint')}` |")
    if not provenance:
        lines.append(f"| data | `{config.data.dataset}` (fingerprints not recorded by this run) |")
    lines += ["", *metrics_section(report, weights), "## Classes", ""]
    shown = class_names[:MAX_CARD_CLASSES]
    lines.append(", ".join(f"{i}: {name}" for i, name in enumerate(shown))
                 + (f", ... ({len(class_names)} in all: config.json `label_names`)" if len(class_names) > len(shown)
                    else ""))
    return "\n".join(lines).rstrip() + "\n"
