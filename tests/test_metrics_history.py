"""``metrics.jsonl`` on resume: the rows after the checkpoint leave it, and a damaged line cuts it
back to the last good row with one warning, whatever the damage (bytes, or JSON that is no row)."""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator

from pegasus_dist.training.tracking import MetricsLog


def _rows(*steps: int) -> list[str]:
    return [json.dumps({"step": step, "pretrain/loss": 1.0 / step}) + "\n" for step in steps]


def test_damaged_bytes_in_metrics_jsonl_are_cut_back_to_the_last_good_row(tmp_path, caplog):
    rows = _rows(1, 2, 4, 5)
    (tmp_path / "metrics.jsonl").write_bytes("".join(rows[:2]).encode() + b"\xff\xfe\x00garbage\n"
                                             + "".join(rows[2:]).encode())
    MetricsLog(Accelerator(cpu=True), tmp_path).resume(5)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:2])
    assert f"{tmp_path / 'metrics.jsonl'}: line 3 is not a metrics row; keeping the 2 rows before it" \
        in caplog.text


def test_bytes_flipped_inside_a_name_are_damage_not_a_row_of_another_name(tmp_path, caplog):
    """Decoded with errors="replace", the line was JSON: a row of "pretrain/\ufffd..." kept, unsaid."""
    rows = _rows(1, 2, 4, 5)
    flipped = rows[2].encode().replace(b"loss", bytes(b ^ 0xFF for b in b"loss"))
    path = tmp_path / "metrics.jsonl"
    path.write_bytes("".join(rows[:2]).encode() + flipped + "".join(rows[3:]).encode())
    MetricsLog(Accelerator(cpu=True), tmp_path).resume(5)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:2])
    assert "line 3 is not a metrics row" in caplog.text


# Lines that decode as JSON but are not a row as MetricsLog.log writes it: a JSON object of a
# whole-number step, 0 or more, and numbers. Each used to stop the resume with a TypeError.
NOT_ROWS = {
    "step a string": '{"step": "3", "pretrain/loss": 0.3}',
    "step null": '{"step": null, "pretrain/loss": 0.3}',
    "step a list": '{"step": [3], "pretrain/loss": 0.3}',
    "step an object": '{"step": {"n": 3}, "pretrain/loss": 0.3}',
    "step a fraction": '{"step": 3.5, "pretrain/loss": 0.3}',
    "step true": '{"step": true, "pretrain/loss": 0.3}',
    "step negative": '{"step": -3, "pretrain/loss": 0.3}',
    "no step": '{"pretrain/loss": 0.3}',
    "a number": "5",
    "a list": "[1]",
    "a string": '"step"',
    "null": "null",
    "empty": "",
    "a value a string": '{"step": 3, "pretrain/loss": "0.3"}',
    "a value null": '{"step": 3, "pretrain/loss": null}',
    "a value a list": '{"step": 3, "pretrain/loss": [0.3]}',
    "nested past the parser": "[" * 100_000,
}


@pytest.mark.parametrize("damage", NOT_ROWS)
def test_a_line_that_is_json_but_no_row_is_cut_back_like_damaged_bytes(tmp_path, caplog, damage):
    rows = _rows(1, 2, 4, 5)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(rows[:2]) + NOT_ROWS[damage] + "\n" + "".join(rows[2:]))
    MetricsLog(Accelerator(cpu=True), tmp_path).resume(5)
    assert path.read_text() == "".join(rows[:2])
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [f"{path}: line 3 is not a metrics row; keeping the 2 rows before it"]


def test_rows_of_a_diverged_loss_are_rows(tmp_path, caplog):
    """json.dumps writes NaN and Infinity for a loss that diverged (train.on_nonfinite=skip logs it)."""
    rows = [*_rows(1, 2), '{"step": 3, "pretrain/loss": NaN, "pretrain/kl": Infinity}\n', *_rows(4)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(rows))
    MetricsLog(Accelerator(cpu=True), tmp_path).resume(3)
    assert path.read_text() == "".join(rows[:3])
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


def test_a_metrics_history_cut_short_says_where_it_now_ends(tmp_path, caplog):
    """Half of the file gone (a copy cut short, a truncation): the rows after the cut are lost, and
    the one warning says how many rows are kept."""
    rows = "".join(_rows(*range(1, 9)))
    (tmp_path / "metrics.jsonl").write_text(rows[: len(rows) // 2])
    MetricsLog(Accelerator(cpu=True), tmp_path).resume(8)
    assert f"{tmp_path / 'metrics.jsonl'}: line 5 is not a metrics row; keeping the 4 rows before it" \
        in caplog.text
