"""Manifests and the per-rater table importer (on the real AVT ratings when they are present)."""

import json
import os
from pathlib import Path

import pytest

from zreward.data import RatedItem, import_avt, load_manifest, write_manifest
from zreward.metrics import evaluate, hpa

def _shared_data() -> Path:
    """The real rating data: $ZREWARD_SHARED_DATA, else shared/data beside the checkout, else /work/shared/data."""
    if os.environ.get("ZREWARD_SHARED_DATA"):
        return Path(os.environ["ZREWARD_SHARED_DATA"])
    beside = Path(__file__).resolve().parents[3] / "shared" / "data"
    return beside if beside.exists() else Path("/work/shared/data")


SHARED = _shared_data()
AVT = SHARED / "avt_ai_images"


def test_manifest_round_trip(tmp_path):
    items = [
        RatedItem(prompt="a red car", image=str(tmp_path / "img" / "a.jpg"), dimension="alignment", score=4.5,
                  ratings=[4, 5, 5], group="p1"),
        RatedItem(prompt="a red car", image=str(tmp_path / "img" / "b.jpg"), dimension="realism"),
    ]
    path = tmp_path / "m.jsonl"
    write_manifest(items, path, relative_to=tmp_path)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["image"] == os.path.join("img", "a.jpg")  # relative in the file
    back = load_manifest(path)
    assert back[0].image == str(tmp_path / "img" / "a.jpg")  # resolved against the manifest folder
    assert back[0].ratings == [4.0, 5.0, 5.0] and back[0].reference == 5.0
    assert back[1].group == "a red car" and back[1].score is None and back[1].reference is None


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "x", "image": "a.jpg"}', "'dimension' must be a non-empty string"),
    ('{"prompt": "x", "image": "a.jpg", "dimension": "alignment", "score": "4"}', "score must be a finite number"),
    ('{"prompt": "x", "image": "a.jpg", "dimension": "alignment", "ratings": [1, null]}', "each rating must be"),
    ('{"prompt": "x", "image": "a.jpg", "dimension": "alignment", "colour": 1}', r"unknown field\(s\) \['colour'\]"),
    ('{"prompt": "x", "image": "a.jpg", "dimension": "beauty"}', "dimension 'beauty' is not one of"),
    ('not json', "invalid JSON"),
])
def test_bad_manifest_lines_name_file_and_line(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "image": "a.jpg", "dimension": "realism"}\n' + line + "\n")
    with pytest.raises(ValueError, match=msg) as err:
        load_manifest(path, dimensions=("alignment", "realism", "aesthetics", "plausibility"))
    assert f"{path}:2" in str(err.value)


@pytest.mark.skipif(not AVT.exists(), reason=f"shared data not found at {AVT} (set ZREWARD_SHARED_DATA)")
def test_import_avt_real_ratings():
    items = import_avt(AVT)
    dims = {it.dimension for it in items}
    assert dims == {"alignment", "realism", "aesthetics"}
    assert len(items) == 145 * 3  # 145 images with files, three axes each
    assert all(os.path.exists(it.image) for it in items)
    assert all(len(it.ratings) >= 15 for it in items)  # about 23 raters per image and axis
    first = next(it for it in items if it.id == "craiyon/p01" and it.dimension == "aesthetics")
    assert first.prompt == "A red colored car" and first.group == "p01"
    # against the source's published per-image means (computed there on a filtered subset of raters):
    # a wrong image key or axis mapping would break this agreement
    import csv

    from scipy.stats import spearmanr

    published = {}
    with open(AVT / "all_ratings.csv", newline="") as f:
        for row in csv.DictReader(f):
            for axis, dim in (("appeal_mean", "aesthetics"), ("realism_mean", "realism"),
                              ("prompt_matching_mean", "alignment")):
                published[(row["image_key"], dim)] = float(row[axis])
    ours, theirs = [], []
    for it in items:
        if (it.id, it.dimension) in published:
            ours.append(sum(it.ratings) / len(it.ratings))
            theirs.append(published[(it.id, it.dimension)])
    assert len(ours) >= 400
    assert spearmanr(ours, theirs)[0] > 0.97
    assert sum(abs(a - b) for a, b in zip(ours, theirs)) / len(ours) < 0.15
    # a real evaluation: the raters' plain mean ranks images almost as the trimmed mean does
    ref = [it.reference for it in items]
    mean = [sum(it.ratings) / len(it.ratings) for it in items]
    rep = evaluate(mean, ref, [it.group for it in items], [it.dimension for it in items])
    assert rep["pooled"]["srcc"] > 0.95 and rep["realism"]["hpa"] > 0.85
    # a constant predictor ties every pair: HPA 0 under the SPEC's tie rule
    assert hpa([3.0] * len(items), ref, [f"{it.dimension}/{it.group}" for it in items]) == 0.0


def test_in_memory_images_are_named_by_their_content():
    """Items with an array image and no id took the array as id: evaluation crashed ('unhashable
    type'), and the teacher cache keyed them by the array's truncated repr, so two images that
    differ only inside shared one cache entry (silently wrong RISD targets)."""
    import numpy as np

    from zreward.evaluate import shard_by_image
    from zreward.train.teacher import item_key

    a = np.zeros((56, 56, 3), np.uint8)
    b = a.copy()
    b[28, 28, 0] = 1  # not visible in numpy's truncated repr
    ia, ib, ia2 = (RatedItem(prompt="p", image=x, dimension="realism", score=3.0) for x in (a, b, a.copy()))
    assert ia.id.startswith("array:") and ia.id == ia2.id != ib.id
    assert item_key(ia) != item_key(ib) and item_key(ia) == item_key(ia2)
    assert shard_by_image([ia, ib, ia2], 0, 1) == [0, 2, 1]  # one prefix pass per distinct image
    assert RatedItem(prompt="p", image=a, dimension="realism", id="mine").id == "mine"


