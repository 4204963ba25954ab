"""Ways to run the simulator: inside an event loop, in a background thread, or as a server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import TracebackType

from aiohttp import web

from pipeline.simulator.config import SimConfig
from pipeline.simulator.server import API, Simulator

LOOPBACK = "127.0.0.1"


class RunningSimulator:
    """A simulator listening on a socket: `base_url` is what a client puts in its config."""

    def __init__(self, simulator: Simulator, runner: web.AppRunner, host: str, port: int) -> None:
        self.simulator = simulator
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + API


async def start(
    config: SimConfig | None = None, host: str = LOOPBACK, port: int = 0
) -> RunningSimulator:
    """Start listening (port 0 picks a free port) and return at once."""
    simulator = Simulator(config)
    # A short shutdown timeout: hanging requests are released by the `closing` event anyway.
    runner = web.AppRunner(simulator.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    sockets = runner.addresses
    bound_port = sockets[0][1] if sockets else port
    return RunningSimulator(simulator, runner, host, bound_port)


@contextlib.asynccontextmanager
async def serve(
    config: SimConfig | None = None, host: str = LOOPBACK, port: int = 0
) -> AsyncIterator[RunningSimulator]:
    """`async with serve() as sim:` — the simulator runs for the body of the block."""
    running = await start(config, host, port)
    try:
        yield running
    finally:
        running.simulator.closing.set()
        await running.runner.cleanup()


class SimulatorThread:
    """The simulator on its own event loop in a daemon thread, for tests that run the CLI."""

    def __init__(self, config: SimConfig | None = None, host: str = LOOPBACK) -> None:
        self._config = config
        self._host = host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="openrouter-simulator", daemon=True
        )
        self.running: RunningSimulator | None = None

    def __enter__(self) -> RunningSimulator:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start(self._config, self._host), self._loop)
        self.running = future.result(timeout=10)
        return self.running

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.running is not None:
            running = self.running

            async def stop() -> None:
                running.simulator.closing.set()
                await running.runner.cleanup()

            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def serve_forever(
    config: SimConfig, host: str, port: int, announce: Callable[[RunningSimulator], None]
) -> None:
    """Serve until SIGINT or SIGTERM; `announce` is told the address once listening."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(config, host, port) as running:
        # Out of the garbage collector's sight from now on: its full collections otherwise scan
        # every module object, a ~40 ms pause that stamps the arrivals behind it late and shows
        # a client's even pace as a burst (benchmarks/run.py, rate precision).
        gc.freeze()
        announce(running)
        await stop.wait()
