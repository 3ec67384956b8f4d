"""Run only the front end (``python -m moments.service``), with settings from ``MOMENTS_*`` variables."""

from __future__ import annotations

import asyncio
import signal

from moments.core.config import Settings
from moments.core.logs import setup_logging
from moments.service.server import start_front_end


async def main() -> None:
    settings = Settings.from_env()
    setup_logging(settings.log_level, settings.log_json)
    if not settings.redis_configured:
        raise SystemExit("set MOMENTS_REDIS_URL or MOMENTS_REDIS_SENTINELS")
    front = await start_front_end(settings)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await front.stop(grace_s=10.0)


if __name__ == "__main__":
    asyncio.run(main())
