"""The benchmarks package: one benchmark at the smallest sizes, its results and machine record."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a package at the repository root, not installed
    sys.path.insert(0, str(REPO))


def test_help_lists_every_benchmark() -> None:
    from benchmarks import BENCHMARKS
    from benchmarks.__main__ import usage

    text = usage()
    for name in BENCHMARKS:
        assert name in text


def test_step_time_writes_csv_markdown_and_machine_record(tmp_path: Path) -> None:
    from benchmarks.__main__ import main

    main(["core-step-time", "--out", str(tmp_path), "--rounds", "2", "--steps", "1",
          "--batches", "4", "--threads", "1", "--widths", "8",
          "--methods", "bp", "fg-w K=1", "plain jvp K=1"])
    folder = tmp_path / "core-step-time"
    with (folder / "step_time.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["bp", "fg-w K=1", "plain jvp K=1"]
    columns = {"threads", "batch", "median_ms", "ratio_to_bp", "ratio_min", "ratio_max"}
    assert columns <= set(rows[0])
    assert float(rows[0]["ratio_to_bp"]) == 1.0
    record = json.loads((folder / "step_time.json").read_text())
    for key in ("cpu", "cpu_capability", "torch_threads", "load_average", "malloc", "torch",
                "forwardonly", "python", "date", "command"):
        assert key in record
    assert record["command"].startswith("python -m benchmarks core-step-time")
    md = (folder / "step_time.md").read_text()
    assert md.startswith("### ") and record["cpu_capability"] in md


def test_table_quality_trains_both_ways_and_summarises_over_seeds(tmp_path: Path) -> None:
    from benchmarks.__main__ import main

    main(["core-table-quality", "--out", str(tmp_path), "--epochs", "1", "--seeds", "2",
          "--directions", "2", "--table-factors", "3", "--widths", "4"])
    with (tmp_path / "core-table-quality" / "table_quality_digits.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["distribution"] for r in rows] == ["gaussian", "gaussian-table ×3"]
    assert all(r["seeds"] == "2" and r["directions"] == "2" for r in rows)
    runs = sorted(p.name for p in (tmp_path / "core-table-quality" / "runs").iterdir())
    stem = "digits-w4-b16-lr0.003-k2"
    assert runs == [f"{stem}-gaussian-s0-e1", f"{stem}-gaussian-s1-e1",
                    f"{stem}-gaussian-table3-s0-e1", f"{stem}-gaussian-table3-s1-e1"]
    config = (tmp_path / "core-table-quality" / "runs" / runs[2] / "config.yaml").read_text()
    assert "gaussian-table" in config and "table_factor: 3" in config


def test_report_collects_into_the_given_root(tmp_path: Path) -> None:
    from benchmarks.__main__ import main

    main(["core-step-time", "--out", str(tmp_path), "--rounds", "1", "--steps", "1",
          "--batches", "4", "--threads", "1", "--widths", "8", "--methods", "bp"])
    main(["report", "--out", str(tmp_path)])
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "### Step time" in text and "step_time.csv" in text


def test_dimension_curse_times_both_commands_and_writes_the_ratio(tmp_path: Path) -> None:
    from benchmarks.__main__ import main

    main(["dimension-curse", "--out", str(tmp_path), "--rounds", "1", "--warmup", "0",
          "--threads", "1", "--pairs", "200", "--n-max", "6"])
    folder = tmp_path / "dimension-curse"
    with (folder / "speed.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["command"] for r in rows] == ["forwardonly", "essay script", "start-up only"]
    ours = rows[0]
    ratio = float(rows[1]["median_s"]) / float(ours["median_s"])
    assert float(ours["essay_over_ours"]) == pytest.approx(ratio, rel=0.05, abs=0.01)
    assert int(ours["pairs"]) == 3 * 200 and ours["threads"] == "1"
    record = json.loads((folder / "speed.json").read_text())
    assert record["command"].startswith("python -m benchmarks dimension-curse")
    assert "essay / forwardonly" in (folder / "speed.md").read_text()


def test_unknown_benchmark_is_refused() -> None:
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        main(["nope"])


def test_python_m_benchmarks_help_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert "core-step-time" in out.stdout and "report" in out.stdout


def test_step_time_verdicts_say_which_target_is_met_and_by_how_much() -> None:
    from benchmarks.core import step_time_verdicts

    def row(method, batch, ratio):
        return {"threads": 1, "batch": batch, "method": method, "ratio_to_bp": ratio}

    text = step_time_verdicts([row("fg-w K=1", 64, 1.5), row("fg-w K=1", 1024, 0.9),
                               row("fg-w K=1 rank1", 64, 0.88), row("fg-w K=8", 64, 11.0),
                               row("plain vmap(jvp) K=8", 64, 19.0),
                               row("fg-w K=1 gaussian-table", 64, 1.1),
                               row("forward only", 64, 0.3), row("draw only: gaussian", 64, 0.5),
                               row("draw only: gaussian-table", 64, 0.01)])
    assert "fg-w K=1 at batch 64: 1.5× bp (target ≤ 1.2×): not met, 25% over" in text
    assert "fg-w K=1 at batch 1024: 0.9× bp (target ≤ 0.9×): met" in text
    assert "fg-w K=1 rank1 at batch 64: 0.88× bp (target ≤ 0.8×): not met, 10% over" in text
    assert "plain vmap(jvp)'s 19.0× (target: at least as fast): met" in text
    assert "fg-w K=1 gaussian-table at batch 64: 1.1× bp (target ≤ 1.2×): met" in text
    assert "gaussian direction at batch 64: 0.5× bp against the forward pass's 0.3× (target: " \
        "no more than the forward pass): not met" in text
    assert "gaussian-table direction at batch 64: 0.01× bp against the forward pass's 0.3×" \
        in text
    assert step_time_verdicts([row("bp", 64, 1.0)]) == ""


def test_local_speed_verdict_states_the_target_and_the_reason() -> None:
    from benchmarks.local_speed import lg_fg_a_verdict

    rows = [{"method": m, "step_vs_bp": r} for m, r in
            (("bp", 1.0), ("l-bp", 1.05), ("lg-fg-a", 1.16), ("lg-fg-a (rademacher)", 0.98))]
    text = lg_fg_a_verdict(rows)
    assert "lg-fg-a 1.16× (16% over); lg-fg-a (rademacher) 0.98× (met)" in text
    assert "(L-BP: 1.05×)" in text and "Why it stays above" in text
    assert lg_fg_a_verdict([{"method": "bp", "step_vs_bp": 1.0}]) == ""
    assert "Why" not in lg_fg_a_verdict([{"method": "lg-fg-a", "step_vs_bp": 0.97}])
