"""Rated-item manifests (JSONL) and importers for per-rater rating tables.

Manifest format: one JSON object per line, one line per (image, dimension) (a JSON file holding one
array of the same objects is read too)::

    {"prompt": "a red car", "image": "images/sd/p01.jpg", "dimension": "alignment",
     "score": 4.5, "ratings": [4, 5, 4, 5], "group": "p01", "id": "sd/p01"}

* ``prompt`` (str) and ``image`` (path; relative paths are resolved against the manifest's folder)
  are required; ``dimension`` is required and must be a rubric dimension when a rubric is given.
* ``score`` (a number) and/or ``ratings`` (list of numbers, one per rater) are the labels; training
  uses ``score`` (or the rater histogram as a soft label), evaluation uses the trimmed mean of
  ``ratings`` when present (SPEC section 2), else ``score``.  Unlabelled lines are allowed for scoring.
* ``group`` (optional) identifies same-prompt candidates for pairs; it defaults to the prompt text.
* ``id`` (optional) names the image; it defaults to the image path.

Loaders report the file and line of any bad record.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from .metrics import trimmed_mean

PathLike = Union[str, os.PathLike]


@dataclass
class RatedItem:
    """One image judged on one rubric dimension.  ``image`` is a file path or, for items made in
    Python, an HxWx3 uint8 array or a PIL image (any mode; read as RGB)."""

    prompt: str
    image: str
    dimension: str
    score: Optional[float] = None
    ratings: List[float] = field(default_factory=list)
    group: Optional[str] = None
    id: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.image, os.PathLike):
            self.image = os.fspath(self.image)
        _check_item_image(self.image, self.id)
        where = f"RatedItem{f' {self.id!r}' if self.id is not None else ''}"
        if self.score is not None:  # numpy scalars (np.float32 is not JSON-serialisable) -> float
            self.score = _num(self.score, "score", where)
        if isinstance(self.ratings, (str, bytes)):  # "345" was read as three ratings, 3, 4 and 5
            raise TypeError(f"{where}: ratings must be a list of numbers, got the string {self.ratings!r}")
        self.ratings = [_num(r, "each rating", where) for r in self.ratings] if self.ratings is not None else []
        if self.group is None:
            self.group = self.prompt
        if self.id is None:
            # an in-memory image is named by its content: its id keys the teacher cache and the
            # predictions, and the array itself (the id before) crashed evaluation (unhashable) while
            # its truncated repr let two different images share a cache entry
            self.id = self.image if isinstance(self.image, str) else _content_id(self.image)

    @property
    def labels(self) -> List[float]:
        """The item's score (when given) and every rating."""
        return ([self.score] if self.score is not None else []) + list(self.ratings)

    @property
    def reference(self) -> Optional[float]:
        """Trimmed mean of the ratings when there are any, else ``score``."""
        if self.ratings:
            return float(trimmed_mean([self.ratings])[0])
        return self.score


@contextlib.contextmanager
def atomic_path(path: PathLike):
    """A temporary path beside ``path``: renamed onto ``path`` when the block succeeds, removed when it
    fails, so a writer that dies half way never leaves a torn file where a good one was."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: PathLike):
    """A JSON file (UTF-8; a byte-order mark, as Excel and Windows tools write, is allowed); a parse
    error names the file and line."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _check_item_image(image, item_id) -> None:
    """A path, an HxWx3 uint8 array or a PIL image; anything else failed only when the first batch
    was read (a PIL image from a datasets row gave "stat: path should be string ... not Image")."""
    import numpy as np

    from .scorer import _is_pil, check_array_image

    where = f"RatedItem{f' {item_id!r}' if item_id is not None else ''}: image"
    if isinstance(image, np.ndarray):
        check_array_image(image, where)
    elif not (isinstance(image, str) or _is_pil(image)):
        hint = ("; a [3, H, W] float tensor in [0, 1]: (t.permute(1, 2, 0) * 255).round().byte().cpu().numpy()"
                if type(image).__name__ == "Tensor" else "")
        raise TypeError(f"{where} must be a file path, an HxWx3 uint8 array or a PIL image, got "
                        f"{type(image).__name__}{hint}")


def _content_id(image) -> str:
    """A stable name for an in-memory image: a hash of its shape, dtype and pixels."""
    import numpy as np

    a = np.ascontiguousarray(np.asarray(image))
    h = hashlib.sha1(f"{a.shape}|{a.dtype}|".encode())
    h.update(a.tobytes())
    return f"array:{h.hexdigest()[:16]}"


def _same_image(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b)
    return _content_id(a) == _content_id(b)  # two in-memory images (hashed only when their keys meet)


def check_one_image_per_key(items: Sequence[RatedItem], key: Callable[[RatedItem], object], what: str,
                            why: str) -> None:
    """Raise when two items share ``key(item)`` but hold different images: wherever results are
    keyed by an item's id (teacher targets, in-memory images in evaluation), the second image would
    silently take the first one's result.  The same image repeated (another dimension, a duplicate
    item) is fine."""
    seen: Dict[object, int] = {}
    for i, it in enumerate(items):
        j = seen.setdefault(key(it), i)
        if j != i and not _same_image(items[j].image, it.image):
            raise ValueError(f"{what} {j} and {i} share the id {it.id!r} (and prompt {it.prompt!r}) but hold different "
                             f"images; {why}, so one would take the other's result: give each image its own id "
                             "(or leave id unset: a path, or a hash of the pixels, names it)")


def _num(x, what: str, where: str) -> float:
    """A score or rating (from a manifest line or from Python): a finite real number (numpy scalars
    too; not a bool or a string), as a float.  NaN passed every later range check written as a
    comparison."""
    import numpy as np

    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ValueError(f"{where}: {what} must be a finite number, got {x!r}")
    return float(x)