def test_write_manifest_checks_before_writing_and_takes_paths_and_numpy(tmp_path):
    import numpy as np

    path = tmp_path / "m.jsonl"
    path.write_text("the old manifest\n")
    good = RatedItem(prompt="p", image=tmp_path / "i.png", dimension="realism", score=np.float32(3.5),
                     ratings=np.array([3, 4]))  # pathlib path, numpy score and ratings
    arr = RatedItem(prompt="p", image=np.zeros((8, 8, 3), np.uint8), dimension="realism")
    with pytest.raises(TypeError, match=r"item 1 \('array:[0-9a-f]+'\) has an in-memory image"):
        write_manifest([good, arr], path)
    assert path.read_text() == "the old manifest\n"  # it was truncated before: the file was opened first
    write_manifest([good], path)
    (back,) = load_manifest(path)
    assert back.image == str(tmp_path / "i.png") and back.score == 3.5 and back.ratings == [3.0, 4.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # no temporary file left


def test_files_saved_with_a_byte_order_mark_load(tmp_path):
    """Excel and many Windows tools write UTF-8 with a byte-order mark: the manifest's first line was
    'invalid JSON (Unexpected UTF-8 BOM)', a rating table's first column was not found, a config
    was not valid JSON."""
    from zreward.data import import_rating_table
    from zreward.train.config import TrainConfig

    line = json.dumps({"prompt": "a car", "image": "a.png", "dimension": "realism", "score": 4.0})
    (tmp_path / "m.jsonl").write_text(line + "\n", encoding="utf-8-sig")
    (item,) = load_manifest(tmp_path / "m.jsonl")
    assert item.prompt == "a car" and item.score == 4.0
    (tmp_path / "r.csv").write_text("image,axis,rating\nsd/p1,realism,4\nsd/p1,realism,5\n", encoding="utf-8-sig")
    (item,) = import_rating_table(tmp_path / "r.csv", image_path_of=str, prompt_of=lambda k: "p", group_of=str,
                                  axis_map={"realism": "realism"})
    assert item.ratings == [4.0, 5.0] and item.id == "sd/p1"
    (tmp_path / "c.json").write_text('{"method": "sft", "model": "m", "output_dir": "o"}', encoding="utf-8-sig")
    assert TrainConfig.from_file(str(tmp_path / "c.json")).method == "sft"


def test_a_json_array_manifest_loads_like_jsonl(tmp_path):
    """A JSON file holding one array of records (json.dump of a list) failed on its first line ('[')."""
    recs = [{"prompt": "a car", "image": "a.png", "dimension": "realism", "score": 4.0},
            {"prompt": "a dog", "image": "b.png", "dimension": "alignment", "ratings": [3, 4, 5]}]
    (tmp_path / "m.json").write_text(json.dumps(recs, indent=2))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert load_manifest(tmp_path / "m.json") == load_manifest(tmp_path / "m.jsonl")
    (tmp_path / "bad.json").write_text(json.dumps([recs[0], {"prompt": "x", "image": "c.png"}]))
    with pytest.raises(ValueError, match=r"bad.json: record 1: 'dimension' must be a non-empty string"):
        load_manifest(tmp_path / "bad.json")


def test_labels_given_from_python_or_a_table_must_be_finite_numbers(tmp_path):
    """RatedItem took NaN and inf (which pass every range check written as a comparison), a string
    score, a bool, and read ratings="345" as the three ratings 3, 4 and 5; a rating table's "nan"
    cell became a NaN rating.  numpy scalars and arrays are still taken."""
    import numpy as np

    from zreward.data import import_rating_table

    nan = float("nan")
    for kw, err, msg in ((dict(score=nan), ValueError, "RatedItem 'i': score must be a finite number, got nan"),
                         (dict(ratings=[3, float("inf")]), ValueError, "each rating must be a finite number, got inf"),
                         (dict(score="3.5"), ValueError, "score must be a finite number, got '3.5'"),
                         (dict(score=True), ValueError, "score must be a finite number, got True"),
                         (dict(ratings="345"), TypeError, "ratings must be a list of numbers, got the string '345'")):
        with pytest.raises(err, match=msg):
            RatedItem(prompt="p", image="x.png", dimension="realism", id="i", **kw)
    it = RatedItem(prompt="p", image="x.png", dimension="realism", score=np.int64(4), ratings=np.array([3.5, 4]))
    assert it.score == 4.0 and type(it.score) is float and it.ratings == [3.5, 4.0]
    (tmp_path / "r.csv").write_text("image,axis,rating\nsd/p1,realism,4\nsd/p1,realism,nan\n")
    with pytest.raises(ValueError, match=r"r.csv:3: rating 'nan' is not a finite number"):
        import_rating_table(tmp_path / "r.csv", image_path_of=str, prompt_of=lambda k: "p", group_of=str,
                            axis_map={"realism": "realism"})
