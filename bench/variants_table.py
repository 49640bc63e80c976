"""Print the Markdown table of docs/reference-run.md ("Variants") from runs that bench/variants.sh wrote.

    .venv/bin/python bench/variants_table.py runs/variants/vae runs/variants/acai ...

Each column comes from the finetune phase's files: ``samples/quality.json``
(the slerp grid beside its crossfade, the reconstructions beside their originals),
``samples/step_N/quality.json`` (the analogy grid), ``eval/step_N.json`` (the
held-out horses and birds) and ``seconds`` (both phases' wall time).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("variant", "slerp: pegasus score (crossfade)", "slerp: horse+bird mass (crossfade)",
           "slerp: Fréchet (crossfade)", "analogy: pegasus score", "analogy: Fréchet",
           "reconstructions: Fréchet (originals)", "held-out recon: horse as horse", "bird as bird",
           "-ELBO (nats)", "PSNR (dB)", "active units", "minutes")


def row(variant: Path) -> list[str]:
    run = variant / "finetune"
    grids = json.loads((run / "samples/quality.json").read_text())["grids"]
    analogy = next(run.glob("samples/step_*/quality.json"), None)
    extra = json.loads(analogy.read_text())["grids"]["analogy"] if analogy else {}
    held = json.loads(sorted((run / "eval").glob("step_*.json"))[-1].read_text())
    slerp, fade, recon = grids["pegasus"], grids["pegasus"]["crossfade"], grids["reconstructions"]
    hb, every = held["horse_bird"], held["all"]
    seconds = (variant / "seconds").read_text().strip() if (variant / "seconds").is_file() else ""
    return [
        variant.name,
        f"{slerp['pegasus_score']:.3f} ({fade['pegasus_score']:.3f})",
        f"{slerp['horse_bird_mass']:.2f} ({fade['horse_bird_mass']:.2f})",
        f"{slerp['frechet']:.1f} ({fade['frechet']:.1f})",
        f"{extra['pegasus_score']:.3f}" if extra else "",
        f"{extra['frechet']:.1f}" if extra else "",
        f"{recon['frechet']:.1f} ({recon['originals']['frechet']:.1f})",
        f"{hb.get('recon_horse_as_horse', float('nan')):.2f}",
        f"{hb.get('recon_bird_as_bird', float('nan')):.2f}",
        f"{every['neg_elbo_nats']:.1f}",
        f"{every['psnr_db']:.2f}",
        f"{every['active_units']}/{every['latent_dim']}",
        f"{int(seconds) / 60:.1f}" if seconds else "",
    ]


def main(variants: list[str]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---" + "|---:" * (len(COLUMNS) - 1) + "|")
    for variant in variants:
        print("| " + " | ".join(row(Path(variant))) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
