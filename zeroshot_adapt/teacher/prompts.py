"""Prompt files: per-dataset class names and templates, shipped in `prompts/` (format: prompts/README.md).

A file is JSON: {"dataset", "classes", "templates", "provenance", optional "folder_names"}.
`classes` / `templates` may instead name data that open_clip ships, e.g.
"open_clip:IMAGENET_CLASSNAMES" and "open_clip:OPENAI_IMAGENET_TEMPLATES" (imported, never retyped).
Templates use `{}` or CLIP_benchmark's `{c}` as the class-name slot.

Per-class prompt lists (CuPL, Pratt et al. 2023; CLIP_benchmark's `--custom_template_file`) are accepted
in two forms: `"templates": {"class name": ["prompt", ...], ...}` inside a file of the format above
(`classes` then fixes the order; without it, the mapping's order is the class order), or a bare CuPL file,
`{"class name": ["prompt", ...], ...}`, whose key order is the class order. Each class's embedding is
then the normalized mean over its own prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.resources import prompts_dir

log = logging.getLogger(__name__)

OPEN_CLIP_PREFIX = "open_clip:"


CLASS_SLOT = "{}"
BENCHMARK_CLASS_SLOT = "{c}"  # CLIP_benchmark's templates: "a photo of a {c}."


@dataclass(frozen=True)
class PromptSet:
    """Class names (label order) and the texts that describe each class.

    templates: shared templates with one `{}` slot (empty when every class has its own prompts).
    class_prompts: per-class prompt lists (CuPL style), aligned with `classes`; None for template sets.
    """

    classes: tuple[str, ...]
    templates: tuple[str, ...]
    provenance: str = ""
    source: str = ""
    folder_names: tuple[str, ...] | None = None
    class_prompts: tuple[tuple[str, ...], ...] | None = None

    def texts_for(self, class_name: str) -> list[str]:
        """The texts of the (first) class named `class_name`."""
        return self.class_texts(self.classes.index(class_name))

    def class_texts(self, index: int) -> list[str]:
        """The texts whose embeddings are averaged into class `index`'s zero-shot weight."""
        if self.class_prompts is not None:
            return list(self.class_prompts[index])
        return [template.format(self.classes[index]) for template in self.templates]

    def digest(self) -> str:
        """sha256 over the class names and prompts: part of the prediction cache identity."""
        content: dict[str, Any] = {"classes": self.classes, "templates": self.templates}
        if self.class_prompts is not None:
            content["class_prompts"] = self.class_prompts
        payload = json.dumps(content, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def reordered(self, order: Sequence[int]) -> PromptSet:
        """The same prompts with class i = this set's class order[i]."""
        return replace(
            self,
            classes=tuple(self.classes[j] for j in order),
            folder_names=None if self.folder_names is None else tuple(self.folder_names[j] for j in order),
        )


def _resolve_open_clip(value: Any, field_name: str, source: str) -> Any:
    if not (isinstance(value, str) and value.startswith(OPEN_CLIP_PREFIX)):
        return value
    from open_clip import zero_shot_metadata

    name = value[len(OPEN_CLIP_PREFIX) :]
    if not hasattr(zero_shot_metadata, name):
        raise UserError(f"{source}: {field_name} refers to open_clip.zero_shot_metadata.{name}, which does not exist")
    return getattr(zero_shot_metadata, name)


def _as_template(template: Any, source: str) -> str:
    text = template(CLASS_SLOT) if callable(template) else template  # open_clip ships templates as lambdas
    if isinstance(text, str):
        text = text.replace(BENCHMARK_CLASS_SLOT, CLASS_SLOT)  # the same text once the class name is filled in
    if not isinstance(text, str) or CLASS_SLOT not in text:
        raise UserError(
            f"{source}: template {text!r} has no '{{}}' slot (or CLIP_benchmark's '{{c}}') for the class name"
        )
    return text


def _is_prompt_lists(value: Any) -> bool:
    """A mapping of class name -> list of prompt strings (CuPL)."""
    return isinstance(value, dict) and bool(value) and all(
        isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) for prompts in value.values()
    )


