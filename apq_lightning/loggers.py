"""Logging defaults: W&B offline unless the user is logged in."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    """True when an API key is available (env var or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        auth = netrc.netrc().authenticators("api.wandb.ai")
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class AutoWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that runs offline unless the user is logged in.

    ``offline=None`` (the default) decides automatically; ``WANDB_MODE=offline`` always wins.
    Offline runs can be uploaded later with ``wandb sync``.
    """

    def __init__(self, offline: bool | None = None, project: str = "apq-lightning", **kwargs: Any) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_logged_in()
        super().__init__(offline=offline, project=project, **kwargs)


def log_images(images: Mapping[str, Path], name: str, save_dir: Path, project: str = "apq-lightning") -> str | None:
    """Log PNGs as one W&B run (offline unless logged in, as :class:`AutoWandbLogger`); returns the
    run's directory, or None when ``WANDB_MODE=disabled`` or there is nothing to log. For figures a
    driver draws outside any Lightning run (the pipeline's accuracy-vs-latency figure)."""
    images = {k: Path(v) for k, v in images.items() if v is not None and Path(v).is_file()}
    if not images or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    loaded = {}
    for k, v in images.items():  # a broken plot file costs its W&B entry, not the caller's results
        try:
            loaded[k] = wandb.Image(str(v))
        except (OSError, ValueError) as err:
            print(f"W&B: {v} is not a readable image ({err}); not logged", file=sys.stderr)
    if not loaded:
        return None
    offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_logged_in()
    save_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=name, dir=str(save_dir), mode="offline" if offline else "online",
                     reinit="create_new")
    try:
        run.log(loaded)
        return str(run.dir)
    finally:
        run.finish()
