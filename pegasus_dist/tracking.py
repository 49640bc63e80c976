"""Weights & Biases through Accelerate's tracker, and a local metrics file.

W&B never needs an API key: ``wandb.mode=auto`` logs online only when
``WANDB_API_KEY`` is set and otherwise writes an offline run into the run
directory (``wandb sync`` uploads it later); ``disabled`` turns W&B off.
Every logged row also goes to ``<run>/metrics.jsonl`` so that runs can be read
without W&B.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import wandb
from accelerate import Accelerator

from pegasus_dist.config import Config


def wandb_mode(cfg: Config) -> str:
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def tracker_names(cfg: Config) -> list[str] | None:
    """What to pass as ``Accelerator(log_with=...)``."""
    return None if wandb_mode(cfg) == "disabled" else ["wandb"]


def new_run_id() -> str:
    """A W&B-style run id: saved in checkpoints so a resumed run continues the same W&B run."""
    return os.urandom(4).hex()


def start_tracking(accelerator: Accelerator, cfg: Config, run_id: str) -> None:
    """Open the W&B run (main process only, as Accelerate does) with the resolved config."""
    if tracker_names(cfg) is None:
        return
    init: dict[str, Any] = {
        "mode": wandb_mode(cfg),
        "dir": str(cfg.run_dir.resolve()),
        "id": run_id,
        "resume": "allow",
        "name": cfg.run.name,
        "tags": cfg.wandb.tags or None,
        "job_type": cfg.train.phase,
    }
    if cfg.wandb.entity:
        init["entity"] = cfg.wandb.entity
    accelerator.init_trackers(cfg.wandb.project, config=cfg.to_dict(), init_kwargs={"wandb": init})


class MetricsLog:
    """Logs a row to every tracker and appends it to ``metrics.jsonl`` (main process)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.path = run_dir / "metrics.jsonl"

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def log_images(self, grids: dict[str, torch.Tensor], step: int, prefix: str) -> None:
        """Sample grids (float (3, H, W) in [0, 1]) as W&B images."""
        has_wandb = any(t.name == "wandb" for t in self.accelerator.trackers)
        if not (self.accelerator.is_main_process and has_wandb):
            return
        tracker = self.accelerator.get_tracker("wandb", unwrap=True)
        images = {
            f"{prefix}/{name}": wandb.Image(grid.permute(1, 2, 0).clamp(0, 1).numpy())
            for name, grid in grids.items()
        }
        tracker.log(images, step=step)
