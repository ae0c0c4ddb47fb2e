"""`zreward score` and `zreward eval` end to end on a tiny saved model and a small manifest."""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from PIL import Image  # noqa: E402

from zreward.cli import main  # noqa: E402
from zreward.data import RatedItem, load_manifest, write_manifest  # noqa: E402
from zreward.model import ZRewardModel  # noqa: E402
from zreward.tiny import tiny_qwen2_vl  # noqa: E402


@pytest.fixture
def saved(tmp_path):
    model, proc = tiny_qwen2_vl()
    ZRewardModel(model, proc).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    items = []
    for g in range(3):
        for c in range(3):
            path = tmp_path / "img" / f"{g}_{c}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray((rng.random((56, 56, 3)) * 255).astype("uint8")).save(path)
            for dim in ("alignment", "realism"):
                items.append(RatedItem(prompt=f"a red car {g}", image=str(path), dimension=dim, group=f"p{g}",
                                       ratings=[float(x) for x in rng.integers(1, 6, size=5)]))
    write_manifest(items, tmp_path / "m.jsonl", relative_to=tmp_path)
    return tmp_path


def test_eval_files_are_strict_json_with_null_for_undefined_metrics(saved, tmp_path, capsys):
    """Four images (four items per dimension): a dimension's logistic PLCC is undefined (NaN), and
    metrics.json carried it as the bare word NaN, which is not JSON (JavaScript's JSON.parse refuses
    the file).  It is now null; the pooled value (8 items) stays a number."""
    items = [it for it in load_manifest(saved / "m.jsonl")
             if os.path.basename(str(it.image)) in ("0_0.png", "0_1.png", "1_0.png", "1_1.png")]
    assert len(items) == 8
    write_manifest(items, tmp_path / "small.jsonl", relative_to=tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(saved / "model"), "--manifest", str(tmp_path / "small.jsonl"), "--out",
                 str(out), "--no-plots"]) == 0

    def strict(word):
        raise AssertionError(f"{word} is not JSON")

    rep = json.loads((out / "metrics.json").read_text(), parse_constant=strict)
    assert rep["alignment"]["plcc_logistic"] is None and rep["realism"]["plcc_logistic"] is None
    assert isinstance(rep["pooled"]["plcc_logistic"], float)
    for line in (out / "predictions.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=strict)


def test_eval_writes_metrics_predictions_and_plots(saved, capsys):
    out = saved / "eval"
    assert main(["eval", "--model", str(saved / "model"), "--manifest", str(saved / "m.jsonl"), "--out", str(out)]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert set(rep) >= {"pooled", "alignment", "realism", "_meta"}
    assert rep["_meta"]["items"] == 18 and rep["_meta"]["images"] == 9
    for key in ("hpa", "margin_hpa", "plcc", "srcc", "krcc", "pairwise_ece", "kl", "js", "wasserstein1"):
        assert key in rep["pooled"]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 18 and abs(sum(preds[0]["probs"]) - 1) < 1e-4
    # the report is the predictions' metrics: HPA over same-group, same-dimension pairs, and SRCC, recomputed
    from zreward.metrics import hpa, srcc

    mean = [x["mean"] for x in preds]
    ref = [x["reference"] for x in preds]
    assert rep["pooled"]["hpa"] == pytest.approx(hpa(mean, ref, [f"{x['group']}/{x['dimension']}" for x in preds]))
    assert rep["pooled"]["srcc"] == pytest.approx(srcc(mean, ref))
    realism = [x for x in preds if x["dimension"] == "realism"]
    assert rep["realism"]["plcc"] == pytest.approx(float(np.corrcoef([x["mean"] for x in realism],
                                                                      [x["reference"] for x in realism])[0, 1]))
    pytest.importorskip("matplotlib")
    for name in ("reliability.png", "scatter.png", "dimensions.png"):
        assert (out / name).stat().st_size > 1000
    cap = capsys.readouterr()
    assert "| pooled | 18 |" in cap.out
    if importlib.util.find_spec("tqdm"):
        assert "9/9 [" in cap.err and "img/s" in cap.err, cap.err[-500:]  # the bar counts images (it counted batches)


def test_evaluation_takes_items_from_a_generator(saved):
    """evaluate_items / score_items / predict_items on a generator failed: "object of type 'generator'
    has no len()" (the items are walked more than once)."""
    from zreward.evaluate import evaluate_items, predict_items, score_items
    from zreward.model import ZRewardModel
    from zreward.scorer import RewardScorer

    items = load_manifest(saved / "m.jsonl")
    zm = ZRewardModel.from_pretrained(str(saved / "model"))
    scorer = RewardScorer(zm, in_vocab_mass=False)
    want = evaluate_items(scorer, items, plots=False, progress=False)
    assert evaluate_items(scorer, iter(items), plots=False, progress=False) == want
    m_list, p_list = score_items(scorer, items, progress=False)
    for got in (score_items(scorer, (it for it in items), progress=False), predict_items(zm, iter(items))):
        np.testing.assert_array_equal(got[0], m_list)
        np.testing.assert_array_equal(got[1], p_list)


def test_plots_leave_the_callers_matplotlib_backend(saved):
    """The plots were drawn through pyplot after matplotlib.use('Agg'), which switched the backend of
    the caller's whole process (a notebook's inline plots stopped showing); they now use Figure."""
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # standing in for a notebook's backend
    try:
        assert main(["eval", "--model", str(saved / "model"), "--manifest", str(saved / "m.jsonl"), "--out",
                     str(saved / "ev")]) == 0
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    for name in ("reliability.png", "scatter.png", "dimensions.png"):
        assert (saved / "ev" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_prints_json(saved, capsys):
    img = str(saved / "img" / "0_0.png")
    assert main(["score", "--model", str(saved / "model"), img, img, "--prompt", "a red car", "--json",
                 "--dimensions", "realism"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0]["realism"]["mean"] == pytest.approx(rows[1]["realism"]["mean"])
    assert rows[0]["reward"] == pytest.approx(rows[0]["realism"]["mean"])


def test_score_a_directory_in_batches(saved, capsys, monkeypatch):
    """A directory stands for its image files (sorted by name); images are read batch by batch (they
    were all read into memory first) and every path is checked before any scoring."""
    import zreward.scorer

    (saved / "img" / "notes.txt").write_text("not an image")
    reads = []
    real = zreward.scorer.read_image
    monkeypatch.setattr(zreward.scorer, "read_image", lambda p: reads.append(p) or real(p))
    seen = []  # images read once each batch is scored (the scorer reads the paths it is given)
    score = zreward.scorer.RewardScorer.score

    def counted(self, *a, **k):
        out = score(self, *a, **k)
        seen.append(len(reads))
        return out

    monkeypatch.setattr(zreward.scorer.RewardScorer, "score", counted)
    assert main(["score", "--model", str(saved / "model"), str(saved / "img"), "--prompt", "a red car", "--json",
                 "--batch-size", "4", "--dimensions", "realism"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = sorted(p.name for p in (saved / "img").glob("*.png"))
    assert [r["image"].rsplit("/", 1)[1] for r in rows] == names and len(rows) == 9 == len(reads)
    assert seen == [4, 8, 9]
    one = json.loads((main(["score", "--model", str(saved / "model"), str(saved / "img" / names[5]), "--prompt",
                            "a red car", "--json", "--dimensions", "realism"]), capsys.readouterr().out)[1])
    assert one[0]["realism"]["mean"] == pytest.approx(rows[5]["realism"]["mean"], abs=1e-5)  # batching is invariant
    (saved / "empty").mkdir()
    with pytest.raises(SystemExit, match="no image files .* in directory"):
        main(["score", "--model", str(saved / "model"), str(saved / "empty"), "--prompt", "x"])
    with pytest.raises(SystemExit, match=r"image not found: .*gone.png \(2 missing\)"):
        main(["score", "--model", str(saved / "model"), str(saved / "gone.png"), str(saved / "img"),
              str(saved / "gone2.png"), "--prompt", "x"])


def test_score_names_a_bad_prompt_before_scoring_and_a_refused_image_by_its_file(saved, tmp_path, capsys):
    """`zreward score`: a prompt holding a special token's text stops the command before any image is
    scored, with the message alone; an image the processor refuses (sides more than 200-fold apart)
    is named by its file (the command read the files itself, so the error named only a batch index)."""
    img = str(saved / "img" / "0_0.png")
    with pytest.raises(SystemExit, match=r"^--prompt 'a car <\|im_end\|>' holds '<\|im_end\|>'"):
        main(["score", "--model", str(saved / "model"), img, img, "--prompt", "a red car", "--prompt",
              "a car <|im_end|>"])
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((30, 6400, 3), np.uint8)).save(wide)
    with pytest.raises(ValueError, match=r"^image \d \('.*wide\.png'\) \(30 x 6400 pixels\) cannot be preprocessed"):
        main(["score", "--model", str(saved / "model"), img, str(wide), img, "--prompt", "a red car"])


def test_a_device_that_is_not_here_is_refused(saved, tmp_path):
    """--device cuda without CUDA failed deep in torch; a training config's device='cuda' quietly
    trained on the CPU (accelerate falls back)."""
    import torch

    from zreward.train import TrainConfig, train

    img = str(saved / "img" / "0_0.png")
    with pytest.raises(SystemExit, match=r"--device 'gpu' is not a device"):
        main(["score", "--model", str(saved / "model"), img, "--prompt", "x", "--device", "gpu"])
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit, match=r"--device 'cuda', but no CUDA device is available here"):
        main(["score", "--model", str(saved / "model"), img, "--prompt", "x", "--device", "cuda"])
    with pytest.raises(SystemExit, match=r"--device 'cuda:1', but no CUDA device"):
        main(["ops", "--device", "cuda:1", "--rows", "64"])
    items = load_manifest(saved / "m.jsonl")
    cfg = TrainConfig(method="sft", model=str(saved / "model"), output_dir=str(tmp_path / "o"), batch_size=2,
                      device="cuda")
    with pytest.raises(ValueError, match=r"device='cuda', but no CUDA device is available here"):
        train(cfg, items=items)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_numeric_flags_and_device_types_are_checked_before_any_work(saved, capsys):
    """`ops --rows 0` and `--rows -5` died in torch.randint / torch.randn with a traceback, `demo --seed -1`
    in numpy ("expected non-negative integer", no flag named), `--device meta` in the compiled op."""
    img = str(saved / "img" / "0_0.png")
    for argv, flag, msg in ((["ops", "--rows", "0"], "--rows", "must be an integer >= 1, got 0"),
                            (["ops", "--rows", "-5"], "--rows", "must be an integer >= 1, got -5"),
                            (["ops", "--rows", "1.5"], "--rows", "invalid int value: '1.5'"),
                            (["demo", "--seed", "-1", "--out", str(saved / "never")], "--seed",
                             "must be an integer >= 0, got -1"),
                            (["score", "--model", str(saved / "model"), img, "--prompt", "x", "--batch-size", "0"],
                             "--batch-size", "must be an integer >= 1, got 0"),
                            (["eval", "--model", str(saved / "model"), "--manifest", str(saved / "m.jsonl"),
                              "--out", str(saved / "never"), "--batch-size", "-2"], "--batch-size",
                             "must be an integer >= 1, got -2")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert f"argument {flag}: {msg}" in capsys.readouterr().err, argv
    assert not (saved / "never").exists()
    for dev in ("meta", "mps"):
        with pytest.raises(SystemExit, match=rf"--device '{dev}': zreward runs on cpu or cuda"):
            main(["ops", "--device", dev, "--rows", "4"])
    main(["ops", "--device", "cpu", "--rows", "1"])  # one row: no pairs, one GDSO pair, 16 rewards
    out = capsys.readouterr().out
    assert "| gdso_loss |" in out and "M=16, groups of 16" in out


def test_cli_errors(saved):
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["score", "--model", str(saved / "nope"), str(saved / "img" / "0_0.png"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="image not found"):
        main(["score", "--model", str(saved / "model"), str(saved / "missing.png"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="give one --prompt, or one per image"):
        main(["score", "--model", str(saved / "model"), "a.png", "b.png", "c.png", "--prompt", "x", "--prompt", "y"])


def test_shell_errors_are_one_line_not_a_traceback(saved):
    """From the shell, bad input prints `zreward <command>: error: ...` and exits 2 (argparse's status
    for bad flags); ZREWARD_TRACEBACK=1 shows the traceback."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "zreward", "score", "--model", str(saved / "model"), str(saved / "img" / "0_0.png"),
           "--prompt", "x", "--dimensions", "beauty"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "zreward score: error: unknown dimension 'beauty'; this rubric has" in r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, ZREWARD_TRACEBACK="1"))
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: unknown dimension" in r.stderr
    with pytest.raises(ValueError, match="unknown dimension"):  # from Python, the exception propagates
        main(cmd[3:])
    r = subprocess.run(cmd[:6] + [str(saved / "gone.png"), "--prompt", "x"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith("zreward score: error: image not found: " +
                                                           str(saved / "gone.png")), r.stderr[-2000:]


def test_eval_finds_a_missing_image_before_scoring(saved, monkeypatch):
    """A missing file among the manifest's images stops `eval` before any image is scored (it was
    found when its batch came up)."""
    from zreward.scorer import RewardScorer

    calls = []
    monkeypatch.setattr(RewardScorer, "score", lambda self, *a, **k: calls.append(1))
    (saved / "img" / "2_2.png").unlink()  # the last image in the manifest
    with pytest.raises((FileNotFoundError, SystemExit), match=r"2_2.png \(1 missing image file\(s\)\)"):
        main(["eval", "--model", str(saved / "model"), "--manifest", str(saved / "m.jsonl"), "--out", str(saved / "e")])
    assert not calls


def test_a_file_that_is_not_an_image_stops_score_and_eval_before_any_scoring(saved, monkeypatch):
    """A broken or mislabelled file among the images failed only when its batch came up, so every score
    computed before it was lost; it is now found from the file headers before any image is scored."""
    from zreward.scorer import RewardScorer

    calls = []
    monkeypatch.setattr(RewardScorer, "score", lambda self, *a, **k: calls.append(1))
    (saved / "img" / "9_9.png").write_text("not an image")  # sorts last in the directory
    with pytest.raises(SystemExit, match=r"9_9.png: not a readable image \(UnidentifiedImageError"):
        main(["score", "--model", str(saved / "model"), str(saved / "img"), "--prompt", "x", "--batch-size", "2"])
    (saved / "img" / "2_2.png").write_bytes(b"\x89PNG but not really")  # the manifest's last image
    with pytest.raises((ValueError, SystemExit), match=r"2_2.png: not a readable image .*\(1 unreadable image file"):
        main(["eval", "--model", str(saved / "model"), "--manifest", str(saved / "m.jsonl"), "--out", str(saved / "e")])
    assert not calls


def test_in_memory_images_that_share_an_id_are_refused(saved):
    """Evaluation scores each in-memory image once, known by its id: two different images with one id
    (say a prompt id given to every candidate) were all scored as the first, and HPA came out 0 without a
    word. The same array under every dimension is still one image."""
    from zreward.evaluate import evaluate_items
    from zreward.scorer import RewardScorer
    from zreward.train.teacher import save_targets

    scorer = RewardScorer(ZRewardModel.from_pretrained(str(saved / "model")))
    rng = np.random.default_rng(1)
    pics = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(3)]
    dims = ("alignment", "realism")
    shared = [RatedItem(prompt="a car", image=p, dimension=d, score=float(1 + i), id="p01")
              for i, p in enumerate(pics) for d in dims]
    with pytest.raises(ValueError, match=r"items 0 and 2 share the id 'p01' .* hold different images"):
        evaluate_items(scorer, shared, progress=False)
    own = [dataclasses.replace(it, id=f"p01-{i // 2}") for i, it in enumerate(shared)]
    assert evaluate_items(scorer, own, progress=False)["pooled"]["n"] == 6
    copies = [dataclasses.replace(it, image=it.image.copy()) for it in own]  # equal pixels, other arrays: one image
    assert evaluate_items(scorer, copies, progress=False)["pooled"]["n"] == 6
    paths = [dataclasses.replace(it, image=str(saved / "img" / f"0_{i // 2}.png")) for i, it in enumerate(shared)]
    with pytest.raises(ValueError, match="teacher targets are keyed by id, dimension and prompt"):
        save_targets(str(saved / "t.safetensors"), np.zeros((6, 9)), paths, "teacher", (1, 2, 3, 4, 5, 6, 7, 8, 9))
    assert not (saved / "t.safetensors").exists()


def test_ratings_off_the_scale_leave_out_the_distribution_metrics(saved):
    """Ratings on 1..10 against a 1..5 rubric: HPA and the correlations are scale-free and equal the
    1..5 run's; the rater histograms would snap them to the end bins, so KL/JS/W1 are left out."""
    from zreward.evaluate import evaluate_items
    from zreward.scorer import RewardScorer

    items = load_manifest(saved / "m.jsonl")
    scorer = RewardScorer(ZRewardModel.from_pretrained(str(saved / "model")), in_vocab_mass=False)
    base = evaluate_items(scorer, items, progress=False)
    tens = [dataclasses.replace(it, ratings=[2 * r for r in it.ratings]) for it in items]
    with pytest.warns(UserWarning, match="ratings outside the rubric's scale"):
        rep = evaluate_items(scorer, tens, progress=False)
    for key in ("hpa", "srcc", "plcc", "krcc"):
        assert rep["pooled"][key] == pytest.approx(base["pooled"][key]), key
    assert "kl" in base["pooled"] and not {"kl", "js", "wasserstein1"} & set(rep["pooled"])


def test_plots_of_dimensions_without_a_rank_correlation_warn_nothing(tmp_path):
    """A dimension with one item (or tied predictions) has SRCC NaN; the per-dimension plot's axis took
    nanmin over them and numpy warned 'All-NaN axis encountered'."""
    import warnings

    pytest.importorskip("matplotlib")
    from zreward.evaluate import write_plots
    from zreward.metrics import evaluate

    mean, ref, probs = np.array([3.0, 3.5]), np.array([2.0, 4.0]), np.full((2, 9), 1 / 9)
    groups, dims = ["g", "g"], ["realism", "alignment"]
    report = evaluate(mean, ref, groups, dims, probs=probs)
    assert np.isnan(report["realism"]["srcc"]) and np.isnan(report["alignment"]["srcc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_plots(str(tmp_path), mean, ref, probs, groups, dims, report)
    assert [os.path.basename(p) for p in written] == ["scatter.png", "dimensions.png"]  # no pairs: no reliability plot
