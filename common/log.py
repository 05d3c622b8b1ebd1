"""Logging set-up shared by the master and the agents."""
from __future__ import annotations

import logging
import sys


def setup_logging(role: str, level: str = "INFO") -> None:
    """Log to stderr with the process role in every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
