"""`--engine ray`: a run whose requests are sent by workers on a Ray cluster.

Everything but the sending stays with this process, the driver, as in a local run: the checks,
the lock, the journal, the row feed, the reuse of identical requests and of earlier answers,
the output in input order, `status`, `--restart`, `--incremental`, `--max-runtime`, the exit
codes. `ClusterAnswerer` is the run's answerer: where a local one asks the API, it hands rows,
`unit_rows` at a time, to the least busy `Worker` actor and awaits their answers
(`cluster_actors`), which it journals as they come back. The job's one rate and token limit and
its one budget live in the `Coordinator` actor, which every worker asks before each request.
The cluster is joined before the journal opens, so that what the join refuses (a cluster Ray
cannot join, an input file only this machine has on a cluster of several nodes) leaves nothing.

What a crash can cost is what was in flight: a worker that dies has its rows handed to another
(their requests may have been billed: they are journaled as lost attempts of unknown cost), and
the driver's death takes the Coordinator with it, so no worker starts another request.

Ray is imported here only, and this module only for `--engine ray`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.attempt import ChatAnswerer, _failed, abandoned_id
from pipeline.budget import Cap
from pipeline.errors import Kind, UserError
from pipeline.options import describe
from pipeline.records import Result, Row

INSTALL = "pip install 'prompt-pipeline[ray]'"
LINGER = 0.002  # seconds a row waits for others to go with it to a worker
HANDOVERS = 8  # times a unit is handed to another worker after its worker died
HANDOVER_PAUSE = 0.5  # seconds before the first hand-over, growing with each
DOWN_FOR = 10.0  # seconds a worker that died is passed over
WORKERS_PER_NODE = 2
LOOPBACK = ("127.0.0.1", "localhost")
GCS_PORT, CLIENT_PORT = 6379, 10001  # Ray's defaults: the head's GCS, its Ray Client server
PROBE_TIMEOUT = 5.0  # seconds to wait for the head to answer at all
NODE_CHECK_TIMEOUT = 60.0  # seconds for every node to say what it reads at an input's path
SAMPLE_BYTES = 1 << 16  # of each input file, compared between the driver and the nodes
_DRIVER_ONLY = (  # the way out of refusing an input file only this machine has
    f"or set {describe('cluster.local_inputs')} = true if every run's driver runs on this machine"
)


def import_ray() -> Any:
    """Ray, or a `UserError` saying how to install it (before anything is sent)."""
    try:
        import ray
    except ImportError:
        raise UserError(
            f"{describe('cluster.engine')} ray needs Ray, which is not installed: {INSTALL}"
        ) from None
    return ray


def check_engine(config: Any) -> None:
    """What `--engine ray` cannot run, refused up front."""
    if config.cluster.engine != "ray":
        return
    import_ray()
    if config.request.mode != "sync":
        raise UserError(
            f"{describe('cluster.engine')} ray sends requests one by one; {describe('request.mode')} "
            f"{config.request.mode} sends batch files from one place: run it with --engine local"
        )
    if config.request.endpoint == "embeddings":
        raise UserError(
            f"{describe('cluster.engine')} ray does not run embeddings jobs yet: run it with --engine local"
        )
    _check_kept(config.output)
    _check_reachable(_address(config))


def _address(config: Any) -> str:
    """The cluster to join: `cluster.address`, else $RAY_ADDRESS, else a Ray of this machine's."""
    return config.cluster.address or os.environ.get("RAY_ADDRESS") or "local"


def _host_port(address: str) -> tuple[str, str]:
    """The host and port (or "") of a Ray address ("ray://10.0.0.5:10001", "127.0.0.1:6379")."""
    bare = address.split("://", 1)[-1]
    host, _, port = bare.rpartition(":") if ":" in bare else (bare, "", "")
    return host, port


def _check_reachable(address: str) -> None:
    """A UserError, at once, if nothing listens at `address`: Ray itself retries an address
    nobody answers at for minutes, logging as it goes."""
    if address in ("local", "auto"):
        return  # this machine's own: Ray says at once if there is none
    host, port = _host_port(address)
    default = CLIENT_PORT if address.startswith("ray://") else GCS_PORT
    try:
        with socket.create_connection((host, int(port or default)), timeout=PROBE_TIMEOUT):
            pass
    except (OSError, ValueError) as exc:
        why = "nothing answers there" if isinstance(exc, OSError) else "its port is not a number"
        raise UserError(
            f"cannot join the Ray cluster at {address} ({describe('cluster.address')}): {why}; "
            "check the address (the head's host:6379, or ray://host:10001) and that the cluster is up"
        ) from None


class Cluster:
    """The job's Ray side: the connection, the Coordinator and the workers."""

    def __init__(self, ray: Any, coordinator: Any, workers: list[Any]) -> None:
        self.ray = ray
        self.coordinator = coordinator
        self.workers = workers


