"""benchmarks/device_check.sh --smoke: every stage of the GPU check, on the CPU, tiny."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 70-80 s on a 2-core CPU
def test_device_check_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--smoke",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s["exit_status"] for s in summary["stages"]}
    assert stages == {"env": "0", "tests": "0", "throughput": "0", "cifar": "0",
                      "distributed": "0"}, stages  # (summary writes this file)
    assert summary["environment"]["torch"]
    rows = list(csv.DictReader((out / "throughput.csv").open()))
    methods = {r["method"] for r in rows if r["status"] == "ok"}
    assert {"bp", "l-bp", "lg-fg-a", "fg-a", "lg-fg-w", "fg-w", "ff", "zo"} <= methods
    assert any(r["mode"] == "compiled" and r["status"] == "ok" for r in rows)
    assert all(float(r["ratio_images_per_s_to_bp"]) == 1.0
               for r in rows if r["method"] == "bp" and r["status"] == "ok")
    cifar = list(csv.DictReader((out / "cifar.csv").open()))
    assert {r["method"] for r in cifar} == {"lg-fg-a", "bp"}
    assert (out / "cifar-lg-fg-a.tar").is_file() and (out / "cifar-bp.tar").is_file()
    assert "passed" in (out / "tests.log").read_text()
    # what the device machine hands back: at most 8 plain files, no folders
    kept = list(out.iterdir())
    assert len(kept) <= 8 and all(p.is_file() for p in kept), kept
    assert "## Throughput" in (out / "summary.md").read_text()
