"""Fault injection for tests and drills, switched on by ``Settings.faults`` (``MOMENTS_FAULTS``, JSON),
never by default. ``moments worker`` wraps its engine with :func:`maybe_faulty`.

Example: ``MOMENTS_FAULTS='{"answer_error_after": 0}'`` makes every answer raise (a model error);
``{"device_error_after": 0}`` raises a fatal device error; ``{"encode_sleep_s": 5}`` slows encoding
so a test can kill the worker mid-job; ``{"answer_sleep_s": 2}`` slows each answer (a cancelled job
leaves the pause at once), so calls stay waiting; with ``"answer_sleep_after": 1`` only the answers
after the first (the first question warms the worker's KV prefix).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from moments.core.errors import FatalDeviceError

log = logging.getLogger(__name__)


class FaultyEngine:
    """Wraps an engine; counts calls and misbehaves as configured."""

    def __init__(self, engine: Any, faults: dict[str, Any]) -> None:
        self._engine = engine
        self._faults = faults
        self._answers = 0
        log.warning("FAULT INJECTION ACTIVE: %s", faults)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def encode(self, *args, **kwargs):
        time.sleep(float(self._faults.get("encode_sleep_s", 0)))
        return self._engine.encode(*args, **kwargs)

    def generate(self, *args, **kwargs):
        calls = self._answers
        self._answers += 1
        pause_s = float(self._faults.get("answer_sleep_s", 0))
        if pause_s and calls >= int(self._faults.get("answer_sleep_after", 0)):
            cancel = kwargs.get("cancel")
            cancel.wait(pause_s) if cancel is not None else time.sleep(pause_s)
        if "device_error_after" in self._faults and calls >= int(self._faults["device_error_after"]):
            raise FatalDeviceError("injected: CUDA error: an illegal memory access was encountered")
        if "answer_error_after" in self._faults and calls >= int(self._faults["answer_error_after"]):
            raise RuntimeError("injected model error")
        return self._engine.generate(*args, **kwargs)


def maybe_faulty(engine: Any, faults: str) -> Any:
    """``engine`` wrapped per the JSON in ``faults`` (empty: the engine itself)."""
    return FaultyEngine(engine, json.loads(faults)) if faults else engine
