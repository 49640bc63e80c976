"""Which held-out horses each run's reconstruction is read as a horse: how far one run's count can be trusted.

    .venv/bin/python bench/heldout_agreement.py runs/reference-seed0/finetune runs/candidates/*/finetune

Issue 24 counts the held-out horses whose reconstruction the judge reads as a horse, on one run.
This script reads the same horses through each run (the judge and the held-out set named by the
first run's config, as `pegasus-dist eval` reads them) and prints, per run, the count, the mean
P(horse) and the classes the others are read as; then how many horses every run, some run and no
run gets right. Runs that agree on few horses say the count moves with the run more than with the
recipe (docs/reference-run.md, sixteenth round).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

from pegasus_dist.evaluation.classifier import labelled_images, load_classifier, predict
from pegasus_dist.evaluation.sampler import load_trained_model


@torch.no_grad()
def agreement(runs: list[Path]) -> dict:
    """Per run: horses read as horses, mean P(horse), the other classes; and across runs the overlap."""
    models = {run: load_trained_model(run, [])[:2] for run in runs}
    cfg = models[runs[0]][0]
    judge = load_classifier(cfg.classifier_dir)
    images, labels = labelled_images(Path(cfg.data.shards) / cfg.eval.shard_set, judge.image_size)
    horses = images[torch.tensor([label == "horse" for label in labels])].float().div(255)
    column = judge.index("horse")
    right, per_run = [], {}
    for run, (_, model) in models.items():
        model.eval()
        # As `pegasus-dist eval` does: the VAE on its device (a GPU where there is one), the judge on the CPU.
        x = horses.to(next(model.parameters()).device)
        probabilities = predict(judge, model.decode(model.encode(x)[0]).float().cpu())[0]
        seen = probabilities.argmax(dim=1)
        right.append(seen == column)
        per_run[str(run)] = {"horse": int(right[-1].sum()), "p_horse": probabilities[:, column].mean().item(),
                             "read_as": dict(Counter(judge.classes[i] for i in seen.tolist()).most_common())}
    together, originals = torch.stack(right), predict(judge, horses)[0].argmax(dim=1)
    return {"horses": len(horses), "originals": int((originals == column).sum()), "runs": per_run,
            "every_run": int(together.all(dim=0).sum()), "some_run": int(together.any(dim=0).sum())}


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    found = agreement([Path(arg) for arg in argv])
    print(f"{found['horses']} held-out horses, {found['originals']} of them read as horses as they are")
    for run, seen in found["runs"].items():
        others = ", ".join(f"{label} {n}" for label, n in seen["read_as"].items() if label != "horse")
        print(f"{run}: {seen['horse']} read as horses (mean P(horse) {seen['p_horse']:.3f}); {others}")
    print(f"read as horses in every run: {found['every_run']}, in some run: {found['some_run']}, "
          f"in none: {found['horses'] - found['some_run']}")


if __name__ == "__main__":
    main(sys.argv[1:])
