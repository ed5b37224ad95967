"""Logging set-up for the command line: the `fdngx` logger only (third-party loggers stay at WARNING)."""

from __future__ import annotations

import logging
import sys

LOGGER = "fdngx"


def setup_logging(verbose: bool = False) -> None:
    """One handler on stderr for fdngx's loggers; watchdog, urllib3 and friends are not ours to print."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fdngx %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
