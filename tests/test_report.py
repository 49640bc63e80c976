"""The HTML report of a run folder whose files were damaged after the run: the rest is still written."""

from __future__ import annotations

import base64
import json
import logging

import torch
from torchvision.utils import save_image

from pegasus_dist.evaluation.report import write_report

ROWS = [{"step": step, "pretrain/loss": 2000.0 - step, "pretrain/recon": 1990.0 - step,
         "pretrain/kl": 10.0 + step / 100} for step in range(10, 60, 10)]


def run_folder(tmp_path):
    run = tmp_path / "pretrain"
    (run / "eval").mkdir(parents=True)
    (run / "samples").mkdir()
    lines = [json.dumps(row) for row in ROWS]
    lines[2] = lines[2][:20] + "\x00\x7f garbage"  # damaged bytes in the middle of the history
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "eval" / "step_00000050.json").write_bytes(b'{"all": {"images": 10,\x00\x00')
    (run / "samples" / "quality.json").write_text('["not", "the scores"]')
    save_image(torch.rand(4, 3, 8, 8), run / "samples" / "prior.png")
    good = (run / "samples" / "prior.png").read_bytes()
    (run / "samples" / "pegasus.png").write_bytes(good[: len(good) // 2])  # cut short
    return run, good


def test_damaged_files_cost_their_own_table_with_a_line_saying_why(tmp_path, caplog):
    run, good = run_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pegasus_dist.evaluation.report"):
        page = write_report([run], tmp_path / "report.html").read_text()
    assert page.count("<polyline") == 3  # loss, reconstruction and KL, from the 4 good rows
    assert f"{run / 'eval' / 'step_00000050.json'} is unreadable (JSONDecodeError: " in page
    assert f"{run / 'samples' / 'quality.json'} is unreadable (" in page
    assert f"{run / 'samples' / 'pegasus.png'} is unreadable (" in page  # not a broken image
    assert base64.b64encode(good).decode() in page  # the good grid is there
    assert page.count("left out of this report.") == 3
    assert f"{run / 'metrics.jsonl'}: left 1 damaged line(s) out of the curves" in caplog.text
    assert caplog.text.count("left out of the report") == 3


def test_a_folder_in_place_of_a_file_is_left_out_with_a_line_not_in_silence(tmp_path):
    run, _ = run_folder(tmp_path)
    for name in ("quality.json", "pegasus.png"):
        (run / "samples" / name).unlink()
        (run / "samples" / name).mkdir()
    page = write_report([run], tmp_path / "report.html").read_text()
    for name in ("quality.json", "pegasus.png"):
        assert f"{run / 'samples' / name} is unreadable (" in page


def test_bytes_flipped_inside_a_curve_name_leave_the_line_out(tmp_path, caplog):
    run, _ = run_folder(tmp_path)
    lines = [json.dumps(row).encode() for row in ROWS]
    lines[1] = lines[1].replace(b"recon", bytes(b ^ 0xFF for b in b"recon"))
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="pegasus_dist.evaluation.report"):
        write_report([run], tmp_path / "report.html")
    assert f"{run / 'metrics.jsonl'}: left 1 damaged line(s) out of the curves" in caplog.text