def _per_class_prompts(
    mapping: dict[str, list[str]], classes: tuple[str, ...] | None, source: str
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(classes, per-class prompt lists) of a CuPL mapping; `classes` (when given) fixes the order and must
    name exactly the mapping's keys."""
    if classes is None:
        classes = tuple(str(name) for name in mapping)
    missing = [name for name in classes if name not in mapping]
    extra = sorted(set(mapping) - set(classes))
    if missing or extra:
        raise UserError(
            f"prompt file {source!r}: the per-class prompts do not match the classes "
            f"(no prompts for {missing[:5]}; prompts for unknown classes {extra[:5]})"
        )
    empty = [name for name in classes if not mapping[name]]
    if empty:
        raise UserError(f"prompt file {source!r}: classes {empty[:5]} have an empty prompt list")
    return classes, tuple(tuple(mapping[name]) for name in classes)


def available_prompt_files() -> list[str]:
    return sorted(p.stem for p in prompts_dir().glob("*.json"))


def load_prompts(name_or_path: str) -> PromptSet:
    """Load a prompt file by stem (`eurosat` -> prompts/eurosat.json) or by path."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        if path.suffix == ".json" or "/" in name_or_path:
            raise UserError(f"prompt file {name_or_path!r} does not exist")
        path = prompts_dir() / f"{name_or_path}.json"
        if not path.is_file():
            raise UserError(
                f"no prompt file named {name_or_path!r}; shipped: {', '.join(available_prompt_files())} "
                "(or pass a path to your own JSON file)"
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"prompt file {str(path)!r} is not valid JSON: {error}") from None
    source = str(path)
    if not isinstance(data, dict):
        raise UserError(f"prompt file {source!r} must hold a JSON object")
    if "templates" not in data and "classes" not in data and _is_prompt_lists(data):
        data = {"templates": data, "provenance": "CuPL-style per-class prompts"}  # a bare CuPL file
    if "templates" not in data:
        raise UserError(f"prompt file {source!r} has no 'templates' entry")
    raw_templates = _resolve_open_clip(data["templates"], "templates", source)
    classes: tuple[str, ...] | None = None
    if "classes" in data:
        classes = tuple(str(c) for c in _resolve_open_clip(data["classes"], "classes", source))
    class_prompts = None
    if isinstance(raw_templates, dict):
        if not _is_prompt_lists(raw_templates):
            raise UserError(f"prompt file {source!r}: per-class 'templates' must map class names to lists of prompts")
        classes, class_prompts = _per_class_prompts(raw_templates, classes, source)
        templates: tuple[str, ...] = ()
    else:
        if classes is None:
            raise UserError(f"prompt file {source!r} has no 'classes' entry")
        templates = tuple(_as_template(t, source) for t in raw_templates)
        if not templates:
            raise UserError(f"prompt file {source!r} needs at least one class and one template")
    if not classes:
        raise UserError(f"prompt file {source!r} needs at least one class and one template")
    folder_names = data.get("folder_names")
    if folder_names is not None and len(folder_names) != len(classes):
        raise UserError(f"prompt file {source!r}: folder_names has {len(folder_names)} entries, classes {len(classes)}")
    return PromptSet(
        classes=classes,
        templates=templates,
        provenance=str(data.get("provenance", "")),
        source=source,
        folder_names=tuple(folder_names) if folder_names is not None else None,
        class_prompts=class_prompts,
    )


def custom_prompts(classes: Sequence[str], templates: Sequence[str], provenance: str = "custom") -> PromptSet:
    """A PromptSet built in code (e.g. class names from a dataset plus the generic CLIP template)."""
    return PromptSet(
        classes=tuple(classes),
        templates=tuple(_as_template(t, "custom prompts") for t in templates),
        provenance=provenance,
    )


def align_prompts(
    prompts: PromptSet,
    class_names: Sequence[str],
    folder_names: Sequence[str] | None = None,
    *,
    dataset: str,
) -> PromptSet:
    """`prompts` with its classes in the dataset's label order, matched BY NAME, never by position.

    class_names / folder_names: the dataset's classes in label order (and their folder / raw names, if
    any). A prompt class matches a dataset class when one of the prompt file's names for it (its class
    name or its `folder_names` entry) equals one of the dataset's names for it, compared case-, space-
    and underscore-insensitively (data.sources.normalize_name); repeated names pair up in order. The same
    classes in another order are re-mapped (and logged); any unmatched name is a UserError listing both
    sides, since CLIP label i must mean the dataset's class i.
    """
    from zeroshot_adapt.data.sources import normalize_name

    where = prompts.source or "the prompt file"
    candidates: dict[str, list[int]] = defaultdict(list)  # normalized name -> prompt classes, in file order
    for names in (prompts.classes, prompts.folder_names or ()):
        for j, name in enumerate(names):
            if j not in candidates[normalize_name(name)]:
                candidates[normalize_name(name)].append(j)
    order: list[int] = []
    used: set[int] = set()
    unmatched: list[str] = []
    for i, name in enumerate(class_names):
        aliases = [name] + ([folder_names[i]] if folder_names is not None else [])
        found = next((j for alias in aliases for j in candidates.get(normalize_name(alias), []) if j not in used), None)
        if found is None:
            unmatched.append(name)
        else:
            order.append(found)
            used.add(found)
    if unmatched or len(prompts.classes) != len(class_names):
        extra = [prompts.classes[j] for j in range(len(prompts.classes)) if j not in used]
        raise UserError(
            f"the classes of prompt file {where!r} ({len(prompts.classes)}) do not match those of dataset "
            f"{dataset!r} ({len(class_names)}); classes are matched by name, never by position. "
            f"Only in the prompt file: {_listing(extra)}. Only in the dataset: {_listing(unmatched)}. "
            "Rename them, or add a \"folder_names\" list to the prompt file giving the dataset's name of each class"
        )
    if order != list(range(len(order))):
        first = next(i for i, j in enumerate(order) if i != j)
        log.warning(
            "prompt file %s lists the classes of dataset %s in another order: %d classes re-mapped by name to the "
            "dataset's label order (e.g. dataset class %d %r is class %d of the file)",
            where, dataset, sum(i != j for i, j in enumerate(order)), first, class_names[first], order[first],
        )
        return prompts.reordered(order)
    return prompts


def _listing(names: Sequence[str], limit: int = 10) -> str:
    if not names:
        return "none"
    return ", ".join(map(repr, names[:limit])) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def default_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet prompt templates, imported from open_clip (never retyped), with `{}` slots."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(_as_template(t, "open_clip OPENAI_IMAGENET_TEMPLATES") for t in OPENAI_IMAGENET_TEMPLATES)


def _read_lines(path: str, what: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{what} file {path!r} does not exist" + (" (it is a folder)" if file.is_dir() else ""))
    try:
        text = file.read_text(encoding="utf-8-sig")  # tolerates a byte-order mark
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{what} file {path!r} cannot be read as UTF-8 text: {error}") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:  # trailing blank lines are harmless
        lines.pop()
    if not lines:
        raise UserError(f"{what} file {path!r} is empty: write one entry per line")
    blank = [number for number, line in enumerate(lines, 1) if not line]
    if blank:
        raise UserError(f"{what} file {path!r}: line(s) {', '.join(map(str, blank))} are empty; "
                        "remove them (one entry per line)")
    return lines


def read_classes_file(path: str) -> tuple[str, ...]:
    """Class names, one per line, in label order (a `--classes` file). An empty or missing file, empty
    lines and repeated names (compared case- and space-insensitively) are UserErrors naming them."""
    from zeroshot_adapt.data.sources import normalize_name

    names = _read_lines(path, "classes")
    seen: dict[str, int] = {}
    repeated: list[str] = []
    for number, name in enumerate(names, 1):
        key = normalize_name(name)
        if key in seen:
            repeated.append(f"{name!r} (lines {seen[key]} and {number})")
        else:
            seen[key] = number
    if repeated:
        raise UserError(f"classes file {path!r} names a class twice: {', '.join(repeated)}; each class once")
    if len(names) < 2:
        raise UserError(f"classes file {path!r} names {len(names)} class ({names[0]!r}); at least 2 are needed "
                        "(a softmax over one class is always 1.0, so every image would pass any tau_clip)")
    return tuple(names)


def read_templates_file(path: str) -> tuple[str, ...]:
    """Prompt templates, one per line, each with a `{}` (or CLIP_benchmark's `{c}`) class slot."""
    return tuple(_as_template(line, f"templates file {path!r}") for line in _read_lines(path, "templates"))