def parse_record(obj: Mapping, where: str = "record", base_dir: Optional[Path] = None,
                 dimensions: Optional[Sequence[str]] = None) -> RatedItem:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "image", "dimension"):
        if not isinstance(obj.get(key), str) or not obj.get(key):
            raise ValueError(f"{where}: '{key}' must be a non-empty string")
    unknown = set(obj) - {"prompt", "image", "dimension", "score", "ratings", "group", "id"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    if dimensions is not None and obj["dimension"] not in dimensions:
        raise ValueError(f"{where}: dimension {obj['dimension']!r} is not one of {list(dimensions)}")
    score = None if obj.get("score") is None else _num(obj["score"], "score", where)
    ratings = obj.get("ratings") or []
    if not isinstance(ratings, list):
        raise ValueError(f"{where}: 'ratings' must be a list of numbers")
    ratings = [_num(r, "each rating", where) for r in ratings]
    image = obj["image"]
    if base_dir is not None and not os.path.isabs(image):
        image = str(base_dir / image)
    group = obj.get("group")
    return RatedItem(prompt=obj["prompt"], image=image, dimension=obj["dimension"], score=score, ratings=ratings,
                     group=None if group is None else str(group), id=None if obj.get("id") is None else str(obj["id"]))


def load_manifest(path: PathLike, dimensions: Optional[Sequence[str]] = None) -> List[RatedItem]:
    """Read a JSONL manifest (or a JSON file holding one array of such records); relative image paths
    are resolved against the manifest's folder."""
    path = Path(path)
    base = path.parent
    items = []
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):  # a JSON array of records, as json.dump(list) writes it
            records = read_json(path)
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON array of records")
            return [parse_record(obj, f"{path}: record {i}", base, dimensions) for i, obj in enumerate(records)]
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
            items.append(parse_record(obj, where, base, dimensions))
    return items


def missing_images(items: Iterable[RatedItem]) -> List[str]:
    """The image paths of ``items`` that are not files (sorted, each once); in-memory images count as present."""
    return sorted({it.image for it in items if isinstance(it.image, str) and not os.path.isfile(it.image)})


def write_manifest(items: Iterable[RatedItem], path: PathLike, relative_to: Optional[PathLike] = None) -> None:
    """Write items as JSONL (image paths made relative to ``relative_to`` when given).

    Every item is checked before the file is touched (an in-memory image cannot be written: a
    manifest holds paths), and the file is replaced in one step, so an error never leaves a
    truncated manifest where the old one was."""
    lines = []
    for i, it in enumerate(items):
        if not isinstance(it.image, str):
            raise TypeError(f"item {i} ({it.id!r}) has an in-memory image ({type(it.image).__name__}); a manifest "
                            "holds image paths: save the image to a file and give its path")
        rec = asdict(it)
        if relative_to is not None:
            rec["image"] = os.path.relpath(rec["image"], relative_to)
        rec = {k: v for k, v in rec.items() if v is not None and v != []}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)


#: AVT axis -> rubric dimension (SPEC section 1 / the data README); there is no plausibility axis.
AVT_AXES = {"prompt_matching": "alignment", "realism": "realism", "appeal": "aesthetics"}


def import_rating_table(
    ratings_csv: PathLike,
    *,
    image_path_of: Callable[[str], str],
    prompt_of: Callable[[str], str],
    group_of: Callable[[str], str],
    axis_map: Mapping[str, str],
    image_col: str = "image",
    axis_col: str = "axis",
    rating_col: str = "rating",
) -> List[RatedItem]:
    """Turn a per-rater rating table (one row per single rating) into rated items.

    Ratings of the same (image, axis) are collected into ``ratings``; ``score`` is their trimmed
    mean.  Axes missing from ``axis_map`` are skipped.  Items are sorted by (image, dimension).
    """
    collected: Dict[tuple, List[float]] = {}
    with open(ratings_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for col in (image_col, axis_col, rating_col):
            if col not in (reader.fieldnames or []):
                raise ValueError(f"{ratings_csv}: missing column {col!r} (columns: {reader.fieldnames})")
        for n, row in enumerate(reader, 2):
            axis = row[axis_col]
            if axis not in axis_map:
                continue
            try:
                value = float(row[rating_col])
            except ValueError:
                raise ValueError(f"{ratings_csv}:{n}: rating {row[rating_col]!r} is not a number") from None
            if not math.isfinite(value):  # float() reads "nan" and "inf"
                raise ValueError(f"{ratings_csv}:{n}: rating {row[rating_col]!r} is not a finite number")
            collected.setdefault((row[image_col], axis_map[axis]), []).append(value)
    items = []
    for (key, dim), rs in sorted(collected.items()):
        items.append(RatedItem(prompt=prompt_of(key), image=image_path_of(key), dimension=dim,
                               score=float(trimmed_mean([rs])[0]), ratings=rs, group=group_of(key), id=key))
    return items


def import_avt(root: PathLike) -> List[RatedItem]:
    """Items of the AVT AI-image set laid out as in ``shared/data/avt_ai_images`` (see its README).

    Image keys are ``<generator>/<prompt_id>``; the group is the prompt id, so pairs compare the
    generators' images of one prompt.  Keys without an image file are skipped (one is missing there).
    """
    root = Path(root)
    prompts = {}
    with open(root / "prompts.csv", newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            prompts[row["ID"]] = row["prompts"]
    items = import_rating_table(
        root / "ratings.csv",
        image_path_of=lambda k: str(root / "images" / f"{k}.jpg"),
        prompt_of=lambda k: prompts[k.split("/")[-1]],
        group_of=lambda k: k.split("/")[-1],
        axis_map=AVT_AXES,
    )
    return [it for it in items if os.path.exists(it.image)]
