"""Prompt files: per-dataset class names and templates, shipped in `prompts/` (format: prompts/README.md).

A file is JSON: {"dataset", "classes", "templates", "provenance", optional "folder_names"}.
`classes` / `templates` may instead name data that open_clip ships, e.g.
"open_clip:IMAGENET_CLASSNAMES" and "open_clip:OPENAI_IMAGENET_TEMPLATES" (imported, never retyped).
Templates use `{}` as the class-name slot.
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


@dataclass(frozen=True)
class PromptSet:
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    provenance: str = ""
    source: str = ""
    folder_names: tuple[str, ...] | None = None

    def texts_for(self, class_name: str) -> list[str]:
        return [template.format(class_name) for template in self.templates]

    def digest(self) -> str:
        """sha256 over the class names and templates: part of the prediction cache identity."""
        payload = json.dumps({"classes": self.classes, "templates": self.templates}, ensure_ascii=False)
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
    text = template("{}") if callable(template) else template  # open_clip ships templates as lambdas
    if not isinstance(text, str) or "{}" not in text:
        raise UserError(f"{source}: template {text!r} has no '{{}}' slot for the class name")
    return text


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
    for key in ("classes", "templates"):
        if key not in data:
            raise UserError(f"prompt file {source!r} has no {key!r} entry")
    classes = tuple(str(c) for c in _resolve_open_clip(data["classes"], "classes", source))
    templates = tuple(_as_template(t, source) for t in _resolve_open_clip(data["templates"], "templates", source))
    if not classes or not templates:
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