@contextlib.contextmanager
def join_cluster(config: Any, inputs: tuple[Any, ...]) -> Iterator[Any]:
    """Join the cluster (or start one on this machine, on loopback) before the run writes
    anything, refuse `inputs` that only this machine has if the cluster has other nodes, and
    leave it at the end (the job's actors go with the driver)."""
    ray = import_ray()
    address = _address(config)
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    loopback = address != "local" and _host_port(address)[0] in LOOPBACK
    if address == "local":  # this machine's own: reachable from nowhere else
        options |= {"_node_ip_address": "127.0.0.1", "include_dashboard": False}
    elif loopback:  # a cluster on loopback: join it there, not on the LAN
        # Ray swaps a loopback address for the machine's own unless told it is no cluster
        # platform (the one switch its address lookup reads, at the time of the call).
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        options["_node_ip_address"] = "127.0.0.1"
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        # `ray start --node-ip-address 127.0.0.1` puts the node on the machine's own address
        # unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: its GCS answers here, its node does not.
        hint = (
            "; a cluster started by `ray start` is on this machine's own address unless started "
            "with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: give that address, or start it so"
            if loopback
            else ""
        )
        raise UserError(
            f"cannot join the Ray cluster at {address} ({describe('cluster.address')}): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}{hint}"
        ) from None
    try:
        if not config.cluster.local_inputs:
            _check_every_node_reads(
                ray, [os.path.abspath(p) for p in inputs if isinstance(p, Path)]
            )
        yield ray
    finally:
        ray.shutdown()


def _check_kept(output: Any) -> None:
    """A UserError if the output or its journal would be written into Ray's copy of a submitted
    job's working directory (a relative `output.path` under `ray job submit --working-dir`),
    which Ray deletes with its session: the output lost, and the next run paying again."""
    for what, path in (("output.path", output.local_path), ("output.journal", output.journal_path)):
        parts = Path(os.path.abspath(path)).parts
        if any(
            a.startswith("session_") and b == "runtime_resources"
            for a, b in itertools.pairwise(parts)
        ):
            raise UserError(
                f"{what} {path} is inside Ray's copy of the job's working directory, which Ray "
                "deletes with its session (and with the journal, the next run pays again): give "
                f"{what} as an absolute path on storage the head keeps, or an object-store URL"
            )


