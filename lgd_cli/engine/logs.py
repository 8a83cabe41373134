"""Where a run's logs go."""
from __future__ import annotations

import logging
from pathlib import Path


def log_to_file(path: Path) -> None:
    """detectron2's and lgd's logs go to the run's log.txt (the CLI decides what the terminal shows).

    detectron2's and fvcore's loggers stop there; lgd's also reaches the handlers the CLI put on it
    (lgd_cli/console.py, setup_logging) and any the root logger has (pytest's caplog).
    """
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S"))
    handler._lgd_run_log = True
    for name in ("detectron2", "fvcore", "lgd_cli"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_lgd_run_log", False)]:
            logger.removeHandler(old)  # a later run in the same process logs to its own folder
            old.close()
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)  # DEBUG (lgd --debug) stays
        logger.propagate = name == "lgd_cli"
        logger.addHandler(handler)
