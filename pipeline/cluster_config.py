"""`[cluster]`: where a job's requests are sent from. `engine = "local"` (the default) sends them
from this process; `"ray"` from workers on a Ray cluster (`pipeline.cluster`), the journal, the
output and every check staying with this process. Apart from `config` so that module stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.values import RawValues

ENGINES = ("local", "ray")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    engine: str = "local"
    # The cluster to join ("ray://host:10001", "host:6379", "auto"); unset: $RAY_ADDRESS (set by
    # `ray job submit`), else a Ray instance of this machine's own, on loopback.
    address: str | None = None
    workers: int | None = None  # worker actors; unset: two a node
    unit_rows: int = 32  # rows handed to a worker at once (its answers come back together)
    # Inputs on the driver's machine only are accepted on a cluster of more than one node (each
    # run's driver must then run there); else refused unless every node reads the same files.
    local_inputs: bool = False


def cluster_config(v: RawValues) -> ClusterConfig:
    """The `[cluster]` section; a key left unset keeps its default."""
    given: dict[str, Any] = {
        "engine": v.choice("cluster.engine", ENGINES),
        "address": v.string("cluster.address"),
        "workers": v.integer("cluster.workers", low=1),
        "unit_rows": v.integer("cluster.unit_rows", low=1),
        "local_inputs": v.flag("cluster.local_inputs") or None,
    }
    return ClusterConfig(**{key: value for key, value in given.items() if value is not None})
