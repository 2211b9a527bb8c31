"""Quiet third-party chatter (weight-loading bars, deprecation notices) so ftcli's own output stays readable.

Uses environment variables and logger levels only, so it costs nothing at start-up (no heavy imports).
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    for name in ("bitsandbytes", "kernels", "datasets", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
