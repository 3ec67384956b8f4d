"""Which exceptions mean the accelerator is unusable (the one classification the worker acts on).

A CUDA error leaves the device in an unknown state: the worker must leave the job group and exit
(its unacknowledged jobs go to other workers) instead of failing job after job. Out of memory is
recoverable: that job fails, the worker stays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from moments.core.errors import FatalDeviceError

_MARKERS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert")


def is_device_error(exc: BaseException) -> bool:
    if isinstance(exc, FatalDeviceError):
        return True
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _MARKERS)


@contextlib.contextmanager
def device_errors() -> Iterator[None]:
    """Re-raise device failures as :class:`FatalDeviceError`; everything else unchanged."""
    try:
        yield
    except FatalDeviceError:
        raise
    except Exception as exc:
        if is_device_error(exc):
            raise FatalDeviceError(f"device error: {exc}") from exc
        raise
