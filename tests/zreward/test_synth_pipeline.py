"""A miniature end-to-end run of the demo pipeline (every method, evaluation, tables, plots)."""

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torchvision")
pytest.importorskip("accelerate")

from zreward.synth.pipeline import DemoConfig, run  # noqa: E402


def test_miniature_pipeline(tmp_path):
    cfg = DemoConfig(preset="mini", out_dir=str(tmp_path), n_prompts=12, candidates=4, teacher_hidden=32,
                     student_hidden=32, pretrain_steps=12, cold_start_steps=6, direct_steps=6, direct_batch=8,
                     rl_steps=2, rl_pairs=2, group_size=2, max_trace_tokens=12, eval_traces=1, curve_points=1)
    summary = run(cfg)
    res = summary["results"]
    assert set(res) == {"sft_teacher", "grpo_teacher", "gdso_teacher", "sft_student", "opd_student", "risd_student"}
    for name, r in res.items():
        pooled = r["report"]["pooled"]
        for k in ("hpa", "margin_hpa", "plcc", "srcc"):
            assert k in pooled
        assert 0.0 <= pooled["hpa"] <= 1.0 or math.isnan(pooled["hpa"])
        assert r["curve"], name  # HPA over training steps was recorded
        reasons = name in ("grpo_teacher", "gdso_teacher", "opd_student")
        assert (r["tokens_per_score"] > 1) == reasons, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"].keys() == res.keys()
    table = (tmp_path / "results.md").read_text()
    assert table.count("| teacher |") == 6 and table.count("| student |") == 6  # two tables, three rows each
    pytest.importorskip("matplotlib")
    assert (tmp_path / "hpa_over_steps.png").exists() and (tmp_path / "risd_eval" / "reliability.png").exists()


def test_pipeline_is_reproducible_run_to_run(tmp_path):
    cfg = DemoConfig(preset="mini", n_prompts=8, candidates=4, teacher_hidden=32, student_hidden=32, pretrain_steps=6,
                     cold_start_steps=4, direct_steps=4, direct_batch=8, rl_steps=2, rl_pairs=2, group_size=2,
                     max_trace_tokens=8, eval_traces=1, curve_points=1, methods=["sft_teacher", "gdso_teacher"])
    from dataclasses import replace

    a = run(replace(cfg, out_dir=str(tmp_path / "a")))
    b = run(replace(cfg, out_dir=str(tmp_path / "b")))
    for name in a["results"]:
        ra, rb = a["results"][name]["report"], b["results"][name]["report"]
        assert json.dumps(ra, sort_keys=True, default=str) == json.dumps(rb, sort_keys=True, default=str), name
