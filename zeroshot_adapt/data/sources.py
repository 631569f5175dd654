"""Where samples come from: image-folder trees, Hugging Face datasets (saved or from the hub), MNIST IDX
files and in-memory arrays (the scikit-learn digits demo).

Every source yields `SourceSplit`s: stable keys, a content id per key (for the fingerprint), labels
mapped onto the dataset's class order, and a picklable image loader. `registry.load_split` picks the split
(or makes a holdout) and wraps the result in a `SampleTable`.

Key policy (keys survive re-listing and re-ordering of the source, and are unique within a table):
- image folder: the file's path relative to the root, POSIX style (``train/cat/001.png``);
- Hugging Face: the Image feature's original file path when every row has one and they are unique,
  otherwise ``sha256:<32 hex>`` of the encoded image bytes;
- IDX / arrays: ``sha256:<32 hex>`` of the pixel array (dtype, shape and bytes).
Exact duplicates of content keys get a ``#1``, ``#2``... suffix, handed out in (label, path) order so the
assignment does not depend on the order of the source.

Content id (per sample; what the prediction cache compares before reusing a sample's prediction), chosen by
``data.fingerprint``:
- ``stat`` (default): for a file (image folders, path-keyed HF rows that point at files)
  ``stat:<size>:<mtime_ns>:<inode>``. An edit in place changes the size or the modification time; a swap
  of two files by renaming changes the inode behind each path even when sizes and times are equal. Cheap
  (one stat per file), but copying or moving the data elsewhere (new inodes) re-predicts it all;
- ``content``: ``sha256:<32 hex>`` of the file's bytes: survives copying, catches edits whose
  modification time was restored (``touch -r``, ``rsync -t``); costs one full read of the data per load.
- HF rows that carry their bytes: the sha256 of the bytes in ``content`` mode or when the dataset lives
  in memory; in ``stat`` mode, the byte length plus a stat of the dataset's Arrow files (re-saving the
  dataset re-predicts it, a same-size swap inside it cannot go unnoticed);
- empty for content-hash keys (IDX, arrays, HF rows without unique paths): the key is the content.
Fingerprint: sha256 over the sorted ``key<TAB>content id`` lines. Adding, removing or changing a sample
changes it; re-ordering does not.

Corrupt or truncated images: ``load_image`` raises ``CorruptImageError`` naming the file (or key);
``scan_images(table)`` lists every bad one up front. ``TableDataset`` (teacher cache, evaluation)
catches it and skips-and-counts; the training views replace a corrupt item by the next readable one
(data/datasets.py). An image that cannot be read for a reason of the system rather than of its bytes
(any OSError with an errno: permissions, EIO, too many open files, ...) is retried with backoff
(``RETRY_DELAYS_S``) and, if that persists, raises ``ImageReadError`` naming the file — never a
``CorruptImageError``, so a passing problem is never recorded as a corrupt image.

Folder walks follow symbolic links but never enter the same directory twice (tracked by
(st_dev, st_ino)): a link back to an ancestor (``Forest/loop -> ..``) or a second link to a listed
directory is skipped with a warning. FIFOs, sockets and devices are skipped (never opened: a FIFO would
block), and so are dangling links; each kind is counted in one warning per split.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import logging
import os
import re
import stat
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zeroshot_adapt.data.base import UNKNOWN_LABEL, IndexedLoader, SampleTable, fingerprint_of
from zeroshot_adapt.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Split folder / split names we recognise, most specific first.
TRAIN_SPLIT_NAMES = ("train", "training")
TEST_SPLIT_NAMES = ("test", "testing", "validation", "val", "valid")
CONTENT_KEY_PREFIX = "sha256:"
_CONTENT_KEY_HEX = 32  # 128 bits of sha256: collisions are not a practical concern
_HF_BATCH = 1000  # rows per Arrow batch when reading key material from a Hugging Face dataset


class CorruptImageError(UserError):
    """An image that cannot be decoded (corrupt, truncated, not an image). `path` names it."""

    def __init__(self, path: str, reason: str = "") -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"corrupt or unreadable image {path!r}" + (f": {reason}" if reason else ""))


# --------------------------------------------------------------------------------------------- images

RETRY_DELAYS_S = (0.05, 0.25, 1.0)  # waits before the 2nd, 3rd and 4th attempt at a failing file operation
# errnos that no retry can fix (the file is gone, or is not what it should be): fail at once
_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG})


class ImageReadError(UserError):
    """An image that could not be read for a reason of the system (permissions, I/O error, too many open
    files, ...), not of its content. Never recorded as a corrupt image: fix the cause and run again."""

    def __init__(self, path: str, reason: str = "") -> None:  # one-argument form: how torch rebuilds it
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot read image {path!r}: {reason}. This is a problem of the file system or its permissions, "
            "not of the image (it was not recorded as corrupt): fix it and run the same command again"
            if reason else path
        )


def _describe_os_error(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "")
    return f"{error.strerror or error} ({name})" if name else str(error)


def retry_os_errors(action: Callable[[], Any], *, what: str) -> Any:
    """`action()`, retried after RETRY_DELAYS_S when it raises an OSError with an errno that may pass
    (EACCES, EIO, EMFILE, EAGAIN, ...); the last error (or a permanent one) is raised as is."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return action()
        except OSError as error:
            if error.errno is None or error.errno in _PERMANENT_ERRNOS or delay is None:
                raise
            log.debug("%s: %s; retrying in %.2f s", what, error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _decode_once(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()  # force decoding now: truncated files fail here, not later in a worker
            return image.convert("RGB")
    except OSError as error:
        if error.errno is not None:
            raise  # the system's problem (permissions, EIO, ...), not the image's: retried by the caller
        raise CorruptImageError(name, str(error) or type(error).__name__) from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(name, str(error) or type(error).__name__) from None


def decode_image(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    """Fully decode an image file or encoded bytes into an RGB PIL image (grayscale/palette/alpha
    converted). Raises CorruptImageError(name) when its bytes are not a readable image, ImageReadError
    when the file cannot be read (after retries: see the module docstring)."""
    try:
        return retry_os_errors(lambda: _decode_once(source, name), what=f"reading image {name!r}")
    except OSError as error:
        reason = _describe_os_error(error)
        if error.errno == errno.ENOENT:
            reason += " — deleted or moved since the dataset was listed?"
        raise ImageReadError(name, reason) from None


def scan_images(table: SampleTable, *, progress: bool = False) -> list[str]:
    """Decode every image of `table`; return the paths (or keys) of those that fail, in table order."""
    indices: Iterable[int] = range(len(table))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"scanning {table.dataset}/{table.split}", unit="img")
    bad = []
    for index in indices:
        try:
            table.load_image(index)
        except CorruptImageError as error:
            bad.append(error.path)
    return bad


class FileImageLoader:
    """index -> RGB image read from `paths[index]`; errors name the path. The file is stat'ed first: a
    FIFO, socket or device is never opened (opening a FIFO blocks until someone writes to it)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __call__(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            mode = retry_os_errors(lambda: os.stat(path).st_mode, what=f"stat {path!r}")
        except OSError as error:
            raise ImageReadError(path, _describe_os_error(error)) from None
        if not stat.S_ISREG(mode):
            raise ImageReadError(path, "not a regular file (a FIFO, socket or device?)")
        return decode_image(path, path)


class ArrayImageLoader:
    """index -> RGB image from a uint8 array [N, H, W] (grayscale) or [N, H, W, 3]."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __call__(self, index: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.images[index])).convert("RGB")


class HFImageLoader:
    """index -> RGB image from a Hugging Face dataset whose image column is cast to Image(decode=False)."""

    def __init__(self, dataset: Any, column: str, names: Sequence[str]) -> None:
        self.dataset = dataset
        self.column = column
        self.names = list(names)  # what errors call the row: its key

    def __call__(self, index: int) -> Image.Image:
        cell = self.dataset[int(index)][self.column] or {}
        data, path = cell.get("bytes"), cell.get("path")
        name = self.names[index] if path in (None, self.names[index]) else f"{self.names[index]} ({path})"
        if data is None and not path:
            raise CorruptImageError(name, "the row holds no image")
        return decode_image(data if data is not None else path, name)


# ----------------------------------------------------------------------------------------------- keys


def content_digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return CONTENT_KEY_PREFIX + digest.hexdigest()[:_CONTENT_KEY_HEX]


def array_digest(array: np.ndarray) -> str:
    header = f"{array.dtype.str}{tuple(array.shape)}".encode()
    return content_digest(header, np.ascontiguousarray(array).tobytes())


def dedupe_content_keys(digests: Sequence[str], labels: Sequence[int], paths: Sequence[str] | None = None) -> list[str]:
    """Make content-hash keys unique: the 2nd, 3rd... exact duplicate get '#1', '#2'... in (label, path)
    order, so the assignment does not depend on the order of the source."""
    groups: dict[str, list[int]] = defaultdict(list)
    for position, digest in enumerate(digests):
        groups[digest].append(position)
    keys = list(digests)
    for positions in groups.values():
        if len(positions) < 2:
            continue
        ordered = sorted(positions, key=lambda p: (int(labels[p]), paths[p] if paths else ""))
        for rank, position in enumerate(ordered[1:], start=1):
            keys[position] = f"{digests[position]}#{rank}"
    return keys


# ---------------------------------------------------------------------------------------- content ids

FINGERPRINT_MODES = ("stat", "content")
"""Valid ``data.fingerprint`` values (see the module docstring)."""
_HASH_THREADS = 8  # file hashing is I/O bound and hashlib releases the GIL: a few threads overlap the reads


def _check_fingerprint_mode(mode: str) -> None:
    if mode not in FINGERPRINT_MODES:
        raise UserError(f"data.fingerprint={mode!r} must be one of {', '.join(FINGERPRINT_MODES)}")


def _file_stat_id(path: str | os.PathLike) -> str:
    info = os.stat(path)
    return f"stat:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}"


def _file_content_hash(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return CONTENT_KEY_PREFIX + hashlib.file_digest(handle, "sha256").hexdigest()[:_CONTENT_KEY_HEX]


def file_content_ids(paths: Sequence[str | os.PathLike], mode: str) -> list[str]:
    """The content id of each file (see the module docstring): a stat id, or the sha256 of its bytes."""
    _check_fingerprint_mode(mode)
    one = _file_stat_id if mode == "stat" else _file_content_hash

    def identify(path: str | os.PathLike) -> str:
        try:
            return one(path)
        except OSError as error:
            raise UserError(f"cannot read {str(path)!r} to fingerprint the dataset: {error}") from None

    if mode == "stat" or len(paths) < 2:
        return [identify(path) for path in paths]
    from concurrent.futures import ThreadPoolExecutor

    log.info("hashing the contents of %d files (data.fingerprint=content)", len(paths))
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(paths))) as pool:
        return list(pool.map(identify, paths))


# ------------------------------------------------------------------------------------------- classes


def normalize_name(name: str) -> str:
    """Case-, underscore- and space-insensitive form used to match folder / label names to class names."""
    return re.sub(r"[\s_]+", " ", str(name)).strip().casefold()


@dataclass(frozen=True)
class ClassSpace:
    """The dataset's classes in label order, and how raw names (folders, string labels, ClassLabel names)
    map onto them: exact `folder_names` first, then class / folder names compared by `normalize_name`,
    then (if every raw name is a number) the number itself as the label id."""

    names: tuple[str, ...]
    folder_names: tuple[str, ...] | None = None
    source: str = ""  # where the names come from, for error messages

    def __len__(self) -> int:
        return len(self.names)

    def index_of(self, raw: str) -> int | None:
        exact, loose = self._lookup
        if raw in exact:
            return exact[raw]
        return loose.get(normalize_name(raw))

    @cached_property
    def _lookup(self) -> tuple[dict[str, int], dict[str, int]]:
        exact = {name: i for i, name in enumerate(self.folder_names or ())}
        loose: dict[str, int] = {}
        for names in (self.names, self.folder_names or ()):
            for i, name in enumerate(names):
                loose.setdefault(normalize_name(name), i)
        return exact, loose

    def map_names(self, raw_names: Sequence[str], *, what: str) -> list[int] | None:
        """Label ids for `raw_names` if every one of them is recognised, else None."""
        indices = [self.index_of(raw) for raw in raw_names]
        if all(i is not None for i in indices):
            return [int(i) for i in indices]  # type: ignore[arg-type]
        if raw_names and all(str(raw).isdigit() for raw in raw_names):
            numbers = [int(raw) for raw in raw_names]
            if max(numbers) < len(self.names):
                log.info("%s are label ids (0..%d); using them as such", what, len(self.names) - 1)
                return numbers
        return None

    def require_names(self, raw_names: Sequence[str], *, what: str, where: str) -> list[int]:
        mapped = self.map_names(raw_names, what=what)
        if mapped is None:
            unknown = [raw for raw in raw_names if self.index_of(raw) is None]
            expected = self.folder_names or self.names
            shown = ", ".join(map(repr, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise UserError(
                f"{where}: {len(unknown)} {what} match none of the {len(self.names)} classes of "
                f"{self.source or 'this dataset'}: {shown}; expected names such as "
                f"{', '.join(map(repr, expected[:5]))}"
            )
        return mapped


# ------------------------------------------------------------------------------------------- splits


@dataclass
class SourceSplit:
    """One split as read from a source, before the train/test choice. Parallel lists, one entry per sample."""

    keys: list[str]
    content_ids: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...]
    load_image: Callable[[int], Image.Image]

    def __post_init__(self) -> None:
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("sample keys are not unique")  # a bug in a source, not user input

    def fingerprint(self, positions: np.ndarray | None = None) -> str:
        chosen = range(len(self.keys)) if positions is None else positions
        lines = sorted(f"{self.keys[p]}\t{self.content_ids[p]}" for p in chosen)
        return fingerprint_of(["zeroshot-adapt sample list v1", *lines])

    def to_table(self, dataset: str, split: str, positions: np.ndarray | None = None) -> SampleTable:
        if positions is None:
            keys, labels, loader = list(self.keys), np.asarray(self.labels, np.int64), self.load_image
        else:
            positions = np.asarray(positions, dtype=np.int64)
            keys = [self.keys[p] for p in positions]
            labels = np.asarray(self.labels, np.int64)[positions]
            loader = IndexedLoader(self.load_image, positions)
        return SampleTable(
            dataset=dataset,
            split=split,
            keys=keys,
            labels=labels,
            class_names=tuple(self.class_names),
            load_image=loader,
            fingerprint=self.fingerprint(positions),
            content_ids=list(self.content_ids) if positions is None else [self.content_ids[p] for p in positions],
        )




def holdout_positions(
    keys: Sequence[str], labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified holdout for single-split sources: (train positions, test positions).

    Within each class (unlabeled samples form one group) samples are ranked by sha256(seed, key) and the
    first round(fraction * n_class) go to test. Depends only on the keys, labels and seed, so it is the same
    however the source is ordered, and adding a sample moves at most a few others.
    `fraction == 0` is the transductive setting: train and test are both the whole split.
    """
    everything = np.arange(len(keys), dtype=np.int64)
    if fraction == 0:
        return everything, everything
    labels = np.asarray(labels)
    test: list[int] = []
    for label in np.unique(labels):
        members = everything[labels == label]
        ranks = sorted(members, key=lambda p: hashlib.sha256(f"{seed}\0{keys[p]}".encode()).digest())
        test.extend(int(p) for p in ranks[: int(round(fraction * len(members)))])
    is_test = np.zeros(len(keys), dtype=bool)
    is_test[test] = True
    return everything[~is_test], everything[is_test]


def pick_split(available: Sequence[str], preferred: Sequence[str | None]) -> str | None:
    """The first of `preferred` that is in `available` (case-insensitive), as spelled in `available`."""
    by_folded = {name.casefold(): name for name in available}
    for name in preferred:
        if name and name.casefold() in by_folded:
            return by_folded[name.casefold()]
    return None


class Source:
    """A place samples come from, holding one or more named splits."""

    description: str = ""
    fingerprint: str = "stat"  # how content ids are made: one of FINGERPRINT_MODES (set with `with_fingerprint`)

    def with_fingerprint(self, mode: str) -> Source:
        """Make content ids by `mode` ("stat" or "content"); returns self."""
        _check_fingerprint_mode(mode)
        self.fingerprint = mode
        return self

    def split_names(self) -> list[str]:
        raise NotImplementedError

    def resolve_split(self, name: str) -> str | None:
        """The source's spelling of split `name`, or None if it has no such split."""
        return pick_split(self.split_names(), [name])

    def read(self, split: str) -> SourceSplit:
        raise NotImplementedError


# ------------------------------------------------------------------------------------- image folders


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_dir(path: Path) -> list[os.DirEntry]:
    """The entries of `path`, sorted by name; transient errors retried, then a UserError naming it."""
    def scan() -> list[os.DirEntry]:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda entry: entry.name)

    try:
        return retry_os_errors(scan, what=f"listing {str(path)!r}")
    except OSError as error:
        raise UserError(f"cannot list directory {str(path)!r}: {_describe_os_error(error)}") from None


def _subdirs(path: Path) -> list[str]:
    """Names of the (non-hidden) folders in `path`, links to folders included, sorted."""
    names = []
    for entry in _list_dir(path):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                names.append(entry.name)
        except OSError:  # a link that cannot be followed: not a folder
            continue
    return names


_EXAMPLES = 3  # paths quoted per kind in the walk warning


@dataclass
class WalkReport:
    """What a folder walk skipped, by kind (paths)."""

    repeated_dirs: list[str] = field(default_factory=list)  # "link -> the directory it repeats"
    dangling: list[str] = field(default_factory=list)  # links (named like images) to nothing
    special: list[str] = field(default_factory=list)  # FIFOs, sockets, devices named like images

    @property
    def skipped(self) -> int:
        return len(self.repeated_dirs) + len(self.dangling) + len(self.special)

    def warn(self, where: str) -> None:
        """One warning listing every kind that was skipped (nothing when nothing was)."""
        parts = []
        for items, what in (
            (self.repeated_dirs, "link(s) to a directory already listed (a symlink loop or a second link to it), "
                                 "not followed"),
            (self.dangling, "dangling link(s)"),
            (self.special, "FIFO(s), socket(s) or device(s) named like images, never opened"),
        ):
            if items:
                shown = ", ".join(items[:_EXAMPLES]) + (" ..." if len(items) > _EXAMPLES else "")
                parts.append(f"{len(items)} {what}: {shown}")
        if parts:
            log.warning("%s: skipped %s", where, "; ".join(parts))


class FolderWalker:
    """Lists image files under folders, following links but never entering a directory twice.

    Directories are identified by (st_dev, st_ino) of their target; `mark` pre-registers folders (the
    root, split and class folders) that a link inside a class folder must not lead back into. Only
    links are stat'ed beyond what `os.scandir` already knows, so a walk costs no syscall per file."""

    def __init__(self) -> None:
        self.visited: dict[tuple[int, int], str] = {}
        self.report = WalkReport()

    def mark(self, path: Path) -> None:
        try:
            info = os.stat(path)
        except OSError:
            return
        if info.st_ino:  # some filesystems report no inode numbers: nothing to track there
            self.visited.setdefault((info.st_dev, info.st_ino), str(path))

    def _kind(self, entry: os.DirEntry) -> tuple[str, tuple[int, int] | None]:
        """("dir", identity) / ("file", None) / ("special", None) / ("dangling", None), following links."""
        try:
            if not entry.is_symlink():
                if entry.is_dir(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    return "dir", (info.st_dev, info.st_ino)
                return ("file" if entry.is_file(follow_symlinks=False) else "special"), None
            info = retry_os_errors(lambda: os.stat(entry.path), what=f"following link {entry.path!r}")
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return "dangling", None
            raise UserError(f"cannot read {entry.path!r}: {_describe_os_error(error)}") from None
        if stat.S_ISDIR(info.st_mode):
            return "dir", (info.st_dev, info.st_ino)
        return ("file" if stat.S_ISREG(info.st_mode) else "special"), None

    def images(self, path: Path, *, recursive: bool = True) -> Iterator[Path]:
        """Image files under `path`: its own files in name order, then each subfolder's (depth first)."""
        subdirs = []
        for entry in _list_dir(path):
            if entry.name.startswith("."):
                continue
            kind, identity = self._kind(entry)
            if kind == "dir":
                if recursive:
                    subdirs.append((entry.path, identity))
            elif _is_image_file(entry.name):
                if kind == "file":
                    yield Path(entry.path)
                else:
                    (self.report.dangling if kind == "dangling" else self.report.special).append(entry.path)
        for subdir, identity in subdirs:
            if identity is not None and identity[1]:
                if identity in self.visited:
                    self.report.repeated_dirs.append(f"{subdir} -> {self.visited[identity]}")
                    continue
                self.visited[identity] = subdir
            yield from self.images(Path(subdir))


def list_image_files(root: Path, description: str) -> tuple[list[Path], list[str]]:
    """Every image file under `root` (flat or nested; links followed once, never back into `root`), sorted by
    its key, the path relative to `root` in posix form; skipped entries are warned about once; UserError when
    there is none."""
    walker = FolderWalker()
    walker.mark(root)
    files = sorted(walker.images(root), key=lambda path: path.relative_to(root).as_posix())
    walker.report.warn(description)
    if not files:
        raise UserError(f"{description}: no image files found anywhere under {str(root)!r}")
    return files, [path.relative_to(root).as_posix() for path in files]


def is_image_folder(path: Path) -> bool:
    return path.is_dir() and next(FolderWalker().images(path), None) is not None


class ImageFolderSource(Source):
    """`root/<class>/<file>` (one split) or `root/<split>/<class>/<file>`; files directly inside a split
    folder (or the root) with no class folders at all are unlabeled (label -1).

    Class folders map to the dataset's classes through `ClassSpace` (prompt-file `folder_names`, class
    names, or numeric ids); without a ClassSpace the sorted folder names are the classes.

    unlabeled: every image anywhere under `root` is one unlabeled split ("all"; label -1, no class names):
    subfolders are organisation, not classes (`--classes FILE` names the classes instead)."""

    def __init__(self, root: Path, classes: ClassSpace | None, *, unlabeled: bool = False) -> None:
        self.root = root
        self.classes = classes
        self.unlabeled = unlabeled
        self.description = f"image folder {str(root)!r}" + (" (unlabeled)" if unlabeled else "")
        top = [] if unlabeled else _subdirs(root)
        self._split_layout = bool(top) and all(name.casefold() in TRAIN_SPLIT_NAMES + TEST_SPLIT_NAMES for name in top)
        self._top = top
        # Without a class list the classes are the sorted union of class folders over all splits, so that
        # train and test agree on label ids.
        bases = [root / name for name in top] if self._split_layout else [root]
        self._folder_classes = tuple(sorted({name for base in bases for name in _subdirs(base)}))

    def split_names(self) -> list[str]:
        return list(self._top) if self._split_layout else ["all"]

    def _walker(self) -> FolderWalker:
        """A walker that will not re-enter the root, a split folder or a class folder through a link
        (``Forest/loop -> ..`` would list every class again, labelled Forest)."""
        walker = FolderWalker()
        walker.mark(self.root)
        for base in [self.root / name for name in self._top] if self._split_layout else [self.root]:
            walker.mark(base)
            for name in _subdirs(base):
                walker.mark(base / name)
        return walker

    def read(self, split: str) -> SourceSplit:
        if self.unlabeled:
            return self._read_unlabeled()
        base = self.root / split if self._split_layout else self.root
        class_dirs = _subdirs(base)
        walker = self._walker()
        files: list[Path] = []
        raw_labels: list[str | None] = []
        if class_dirs:
            loose = [entry.name for entry in _list_dir(base) if _is_image_file(entry.name)]
            if loose:
                log.warning("%s: %d image files beside the class folders are ignored", base, len(loose))
            for class_dir in class_dirs:
                found = list(walker.images(base / class_dir))
                files.extend(found)
                raw_labels.extend([class_dir] * len(found))
        else:
            files = list(walker.images(base, recursive=False))
            raw_labels = [None] * len(files)
        walker.report.warn(f"{self.description} split {split!r}")
        if not files:
            raise UserError(f"{self.description}: no image files found under {str(base)!r}")
        if self.classes is not None:
            class_names = self.classes.names
            ids = self.classes.require_names(class_dirs, what="class folders", where=str(base)) if class_dirs else []
            id_of = dict(zip(class_dirs, ids, strict=True))
        else:
            if not self._folder_classes:
                raise UserError(f"{str(base)!r} has no class folders and the dataset has no class list: for "
                                "unlabeled images pass --classes FILE (one class name per line)")
            class_names = self._folder_classes
            id_of = {name: i for i, name in enumerate(class_names)}
        labels = np.array([UNKNOWN_LABEL if raw is None else id_of[raw] for raw in raw_labels], dtype=np.int64)
        keys = [path.relative_to(self.root).as_posix() for path in files]
        content_ids = file_content_ids(files, self.fingerprint)
        return SourceSplit(keys, content_ids, labels, tuple(class_names), FileImageLoader([str(p) for p in files]))


    def _read_unlabeled(self) -> SourceSplit:
        files, keys = list_image_files(self.root, self.description)
        labels = np.full(len(files), UNKNOWN_LABEL, dtype=np.int64)
        content_ids = file_content_ids(files, self.fingerprint)
        return SourceSplit(keys, content_ids, labels, (), FileImageLoader([str(p) for p in files]))


# ---------------------------------------------------------------------------------------- MNIST IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_PREFIXES = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian magic 0x0000 <dtype> <ndim>, ndim uint32 sizes
    (`>IIII` for images, `>II` for labels), then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise UserError(f"cannot read IDX file {str(path)!r}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise UserError(f"{str(path)!r} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(
            f"IDX file {str(path)!r} is truncated or padded: header says {shape}, "
            f"{expected} data bytes, found {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_idx(root: Path, prefix: str, kind: str, rank: int) -> Path | None:
    matches = sorted(root.glob(f"{prefix}-{kind}*idx{rank}-ubyte*"))
    return matches[0] if matches else None


def is_idx_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*idx3-ubyte*"))


class IdxSource(Source):
    """A folder of MNIST-style IDX files: `train-images-idx3-ubyte[.gz]` + `train-labels-idx1-ubyte[.gz]`
    and/or `t10k-images-...` + `t10k-labels-...` (splits "train" and "test")."""

    def __init__(self, root: Path, classes: ClassSpace | None) -> None:
        self.root = root
        self.classes = classes
        self.description = f"IDX folder {str(root)!r}"
        self._files = {}
        for split, prefix in IDX_PREFIXES.items():
            images, labels = _find_idx(root, prefix, "images", 3), _find_idx(root, prefix, "labels", 1)
            if images is not None and labels is not None:
                self._files[split] = (images, labels)
        if not self._files:
            raise UserError(
                f"{self.description} has no matching pair of images/labels IDX files "
                "(e.g. t10k-images-idx3-ubyte.gz with t10k-labels-idx1-ubyte.gz)"
            )

    def split_names(self) -> list[str]:
        return list(self._files)

    def read(self, split: str) -> SourceSplit:
        image_path, label_path = self._files[split]
        images, labels = read_idx(image_path), read_idx(label_path).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{str(image_path)!r} ({images.shape}) and {str(label_path)!r} ({labels.shape}) do not pair up"
            )
        return array_split(images.astype(np.uint8, copy=False), labels, self.classes)


def array_split(images: np.ndarray, labels: np.ndarray, classes: ClassSpace | None) -> SourceSplit:
    """A SourceSplit over in-memory uint8 images whose labels are already class ids."""
    labels = np.asarray(labels, dtype=np.int64)
    class_names = classes.names if classes is not None else tuple(str(i) for i in range(int(labels.max()) + 1))
    if labels.size and (labels.min() < UNKNOWN_LABEL or labels.max() >= len(class_names)):
        raise UserError(f"labels run from {labels.min()} to {labels.max()} but there are {len(class_names)} classes")
    digests = [array_digest(image) for image in images]
    keys = dedupe_content_keys(digests, labels)
    return SourceSplit(keys, [""] * len(keys), labels, tuple(class_names), ArrayImageLoader(images))


class ArraySource(Source):
    """Named splits of one in-memory image array (the scikit-learn digits demo)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        splits: dict[str, np.ndarray],
        classes: ClassSpace | None,
        description: str,
    ) -> None:
        self.images, self.labels, self.splits, self.classes = images, labels, splits, classes
        self.description = description

    def split_names(self) -> list[str]:
        return list(self.splits)

    def read(self, split: str) -> SourceSplit:
        positions = np.asarray(self.splits[split], dtype=np.int64)
        return array_split(self.images[positions], self.labels[positions], self.classes)


# ------------------------------------------------------------------------------------- Hugging Face

_LABEL_COLUMN_GUESSES = ("label", "labels", "fine_label", "cls", "class", "target")


def _pick_columns(dataset: Any, image_column: str, label_column: str | None, where: str) -> tuple[str, str | None]:
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    features = dataset.features
    if image_column not in features:
        candidates = [name for name, feature in features.items() if isinstance(feature, ImageFeature)]
        if len(candidates) != 1:
            raise UserError(f"{where}: no image column {image_column!r}; columns: {', '.join(features)}")
        log.info("%s: image column %r not found, using %r", where, image_column, candidates[0])
        image_column = candidates[0]
    if label_column is None or label_column not in features:
        guesses = [name for name in _LABEL_COLUMN_GUESSES if name in features]
        guesses += [n for n, f in features.items() if isinstance(f, ClassLabel) and n not in guesses]
        if label_column is not None:
            log.info("%s: label column %r not found, using %r", where, label_column, guesses[:1] or None)
        label_column = guesses[0] if guesses else None
    return image_column, label_column


def _hf_labels(dataset: Any, column: str | None, classes: ClassSpace | None, where: str) -> tuple[np.ndarray, tuple]:
    """Labels mapped onto the class order, and the class names."""
    from datasets import ClassLabel

    if column is None:
        if classes is None:
            raise UserError(f"{where}: no label column and no class list for this dataset")
        return np.full(len(dataset), UNKNOWN_LABEL, dtype=np.int64), classes.names
    feature = dataset.features[column]
    values = dataset.select_columns([column]).with_format("arrow")[:].column(column).to_pylist()
    if isinstance(feature, ClassLabel):
        raw_names = list(feature.names)
        if classes is None:
            mapping = list(range(len(raw_names)))
            class_names = tuple(raw_names)
        else:
            class_names = classes.names
            mapping = classes.map_names(raw_names, what=f"{column!r} label names")
            if mapping is None:
                if len(raw_names) != len(classes):
                    raise UserError(
                        f"{where}: column {column!r} has {len(raw_names)} classes, {classes.source} has "
                        f"{len(classes)}; names such as {raw_names[:3]} do not match either"
                    )
                mapping = list(range(len(raw_names)))  # same count, different spelling: ids are the order
        table = np.asarray(mapping + [UNKNOWN_LABEL], dtype=np.int64)  # index -1 -> unknown
        ids = np.asarray([UNKNOWN_LABEL if v is None else v for v in values], dtype=np.int64)
        return table[ids], tuple(class_names)
    if values and all(isinstance(v, str) or v is None for v in values):
        distinct = sorted({v for v in values if v is not None})
        if classes is None:
            id_of = {name: i for i, name in enumerate(distinct)}
            class_names = tuple(distinct)
        else:
            ids = classes.require_names(distinct, what=f"{column!r} values", where=where)
            id_of = dict(zip(distinct, ids, strict=True))
            class_names = classes.names
        return np.asarray([UNKNOWN_LABEL if v is None else id_of[v] for v in values], dtype=np.int64), class_names
    ids = np.asarray([UNKNOWN_LABEL if v is None else int(v) for v in values], dtype=np.int64)
    count = len(classes) if classes is not None else (int(ids.max()) + 1 if ids.size else 0)
    if ids.size and (ids.min() < UNKNOWN_LABEL or ids.max() >= count):
        raise UserError(f"{where}: column {column!r} holds ids {ids.min()}..{ids.max()}, but there are {count} classes")
    names = classes.names if classes is not None else tuple(str(i) for i in range(count))
    return ids, names


def _hf_key_material(dataset: Any, column: str) -> tuple[list[str | None], list[int | None]]:
    """Per row: the Image feature's stored path and encoded byte length (None where absent), read from
    Arrow without decoding."""
    import pyarrow.compute as pc

    paths: list[str | None] = []
    sizes: list[int | None] = []
    arrow = dataset.select_columns([column]).with_format("arrow")
    for start in range(0, len(dataset), _HF_BATCH):
        cells = arrow[start : start + _HF_BATCH].column(column)
        paths.extend(pc.struct_field(cells, "path").to_pylist())
        sizes.extend(pc.binary_length(pc.struct_field(cells, "bytes")).to_pylist())
    return paths, sizes


def _hf_content_digests(dataset: Any, column: str) -> list[str]:
    import pyarrow.compute as pc

    digests = []
    arrow = dataset.select_columns([column]).with_format("arrow")
    for start in range(0, len(dataset), _HF_BATCH):
        cells = arrow[start : start + _HF_BATCH].column(column)
        blobs = pc.struct_field(cells, "bytes").to_pylist()
        paths = pc.struct_field(cells, "path").to_pylist()
        for blob, path in zip(blobs, paths, strict=True):
            if blob is None and path and os.path.isfile(path):
                blob = Path(path).read_bytes()
            digests.append(content_digest(blob or b""))
    return digests


def _arrow_files_id(dataset: Any) -> str | None:
    """A stat id over the Arrow files that hold `dataset` (None for a dataset held in memory)."""
    files = sorted({entry["filename"] for entry in getattr(dataset, "cache_files", None) or []})
    if not files:
        return None
    return hashlib.sha256("\n".join(f"{name}\t{_file_stat_id(name)}" for name in files).encode()).hexdigest()[:32]


def _hf_path_content_ids(dataset: Any, column: str, paths: Sequence[str], sizes: Sequence[int | None],
                         mode: str) -> list[str]:
    """Content ids of path-keyed rows: files by `file_content_ids`; rows that carry their bytes by the bytes'
    sha256 (``content`` mode, or a dataset in memory) or by length + the Arrow files' stat id."""
    container = _arrow_files_id(dataset) if mode == "stat" else None
    on_disk = [i for i, size in enumerate(sizes) if size is None and os.path.isfile(paths[i])]
    ids = [""] * len(paths)
    for i, content in zip(on_disk, file_content_ids([paths[i] for i in on_disk], mode), strict=True):
        ids[i] = content
    embedded = [i for i, size in enumerate(sizes) if size is not None]
    if container is not None:
        for i in embedded:
            ids[i] = f"arrow:{container}:{sizes[i]}"
    elif embedded:
        digests = _hf_content_digests(dataset, column)
        for i in embedded:
            ids[i] = digests[i]
    return ids


def hf_split(
    dataset: Any,
    *,
    image_column: str,
    label_column: str | None,
    classes: ClassSpace | None,
    where: str,
    fingerprint: str = "stat",
) -> SourceSplit:
    """A SourceSplit over one `datasets.Dataset` (keys, labels, content ids, lazy image decoding)."""
    from datasets import Image as ImageFeature

    _check_fingerprint_mode(fingerprint)

    image_column, label_column = _pick_columns(dataset, image_column, label_column, where)
    if not isinstance(dataset.features[image_column], ImageFeature):
        raise UserError(f"{where}: column {image_column!r} is not an Image feature")
    dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    labels, class_names = _hf_labels(dataset, label_column, classes, where)
    paths, sizes = _hf_key_material(dataset, image_column)
    if all(paths) and len(set(paths)) == len(paths):
        keys = [str(p) for p in paths]
        content_ids = _hf_path_content_ids(dataset, image_column, keys, sizes, fingerprint)
    else:
        digests = _hf_content_digests(dataset, image_column)
        keys = dedupe_content_keys(digests, labels, [p or "" for p in paths])
        content_ids = [""] * len(keys)
    loader = HFImageLoader(dataset.select_columns([image_column]), image_column, keys)
    return SourceSplit(keys, content_ids, labels, tuple(class_names), loader)


def is_saved_hf_dataset(path: Path) -> bool:
    return (
        (path / "dataset_dict.json").is_file()
        or (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
    )


class HFDiskSource(Source):
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""

    def __init__(self, path: Path, *, image_column: str, label_column: str | None, classes: ClassSpace | None) -> None:
        from datasets import DatasetDict, load_from_disk

        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as error:
            raise UserError(f"cannot load the saved Hugging Face dataset at {str(path)!r}: {error}") from None
        self.splits = dict(loaded) if isinstance(loaded, DatasetDict) else {"all": loaded}
        self.path, self.image_column, self.label_column, self.classes = path, image_column, label_column, classes
        self.description = f"saved Hugging Face dataset {str(path)!r}"

    def split_names(self) -> list[str]:
        return list(self.splits)

    def read(self, split: str) -> SourceSplit:
        return hf_split(
            self.splits[split],
            image_column=self.image_column,
            label_column=self.label_column,
            classes=self.classes,
            where=f"{self.description} split {split!r}",
            fingerprint=self.fingerprint,
        )


# Hub copies known to load without a loading script, by the id of one that holds a script (REFERENCE.md 4).
SCRIPT_FREE_COPIES = {"tanganke/eurosat": "timm/eurosat-rgb"}
PARQUET_REVISION = "refs/convert/parquet"  # the hub's automatic parquet export of a dataset repository
_LOADING_SCRIPT = re.compile(r"[Dd]ataset scripts are no longer supported, but found (\S+)")
# Names (anywhere in an error's cause chain) of the exceptions that mean "the hub could not be reached".
_CONNECTION_ERRORS = frozenset({
    "ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "TimeoutError",
    "OfflineModeIsEnabled", "gaierror", "NewConnectionError", "MaxRetryError", "ProxyError", "SSLError",
})


def _is_connection_problem(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)) or type(current).__name__ in _CONNECTION_ERRORS:
            return True
        current = current.__cause__ or current.__context__
    return False


class HubSource(Source):
    """A dataset on the Hugging Face hub, read with `datasets.load_dataset` (cached by `datasets`).

    When the hub cannot be reached (checked with a short TCP probe so nothing hangs on retries) the load
    runs in offline mode, which still finds a copy in the local `datasets` cache; with no cached copy it
    fails with a UserError that says what to pass instead. Any other failure is reported with its real
    cause (a repository that still holds a loading script, an unknown split, a missing column, ...).

    revision: a branch, tag or commit of the hub repository (e.g. ``refs/convert/parquet``)."""

    def __init__(
        self,
        *,
        dataset: str,
        hf_id: str,
        hf_config: str | None,
        split_names: Sequence[str],
        image_column: str,
        label_column: str | None,
        classes: ClassSpace | None,
        gated: bool = False,
        revision: str | None = None,
    ) -> None:
        self.dataset, self.hf_id, self.hf_config, self.revision = dataset, hf_id, hf_config, revision
        self._split_names = [name for name in split_names if name]
        self.image_column, self.label_column, self.classes, self.gated = image_column, label_column, classes, gated
        self.description = f"Hugging Face hub dataset {hf_id!r}" + (f" (revision {revision!r})" if revision else "")

    def split_names(self) -> list[str]:
        return list(self._split_names)

    def resolve_split(self, name: str) -> str | None:
        return name  # the hub knows its splits; a wrong name fails in load_dataset with its own message

    def read(self, split: str) -> SourceSplit:
        loaded = self._load(split)
        return hf_split(
            loaded,
            image_column=self.image_column,
            label_column=self.label_column,
            classes=self.classes,
            where=f"{self.description} split {split!r}",
            fingerprint=self.fingerprint,
        )

    def _load(self, split: str) -> Any:
        import datasets

        offline = hub_offline() or not hub_reachable()
        try:
            with forced_offline(offline):
                return datasets.load_dataset(self.hf_id, self.hf_config, split=split, revision=self.revision)
        except Exception as error:  # third-party boundary: any failure becomes an actionable UserError
            raise UserError(self._explain(split, error, offline)) from error

    def _explain(self, split: str, error: Exception, offline: bool) -> str:
        name = f"{self.hf_id!r}" + (f" (config {self.hf_config!r})" if self.hf_config else "")
        name += f" at revision {self.revision!r}" if self.revision else ""
        text = str(error).strip()
        why = f"{type(error).__name__}: {' '.join(text.splitlines()[:3])}" if text else type(error).__name__
        local = ("--data-dir (data.data_dir), pointing at a local image folder (root/<class>/<image> or "
                 "root/<split>/<class>/<image>) or at a directory written by datasets' save_to_disk")
        script = _LOADING_SCRIPT.search(text)
        if script:
            choices = []
            if self.revision != PARQUET_REVISION:
                choices.append(
                    f"the hub's parquet export of the same repository, --set data.hf_revision={PARQUET_REVISION}"
                )
            if self.hf_id in SCRIPT_FREE_COPIES:
                choices.append(f"another hub copy without a script, --set data.hf_id={SCRIPT_FREE_COPIES[self.hf_id]}")
            choices.append(f"a local copy with {local}")
            return (
                f"the Hugging Face hub repository {name} of dataset {self.dataset!r} still holds a loading script "
                f"({script.group(1)}), which the installed datasets library (>= 4) refuses to run. Pass instead: "
                + "; or ".join(choices) + "."
            )
        if offline or _is_connection_problem(error):
            why += " [the hub is unreachable or HF_HUB_OFFLINE is set, and no cached copy was found]" if offline else ""
            gated = (
                f" {self.hf_id!r} is gated: accept its terms on huggingface.co and log in "
                "(`huggingface-cli login` or HF_TOKEN) before downloading."
                if self.gated
                else ""
            )
            return (
                f"could not download dataset {self.dataset!r} (split {split!r}) from the Hugging Face hub "
                f"{name}: {why}.{gated} Pass {local} instead."
            )
        hint = ""
        if type(error).__name__ == "DatasetNotFoundError":
            hint = (" Check the id (--set data.hf_id=...)" + (", accept the dataset's terms on huggingface.co and log "
                    "in (`huggingface-cli login` or HF_TOKEN)" if self.gated else "") + ".")
        elif "split" in text.lower():
            hint = f" Its splits differ from what was asked ({split!r}): set data.train_split / data.test_split."
        return (
            f"loading dataset {self.dataset!r} (split {split!r}) from the Hugging Face hub {name} failed: {why}."
            f"{hint} Or pass {local}."
        )


HUB_PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (HF_ENDPOINT) opens within `timeout` seconds.
    Runs in a daemon thread so a stuck DNS lookup cannot block the caller past the timeout."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextmanager
def forced_offline(enabled: bool) -> Iterator[None]:
    """Run `datasets` / `huggingface_hub` in offline mode (local cache only) while active."""
    saved: list[tuple[Any, bool]] = []
    if enabled:
        import datasets.config
        from huggingface_hub import constants

        for module in (constants, datasets.config):
            saved.append((module, module.HF_HUB_OFFLINE))
            module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in saved:
            module.HF_HUB_OFFLINE = value
