"""W&B logging for sphere_pl: a WandbLogger that picks online/offline by itself.

``AutoWandbLogger`` runs online when W&B credentials are configured and offline
otherwise, and makes the ``edits`` metric (number of edits applied) the x-axis of
every chart. What an offline run logged is read back by ``sphere_pl.files.wandb_offline``.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

EDITS_METRIC = "edits"
_DEFAULT_BASE_URL = "https://api.wandb.ai"


# ---------------------------------------------------------------------------
# online / offline decision
# ---------------------------------------------------------------------------


def _netrc_path() -> Path:
    # Same lookup order as wandb: $NETRC, then ~/.netrc, then ~/_netrc.
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        p = Path(name).expanduser()
        if p.exists():
            return p
    return Path("~/.netrc").expanduser()


def wandb_credentials_source() -> Optional[str]:
    """Where W&B credentials come from (``"WANDB_API_KEY"``, ``"netrc:<path>"``, ...),
    or None when none are configured.  Reads env and netrc only: no network, no
    prompt, no change to wandb's session state (unlike ``wandb.login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL).netloc
    path = _netrc_path()
    try:
        creds = netrc.netrc(str(path)).authenticators(host) if host else None
    except FileNotFoundError:
        return None
    except (netrc.NetrcParseError, OSError) as e:
        log.warning("could not read netrc file %s: %s", path, e)
        return None
    if creds and creds[2]:
        return f"netrc:{path}"
    return None


def decide_wandb_mode() -> str:
    """The W&B mode an :class:`AutoWandbLogger` uses when not told: what
    ``WANDB_MODE`` says if set (``online``, ``offline``/``dryrun``, ``disabled``),
    else ``"online"`` when credentials are configured and ``"offline"`` otherwise."""
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if wandb_credentials_source() else "offline"


# ---------------------------------------------------------------------------
# logger
# ---------------------------------------------------------------------------


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that goes online only when W&B credentials are configured.

    Same arguments as :class:`~lightning.pytorch.loggers.WandbLogger` (defaults:
    ``project="sphere_pl"``, ``save_dir="runs"``), except ``offline``:
    ``None`` (default) decides automatically (see :func:`decide_wandb_mode`),
    ``True``/``False`` force offline/online.  An explicit ``mode=`` kwarg wins over
    everything.  The decision is in ``self.mode`` (``"online"``, ``"offline"`` or
    ``"disabled"``). ``group`` puts the run in a W&B group (`sphere-pl study` groups its variants).

    Once the run exists, every metric is plotted against ``edits``
    (``define_metric("*", step_metric="edits", step_sync=True)``); rows logged
    without ``edits`` get its last value.  ``trainer/global_step`` and ``epoch``
    are still logged as usual.
    """

    def __init__(
        self,
        *args: Any,
        project: Optional[str] = "sphere_pl",
        save_dir: Union[str, os.PathLike] = "runs",
        offline: Optional[bool] = None,
        group: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if group is not None:  # W&B's run group: the runs of one study, side by side
            kwargs["group"] = group
        mode = kwargs.pop("mode", None)
        if mode is None:
            if offline is None:
                mode = decide_wandb_mode()
            else:
                mode = "offline" if offline else "online"
        if mode != "online" and kwargs.get("log_model"):
            log.warning("W&B runs %s: log_model=%r ignored", mode, kwargs["log_model"])
            kwargs["log_model"] = False
        self.mode: str = mode
        # The mode goes to wandb.init() as an argument.  We do not pass
        # offline=True to WandbLogger, which would set os.environ["WANDB_MODE"]
        # for the whole process.
        super().__init__(*args, project=project, save_dir=save_dir, offline=False, mode=mode, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # wandb 0.31 warns about any anonymous=..., even None.
            self._wandb_init.pop("anonymous", None)
        self._edits_axis_defined = False
        self._log_decision()

    @rank_zero_only
    def _log_decision(self) -> None:
        source = wandb_credentials_source()
        log.info(
            "W&B logging %s (credentials: %s, WANDB_MODE=%s, save_dir=%s)",
            self.mode,
            source or "none",
            os.environ.get("WANDB_MODE", "unset"),
            self._save_dir,
        )

    @property
    def offline(self) -> bool:
        return self.mode != "online"

    @property
    def experiment(self) -> Any:
        exp = super().experiment  # rank-zero guarded by the parent property
        if not self._edits_axis_defined and callable(getattr(exp, "define_metric", None)):
            self._edits_axis_defined = True
            # Lightning already defined trainer/global_step and "*" against it;
            # these later definitions make edits the x-axis (edits itself stays
            # a plain metric, so it is not its own step metric).
            exp.define_metric(EDITS_METRIC)
            exp.define_metric("*", step_metric=EDITS_METRIC, step_sync=True)
        return exp
