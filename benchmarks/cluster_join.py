"""`--engine ray` on a cluster of two nodes: what the check that every node reads the job's
input file costs the join (issue 23). Joins a running two-node `ray.cluster_utils.Cluster` of
this machine, on loopback, with the check (`cluster.local_inputs = false`, the default) and
without it, in turn, and prints the medians and their ratio.

    cd benchmarks && ../.venv/bin/python cluster_join.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    warnings.simplefilter("ignore")
    from ray.cluster_utils import Cluster

    from pipeline.cluster import join_cluster

    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    nodes.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    took: dict[bool, list[float]] = {True: [], False: []}
    try:
        with tempfile.TemporaryDirectory() as folder:
            rows = Path(folder) / "in.csv"
            rows.write_text("id,text\n" + "".join(f"r{i},review {i}\n" for i in range(10_000)))
            for _ in range(rounds):
                for unchecked in (True, False):
                    cluster = types.SimpleNamespace(address=nodes.address, local_inputs=unchecked)
                    start = time.perf_counter()
                    with join_cluster(types.SimpleNamespace(cluster=cluster), (rows,)):
                        pass
                    took[unchecked].append(time.perf_counter() - start)
    finally:
        nodes.shutdown()
    without, with_check = statistics.median(took[True]), statistics.median(took[False])
    print(f"join, local_inputs = true (no check): {without:.2f} s")
    print(
        f"join, with the check on 2 nodes:      {with_check:.2f} s ({with_check / without:.1f}x, "
        f"+{with_check - without:.2f} s)"
    )


if __name__ == "__main__":
    main()
