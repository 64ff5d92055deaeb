"""The Hugging Face Hub during a benchmark: asked only when a task needs it, else no Hub traffic at all."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock


@contextmanager
def offline() -> Iterator[None]:
    """No Hub traffic: a missing dataset fails at once instead of retrying for minutes, and no result depends on
    what the Hub served that day. The flags are read at call time, so this works after the libraries are imported."""
    import datasets.config
    import huggingface_hub.constants

    with (
        mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
        mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True),
        mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True),
        mock.patch.object(datasets.config, "HF_DATASETS_OFFLINE", True),
    ):
        yield


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers here (and the user has not set HF_HUB_OFFLINE): lm-eval's own tasks
    fetch their data from it."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:  # no route, no DNS, refused, timed out: all mean offline
        return False
    return True


def hub_access(online: bool):
    """The Hub as it is when `online`, else no Hub traffic at all (offline())."""
    return contextlib.nullcontext() if online else offline()
