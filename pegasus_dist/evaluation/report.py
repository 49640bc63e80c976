"""`pegasus-dist report`: one self-contained HTML page of a run's phases, for people without W&B.

Per run folder: the loss curves of ``metrics.jsonl`` as inline SVG, the newest held-out evaluation, the
grids' quality scores and the sample grids, embedded: no external references, so it can be mailed.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from pegasus_dist.errors import DataError

log = logging.getLogger("pegasus_dist.evaluation.report")

CURVES = {"loss": "loss", "recon": "reconstruction", "kl": "KL"}  # logged name: chart title
GRIDS = ("pegasus", "reconstructions", "prior", "lerp", "analogy")
WIDTH, HEIGHT, PAD = 360, 180, 36
PERCENT = "{:.0%}"
# Each number's column header in words, and its format: rounded to what it means
# (README.md, "Held-out evaluation" and "Sample quality", defines them).
COLUMNS = {
    "images": ("images", "{:d}"), "tiles": ("tiles", "{:d}"),
    "neg_elbo_nats": ("negative ELBO, nats per image", "{:,.0f}"),
    "recon_nats": ("reconstruction, nats", "{:,.0f}"),
    "kl_nats": ("KL, nats", "{:.1f}"), "bits_per_dim": ("bits per dimension", "{:.3f}"),
    "psnr_db": ("PSNR, dB", "{:.1f}"), "active_units": ("active latent units", "{:d}"),
    "horse_as_horse": ("real horses read as horses", PERCENT),
    "recon_horse_as_horse": ("reconstructed horses read as horses", PERCENT),
    "bird_as_bird": ("real birds read as birds", PERCENT),
    "recon_bird_as_bird": ("reconstructed birds read as birds", PERCENT),
    "p_horse": ("mean P(horse)", "{:.2f}"), "p_bird": ("mean P(bird)", "{:.2f}"),
    "pegasus_score": ("pegasus score, mean of \u221a(P(horse) P(bird))", "{:.3f}"),
    "horse_bird_mass": ("mean P(horse) + P(bird)", "{:.2f}"),
    "frechet": ("Fr\u00e9chet distance to real horses and birds", "{:.1f}"),
}
ROWS = {"all": "all held-out images", "horse_bird": "horses and birds",
        "crossfade": "crossfade of the same pairs", "originals": "the original images"}
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1240px}svg{background:#fafafa;margin:4px}"
         "img{image-rendering:pixelated;width:320px;margin:4px}table{border-collapse:collapse}"
         "th{font-weight:normal;max-width:7.5em;vertical-align:bottom;border-bottom:1px solid #888}"
         "td,th{padding:2px 8px}td{text-align:right}td:first-child,th:first-child{text-align:left}")


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
    """One page of the runs at or under ``paths``, in the order they train (pretrain first)."""
    histories = {run: _rows(run) for run in find_runs(paths)}
    order = sorted(histories, key=lambda run: _phase(histories[run], run) != "pretrain")
    body = "".join(_run_section(run, histories[run]) for run in order)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("<!doctype html><html><head><meta charset='utf-8'><title>pegasus-dist report</title>"
                   f"<style>{STYLE}</style></head><body><h1>pegasus-dist report</h1>{body}</body></html>\n")
    return out


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl's rows; damaged lines are left out with one warning, as a resume cuts them."""
    path, rows = run / "metrics.jsonl", []
    lines = [line for line in path.read_bytes().splitlines() if line]  # each decoded strictly
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    if len(rows) < len(lines):
        log.warning("%s: left %d damaged line(s) out of the curves", path, len(lines) - len(rows))
    return rows


def _phase(rows: list[dict], run: Path) -> str:
    return next((k.split("/")[0] for row in rows for k in row if k.endswith("/loss")), run.name)


def _run_section(run: Path, rows: list[dict]) -> str:
    phase = _phase(rows, run)
    heading = run.name if run.name == phase else f"{run.name} ({phase})"
    charts = "".join(_chart(title, [(r["step"], r[key]) for r in rows
                                    if isinstance(r.get(key := f"{phase}/{name}"), (int, float))])
                     for name, title in CURVES.items())
    # The phase's own grids in samples/, then `pegasus-dist sample`'s in samples/step_N/, captioned with
    # their folder, e.g. "analogy (step_00000120)".
    folders = [(run / "samples", "")] + [(folder, f" ({folder.name})") for folder in
                                         sorted((run / "samples").glob("step_*")) if folder.is_dir()]
    grids = "".join(_figure(name + suffix, path) for folder, suffix in folders for name in GRIDS
                    if (path := folder / f"{name}.png").exists())
    newest = max((run / "eval").glob("*.json"), default=None)
    tables = (_from_file(newest, lambda metrics: _eval_html(newest, metrics))
              + _from_file(run / "samples" / "quality.json", _quality_html))
    return f"<h2>{html.escape(heading)}</h2><div>{charts}</div>{tables}<div>{grids}</div>"


