"""The benchmark harness runs end to end and reports every row; it asserts no speed."""

from __future__ import annotations

import json

import pytest

from pegasus_dist.bench import format_table, run_bench

pytestmark = pytest.mark.slow


def test_the_harness_measures_each_row_against_its_baseline_and_target(tmp_path):
    out = tmp_path / "bench.json"
    rows = run_bench(images=300, steps=1, out=out, sizes=[32], images_from="synthetic",
                     process_steps=6)
    saved = json.loads(out.read_text())
    assert saved["images"] == "synthetic" and saved["machine"]["device"] == "cpu"
    assert [r["name"] for r in saved["rows"]] == [r.name for r in rows]
    assert all(r["value"] > 0 for r in saved["rows"])
    targets = {r["name"]: r for r in saved["rows"] if r["target"] is not None}
    assert sorted(targets) == sorted([
        "prepare from the CIFAR-10 archive, per core",
        "loader: stream, 1 worker(s)", "loader: stream, 2 worker(s)", "loader: device-resident",
        "trainer vs bare loop, paper model, fp32, batch 128",
        "trainer vs bare loop, paper model, bf16, batch 128",
    ])
    for row in targets.values():  # a ratio to the baseline measured in the same run
        expected = row["value"] / row["baseline"] if row["baseline"] else row["value"]
        assert row["measured"] == pytest.approx(expected)
        assert row["met"] == (row["measured"] >= row["target"])
    assert any(r["name"].startswith("image size 32: trainer") for r in saved["rows"])
    table = format_table(rows)
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 1  # + header
