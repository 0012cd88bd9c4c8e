"""Logging switch for stq_compiler, shaped like ``TORCH_LOGS``.

The pipeline logs through ``logging.getLogger("stq_compiler")`` and its children (one logger per
module, ``stq_compiler.pipeline`` ...): INFO is one line per captured graph and per pass, DEBUG
adds the per-site decisions and each graph's pass table.

Two ways to see them:

* ``STQ_LOGS`` (read once, when stq_compiler is imported): a comma-separated list of names, each
  optionally prefixed ``+`` (DEBUG) or ``-`` (ERROR only); no prefix is INFO. ``stq`` names all of
  stq_compiler; a logger below it can be named in full (``+stq_compiler.pipeline``).
  ``STQ_LOGS=stq``, ``STQ_LOGS=+stq``. From code: ``stq_compiler.logs.set_logs("+stq")``.
* ``TORCH_LOGS="+stq_compiler"``: TORCH_LOGS accepts any importable module name and turns on that
  module's logger with torch's own handler and format; nothing to register.

Why no ``TORCH_LOGS=stq`` alias: torch parses TORCH_LOGS while ``import torch`` runs and raises
on a name it does not know, before any other package can call
``torch._logging._internal.register_log``. A registration made later only reaches
``torch._logging.set_logs``, and would hand our logger to torch's resets. Hence ``STQ_LOGS``, of the
same grammar, with the same level meanings and a handler of ours.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

ENV_VAR = "STQ_LOGS"
ROOT = "stq_compiler"
ALIASES = {"stq": ROOT, ROOT: ROOT}
FORMAT = "[%(asctime)s] %(name)s: [%(levelname)s] %(message)s"

_SETTING = re.compile(r"([+-]?)([A-Za-z_][\w.]*)")
_configured: dict[str, logging.Handler] = {}  # logger name -> the handler set_logs gave it


def parse(settings: str) -> dict[str, int]:
    """``"+stq,-stq_compiler.pipeline"`` -> ``{"stq_compiler": DEBUG, "stq_compiler.pipeline": ERROR}``."""
    levels: dict[str, int] = {}
    for item in (s.strip() for s in settings.split(",")):
        if not item:
            continue
        match = _SETTING.fullmatch(item)
        name = match.group(2) if match else item
        qname = ALIASES.get(name, name if name.startswith(ROOT + ".") else None)
        if match is None or qname is None:
            raise ValueError(
                f"{ENV_VAR}: {item!r} is not a setting; use a comma-separated list of 'stq' or "
                f"'{ROOT}.<module>', each optionally prefixed '+' (DEBUG) or '-' (ERROR), e.g. "
                f"{ENV_VAR}=+stq"
            )
        levels[qname] = {"+": logging.DEBUG, "-": logging.ERROR}.get(match.group(1), logging.INFO)
    return levels


def set_logs(settings: Optional[str]) -> None:
    """Apply ``settings`` (the ``STQ_LOGS`` grammar); ``None`` or ``""`` undoes an earlier call.

    Each named logger gets the level and a stderr handler; like torch's registered logs it stops
    propagating, so a root handler does not print the same line twice."""
    levels = parse(settings or "")
    for qname, handler in _configured.items():
        logger = logging.getLogger(qname)
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    _configured.clear()
    for qname, level in levels.items():
        logger = logging.getLogger(qname)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
        _configured[qname] = handler


def set_logs_from_env() -> None:
    if os.environ.get(ENV_VAR):
        set_logs(os.environ[ENV_VAR])


set_logs_from_env()
