"""bench/gpu_check.py --tiny: every section of the one-shot GPU check runs on the CPU with tiny models, so the
script is proven before a lent GPU's minutes are spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_runs_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: entry["status"] for name, entry in report["sections"].items()}
    assert set(statuses) == {"parity", "lm", "int4", "stages", "engine", "transcription"}, proc.stdout[-3000:]
    failed = {
        n: report["sections"][n].get("error", "")[-1500:]
        for n, s in statuses.items()
        if s != "ok" and n != "int4"
    }
    assert not failed, failed
    assert statuses["int4"] in ("ok", "skipped")
    assert report["server_only_modules_imported"] == []  # none of them on the GPU machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "gpu_check.md").read_text().count("## ") == 6
    sections = report["sections"]
    assert all(
        case["greedy_equal"]
        for key, case in sections["parity"]["figures"].items()
        if key.startswith("lm_case")
    )
    lm = sections["lm"]["figures"]
    assert {"100", "500", "2000"} <= set(lm["prefill_ms"])
    assert set(lm["decode"]["1"]) == {"eager", "compile"}  # the compiled step measured beside the eager one
    assert lm["compile"]["buckets"] == [1] and lm["compile"]["stopped"] == ""
    assert lm["compile_warm_cache"]["buckets"] == [1], lm["compile_warm_cache"]
    assert (
        lm["compile_warm_cache"]["cache"].get("fxgraph_cache_hit", 0) > 0
    )  # the new process loaded, not compiled
    precision = sections["stages"]["figures"]["precision_parity_fixtures"]
    assert precision["tokenizer_fp32_equals_fixture"]
    assert set(precision["decoder_bf16_vs_fp32"]) >= {"mel_rel_rms", "audio_rel_rms"}
    engine = sections["engine"]["figures"]
    assert engine["calls_1"]["turns"] == 3 and engine["calls_1"]["audio_s_per_reply"] > 1.0
    assert len(engine["calls_4"]["per_call"]) == 4
    budget = engine["first_audio_budget_1_call_ms"]
    # measured from the engine's own Timing events, in their order (the estimated parts are not checked)
    assert "missing_timing_events" not in budget, budget
    assert budget["prefill"] >= 0 and budget["text_steps"] > 0 and budget["send"] >= 0, budget
    assert 0 < budget["lm_step_ms"] < budget["total"], budget