def _figure(caption: str, path: Path) -> str:
    """The grid embedded as its PNG bytes; a damaged PNG is a line saying so, not a broken image."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a cut or changed stream fails here
    except (OSError, ValueError) as err:
        return _left_out(f"{path} is unreadable ({err})")
    return (f"<figure style='display:inline-block'><img src='data:image/png;base64,"
            f"{base64.b64encode(path.read_bytes()).decode()}'><figcaption>{html.escape(caption)}"
            "</figcaption></figure>")


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
    return (f"<svg width='{WIDTH}' height='{HEIGHT}'><text x='{PAD}' y='16'>{name}, nats per image</text>"
            f"<polyline fill='none' stroke='#2060c0' stroke-width='1.5' points='{line}'/><text x='2' "
            f"y='{PAD}' font-size='10'>{_axis(y1)}</text><text x='2' y='{HEIGHT - PAD}' font-size='10'>"
            f"{_axis(y0)}</text><text x='{PAD}' y='{HEIGHT - 8}' font-size='10'>step {x0:g}</text>"
            f"<text x='{WIDTH - PAD - 40}' y='{HEIGHT - 8}' font-size='10'>{x1:g}</text></svg>")


def _axis(value: float) -> str:
    """A curve's end value as a person reads it: 20,770 nats, not 2.077e+04; 0.18 kept."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _left_out(why: str) -> str:
    """A damaged file is one line on the page and one warning, so that the rest of the report is written."""
    log.warning("%s: left out of the report", why)
    return f"<p>{html.escape(why)}: left out of this report.</p>"


def _from_file(path: Path | None, render: Callable[[Any], str]) -> str:
    """``render`` of ``path``'s JSON; "" when there is no such file."""
    if path is None or not path.exists():  # a folder in its place is damage, said on the page
        return ""
    try:
        return render(json.loads(path.read_bytes()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as err:
        return _left_out(f"{path} is unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})")


def _eval_html(path: Path, metrics: dict) -> str:
    first = next(iter(metrics.values()))
    # Every subset's names: the horses and birds have the classifier's fractions as well.
    names = [k for k in dict.fromkeys(k for values in metrics.values() for k in values)
             if k not in ("latent_dim", "active_unit_threshold")]
    rows = [(ROWS.get(subset, subset), values) for subset, values in metrics.items()]
    return (f"<p>The held-out evaluation of {html.escape(path.stem)} (latent size "
            f"{first.get('latent_dim')}; a unit is active when its mean varies by more than "
            f"{first.get('active_unit_threshold')}):</p>" + _table("subset", names, rows))


def _quality_html(results: dict) -> str:
    """One row per scored grid and one per baseline (crossfade, originals), from samples/quality.json."""
    rows = []
    for grid, values in results["grids"].items():
        rows.append((f"{grid} grid", values))
        rows += [(f"{grid} grid: {ROWS.get(name, name)}", base) for name, base in values.items()
                 if isinstance(base, dict)]
    names = list(dict.fromkeys(k for _, values in rows for k, v in values.items() if not isinstance(v, dict)))
    accuracy = results.get("classifier", {}).get("held_out_accuracy")
    scorer = "" if accuracy is None else f", {accuracy:.0%} right on held-out images"
    return (f"<p>The sample quality, as the project's classifier reads the grids{scorer}:</p>"
            + _table("grid", names, rows))


def _table(first: str, names: list[str], rows: list[tuple[str, dict]]) -> str:
    """A table: a header in words, then per row its label and each of ``names`` (blank if absent)."""
    head = "".join(f"<th>{html.escape(COLUMNS.get(n, (n.replace('_', ' '), ''))[0])}</th>"
                   for n in [first, *names])
    body = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(_cell(n, values.get(n)) for n in names)
                   + "</tr>" for label, values in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(name: str, value: object) -> str:
    if value is None:
        return "<td></td>"
    fmt = COLUMNS.get(name, (name, "{:.3g}" if isinstance(value, float) else "{}"))[1]
    return f"<td>{html.escape(fmt.format(value))}</td>"
