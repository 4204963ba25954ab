"""A local OpenRouter: the server that tests, benchmarks, demos and `--simulate` runs talk to.

It follows `docs/openrouter-api.md` §8: the same routes, bodies, headers and error shapes as
OpenRouter, deterministic answers that quote a digest of their prompt, a ledger of everything
billed, and faults on demand (see `faults.py`).
"""

from pipeline.simulator.catalogue import CATALOGUE, DEFAULT_MODEL, MODELS_BY_ID, SimModel
from pipeline.simulator.config import Latency, SimConfig
from pipeline.simulator.content import messages_digest
from pipeline.simulator.faults import Fault, FaultSpecError, parse_rates
from pipeline.simulator.runner import RunningSimulator, SimulatorThread, serve, serve_forever, start
from pipeline.simulator.server import API, Simulator

__all__ = [
    "API",
    "CATALOGUE",
    "DEFAULT_MODEL",
    "MODELS_BY_ID",
    "Fault",
    "FaultSpecError",
    "Latency",
    "RunningSimulator",
    "SimConfig",
    "SimModel",
    "Simulator",
    "SimulatorThread",
    "messages_digest",
    "parse_rates",
    "serve",
    "serve_forever",
    "start",
]