def _check_every_node_reads(ray: Any, paths: list[str]) -> None:
    """A UserError if a node of a cluster of more than one cannot read the very files this
    driver reads: a file on one machine's disk works only while every run's driver runs
    there, and a re-run, a cron run or `--incremental` landing on another node would find it
    missing, or a different file at the same path."""
    nodes = _alive_nodes(ray)
    if len(nodes) < 2 or not paths:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = _sample(paths)
    sample = ray.remote(num_cpus=0)(_sample)
    asked = [
        sample.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(paths)
        for node in nodes
    ]
    try:
        seen = ray.get(asked, timeout=NODE_CHECK_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        raise UserError(
            f"cannot check that every node of the cluster reads the input: a node did not answer "
            f"in {NODE_CHECK_TIMEOUT:.0f} s; try again, {_DRIVER_ONLY}"
        ) from None
    for node, theirs in zip(nodes, seen, strict=True):
        for path, mine, its in zip(paths, here, theirs, strict=True):
            if its != mine:
                there = "has no such file" if its is None else "has a different file there"
                raise UserError(
                    f"input file {path} is on this machine only: the cluster's node "
                    f"{node['NodeManagerAddress']} ({node['NodeID'][:8]}) {there}; on a cluster of "
                    "more than one node give a path every node mounts or an object-store URL "
                    f"(s3://...), {_DRIVER_ONLY}"
                )


def _alive_nodes(ray: Any) -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


def _sample(paths: list[str]) -> list[tuple[int, str] | None]:
    """Each file's size and the digest of its first bytes, as this process sees it (None:
    it cannot read it): run by the driver and on each node."""
    seen: list[tuple[int, str] | None] = []
    for path in paths:
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                seen.append((size, hashlib.sha256(file.read(SAMPLE_BYTES)).hexdigest()))
        except OSError:
            seen.append(None)
    return seen


def start_actors(
    ray: Any, config: Any, key: str, catalogue: Any, answers: Any, caps: list[Cap]
) -> Cluster:
    """The job's Coordinator and workers on the joined cluster."""
    from pipeline.cluster_actors import CoordinatorActor, WorkerActor

    count = config.cluster.workers or WORKERS_PER_NODE * max(len(_alive_nodes(ray)), 1)
    head = {"resources": {"node:__internal_head__": 0.001}} if _address(config) != "local" else {}
    limits = config.limits
    job = {
        "config": config, "catalogue": catalogue, "answers": answers, "caps": caps,
        "fallbacks": config.request.fallback_models or (),
    }  # fmt: skip
    # Named, so that workers look it up: an actor handle among a worker's arguments would
    # keep Ray from starting the worker again after a crash (ray-project/ray#53727).
    name = f"pipeline-coordinator-{uuid.uuid4().hex}"
    coordinator = CoordinatorActor.options(name=name, **head).remote(
        limits.requests_per_second, limits.tpm, job
    )
    workers = [
        WorkerActor.options(num_cpus=0, scheduling_strategy="SPREAD").remote(key, name)
        for _ in range(count)
    ]
    return Cluster(ray, coordinator, workers)


class ClusterAnswerer(ChatAnswerer):
    """`answer(row)` by the cluster's workers: the driver's answerer reuses identical requests'
    answers (`ChatAnswerer.__call__`) and hands the rest to the workers."""

    def __init__(self, cluster: Cluster, *args: Any, unit_rows: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cluster = cluster
        self.unit_rows = unit_rows
        self._waiting: dict[asyncio.Future[Any], Row] = {}  # rows not yet handed to a worker
        self._linger: asyncio.TimerHandle | None = None
        self._load = [0] * len(cluster.workers)  # rows each worker holds
        self._seen = [(0, 0)] * len(cluster.workers)  # its retries and 429s, as last told
        self._down = [0.0] * len(cluster.workers)  # when each lost worker is tried again
        self._tickets = itertools.count()
        self._units: set[asyncio.Task[None]] = set()
        self._watching: asyncio.Task[None] | None = None
        ray = cluster.ray
        self._worker_lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    async def _checked(
        self, row: Row, *, attempts: int = 0, invalid: int = 0, rejected: Result | None = None
    ) -> list[Result]:
        loop = asyncio.get_running_loop()
        if self._watching is None:
            self._watching = asyncio.create_task(self._stop_when_stopping())
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[future] = row
        if len(self._waiting) >= self.unit_rows:
            self._hand_over()
        elif self._linger is None:
            self._linger = loop.call_later(LINGER, self._hand_over)
        try:
            outcome = await future
        except asyncio.CancelledError:
            if self._waiting.pop(future, None) is None:  # handed over: perhaps being sent
                self.on_lost((abandoned_id(), row.slot, Kind.ABANDONED))
            raise
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[no-any-return]

    async def _stop_when_stopping(self) -> None:
        """The run stops taking rows: no worker starts another request."""
        await self.stopping.wait()
        self.cluster.coordinator.stop.remote()

    def _hand_over(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self._waiting:
            return
        unit, self._waiting = self._waiting, {}
        task = asyncio.create_task(self._answer(list(unit), list(unit.values())))
        self._units.add(task)
        task.add_done_callback(self._units.discard)

    async def _answer(self, futures: list[asyncio.Future[Any]], rows: list[Row]) -> None:
        """One unit's answers, from the least busy worker; from another if that one dies."""
        try:
            for handover in range(HANDOVERS):
                if handover:  # give Ray a moment to start the lost workers again
                    await asyncio.sleep(min(HANDOVER_PAUSE * handover, 5.0))
                index = self._pick()
                ticket = next(self._tickets)
                self._load[index] += len(rows)
                try:
                    reply = await self.cluster.workers[index].answer.remote(ticket, rows)
                except self._worker_lost:
                    # Passed over while Ray starts it again (elsewhere, if its node is gone).
                    self._down[index] = asyncio.get_running_loop().time() + DOWN_FOR
                    # Its requests may have been billed: their spend is unknown, not none.
                    self.cluster.coordinator.forget.remote(ticket)
                    for row in rows:
                        self.on_lost((abandoned_id(), row.slot, Kind.ABANDONED))
                    continue
                finally:
                    self._load[index] -= len(rows)
                outcomes, lost, retries, limited = reply
                for attempt in lost:
                    self.on_lost(attempt)
                self._tell(index, retries, limited)
                for future, outcome in zip(futures, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
                return
            message = (
                f"its worker on the cluster died {HANDOVERS} times; the next run sends it again"
            )
            for future, row in zip(futures, rows, strict=True):
                if not future.done():
                    future.set_result(
                        _failed(row, Kind.ABANDONED, message, 0, retry_on_resume=True)
                    )
        except BaseException as exc:  # a bug, or the run being cancelled: the rows' workers see it
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def _pick(self) -> int:
        """The least busy of the workers not lately lost (of all, if every one was)."""
        now = asyncio.get_running_loop().time()
        up = [i for i, until in enumerate(self._down) if until <= now] or range(len(self._down))
        return min(up, key=self._load.__getitem__)

    def _tell(self, index: int, retries: int, limited: int) -> None:
        """A worker's retries and 429s so far: what is new of them counts for the run."""
        seen_retries, seen_limited = self._seen[index]
        self.retries += max(0, retries - seen_retries)
        self.limits.rate_limited += max(0, limited - seen_limited)
        self._seen[index] = (max(retries, seen_retries), max(limited, seen_limited))
