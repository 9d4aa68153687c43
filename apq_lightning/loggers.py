"""Logging defaults: W&B offline unless the user is logged in."""

from __future__ import annotations

import os
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
