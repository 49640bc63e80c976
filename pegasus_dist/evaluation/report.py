"""`pegasus-dist report`: one self-contained HTML page of a run's phases, for people without W&B.

Per run folder: the loss curves of ``metrics.jsonl`` as inline SVG, the newest
held-out evaluation, the grids' quality scores (``samples/quality.json``) and
the sample grids, embedded; no external references, so it can be mailed as it is.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from pegasus_dist.errors import DataError

CURVES = ("loss", "recon", "kl")
GRIDS = ("pegasus", "reconstructions", "prior", "lerp", "analogy")
WIDTH, HEIGHT, PAD = 360, 180, 36


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (holding metrics.jsonl) among ``paths`` and directly inside them."""
    runs = []
    for path in paths:
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
        else:
            runs += sorted(p.parent for p in path.glob("*/metrics.jsonl"))
    if not runs:
        raise DataError(f"no run folder (with metrics.jsonl) at or under "
                        f"{', '.join(map(str, paths))}; pass e.g. runs/pretrain runs/finetune")
    return runs


def write_report(paths: list[Path], out: Path) -> Path:
    sections = [_run_section(run) for run in find_runs(paths)]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pegasus-dist report</title>"
            "<style>body{font-family:sans-serif;margin:2em}svg{background:#fafafa;margin:4px}"
            "img{image-rendering:pixelated;width:320px;margin:4px}td,th{padding:2px 8px}"
            "</style></head><body><h1>pegasus-dist report</h1>" + "".join(sections)
            + "</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def _run_section(run: Path) -> str:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    phase = next((k.split("/")[0] for row in rows for k in row if k.endswith("/loss")), run.name)
    charts = "".join(_chart(name, [(r["step"], r[f"{phase}/{name}"]) for r in rows if f"{phase}/{name}" in r])
                     for name in CURVES)
    grids = "".join(f"<figure style='display:inline-block'><img src='data:image/png;base64,"
                    f"{base64.b64encode(path.read_bytes()).decode()}'><figcaption>{html.escape(caption)}"
                    "</figcaption></figure>" for caption, path in find_grids(run))
    return (f"<h2>{html.escape(run.name)} ({html.escape(phase)})</h2><div>{charts}</div>"
            f"{_eval_table(run)}{_quality_table(run)}<div>{grids}</div>")


def find_grids(run: Path) -> list[tuple[str, Path]]:
    """Each grid as (caption, PNG): the phase's own in samples/, then `pegasus-dist sample`'s.

    Those in samples/step_N/ are captioned with their folder, e.g. "analogy (step_00000120)".
    """
    samples = run / "samples"
    folders = [(samples, "")] + [(folder, f" ({folder.name})")
                                 for folder in sorted(samples.glob("step_*")) if folder.is_dir()]
    return [(name + suffix, path) for folder, suffix in folders for name in GRIDS
            if (path := folder / f"{name}.png").is_file()]


def _chart(name: str, points: list[tuple[float, float]]) -> str:
    if len(points) < 2:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)

    def scale(x: float, y: float) -> str:
        sx = PAD + (x - x0) / ((x1 - x0) or 1) * (WIDTH - 2 * PAD)
        sy = HEIGHT - PAD - (y - y0) / ((y1 - y0) or 1) * (HEIGHT - 2 * PAD)
        return f"{sx:.1f},{sy:.1f}"

    line = " ".join(scale(x, y) for x, y in points)
    return (f"<svg width='{WIDTH}' height='{HEIGHT}'><text x='{PAD}' y='16'>{name} per image"
            f"</text><polyline fill='none' stroke='#2060c0' stroke-width='1.5' points='{line}'/>"
            f"<text x='2' y='{PAD}' font-size='10'>{y1:.4g}</text>"
            f"<text x='2' y='{HEIGHT - PAD}' font-size='10'>{y0:.4g}</text>"
            f"<text x='{PAD}' y='{HEIGHT - 8}' font-size='10'>step {x0:g}</text>"
            f"<text x='{WIDTH - PAD - 40}' y='{HEIGHT - 8}' font-size='10'>{x1:g}</text></svg>")


def _eval_table(run: Path) -> str:
    evals = sorted((run / "eval").glob("*.json"))
    if not evals:
        return ""
    metrics = json.loads(evals[-1].read_text())
    # Every subset's names: the horses and birds have the classifier's fractions as well.
    names = [k for k in dict.fromkeys(k for values in metrics.values() for k in values)
             if k not in ("latent_dim", "active_unit_threshold")]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["subset", *names])
    body = "".join(_row(subset, values, names) for subset, values in metrics.items())
    return (f"<p>held-out evaluation ({html.escape(evals[-1].stem)}):</p>"
            f"<table><tr>{head}</tr>{body}</table>")


def _row(label: str, values: dict, names: list[str]) -> str:
    """A table row: ``label``, then each of ``names`` in ``values`` (floats to 4 digits, blank if absent)."""
    cells = "".join(f"<td>{v:.4g}</td>" if isinstance(v := values.get(n, ""), float) else f"<td>{v}</td>"
                    for n in names)
    return f"<tr><td>{html.escape(label)}</td>{cells}</tr>"


def _quality_table(run: Path) -> str:
    """One row per scored grid and one per baseline (crossfade, originals), from samples/quality.json."""
    path = run / "samples" / "quality.json"
    if not path.is_file():
        return ""
    results = json.loads(path.read_text())
    rows = []
    for grid, values in results["grids"].items():
        rows.append((grid, values))
        rows += [(f"{grid}: {name}", base) for name, base in values.items() if isinstance(base, dict)]
    names = list(dict.fromkeys(k for _, values in rows for k, v in values.items() if not isinstance(v, dict)))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["grid", *names])
    body = "".join(_row(label, values, names) for label, values in rows)
    accuracy = results.get("classifier", {}).get("held_out_accuracy")
    return (f"<p>sample quality (pegasus_dist.evaluation.quality; "
            f"classifier held-out accuracy {accuracy}):</p>"
            f"<table><tr>{head}</tr>{body}</table>")
