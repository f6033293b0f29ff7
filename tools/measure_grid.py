"""Cells per minute of `refldm.grid.run` in this process, in 1 and 2 local processes, and on a Dask LocalCluster
of 1 and 2 workers; the cluster path's overhead per cell against in-process (docs/scale-out.md).

    nice -n 10 python tools/measure_grid.py [--cells 6] [--size 256] [--steps 20] [--repeats 2]
    nice -n 10 python tools/measure_grid.py --only-overhead --cells 20 --repeats 4     # 32x32, 2 steps
    nice -n 10 python tools/measure_grid.py --only-overhead --cells 3 --repeats 2 --size 256 --steps 20

Every run is the same grid (a seed axis of --cells values, the built-in model); the clusters are started
before the clock starts (a long-lived cluster is the use case), the local processes are not (they start per
run). Prints one line per executor and the load average, as JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=6)
    ap.add_argument("--size", type=int, default=None, help="image side (default 256; 32 with --only-overhead)")
    ap.add_argument("--steps", type=int, default=None, help="steps (default 20; 2 with --only-overhead)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only-overhead", action="store_true",
                    help="only the dispatch overhead: --cells cells of 32x32, 2 steps, in-process against a "
                         "LocalCluster of 1 worker (repeated --repeats times, interleaved)")
    args = ap.parse_args()
    if not args.only_overhead:
        args.size, args.steps = args.size or 256, args.steps or 20
    import distributed

    from refldm.grid import GridSpec, run
    from refldm.grid.executors import local_cluster
    root = tempfile.mkdtemp(prefix="refldm-measure-")

    def spec(name):
        return GridSpec("a large red circle in the center on a white background",
                        x="seed=" + ",".join(str(i) for i in range(args.cells)), width=args.size,
                        height=args.size, steps=args.steps, cfg=3.0, out=os.path.join(root, name))

    results = {}

    def measure(label, repeats=None, **kw):
        for r in range(repeats or args.repeats):
            name = f"{label}-{r}-{len(results.get(label, []))}".replace(" ", "_").replace(":", "")
            start = time.perf_counter()
            manifest = run(spec(name), progress=False, **kw)
            wall = time.perf_counter() - start
            compute = sum(c["seconds"] for c in manifest["cells"])
            assert all(c["status"] == "ok" for c in manifest["cells"]), manifest["cells"]
            row = results.setdefault(label, [])
            row.append({"wall_s": round(wall, 2), "cells_per_min": round(60 * args.cells / wall, 2),
                        "cell_compute_s": round(compute / args.cells, 3),
                        "outside_cell_s_per_cell": round((wall - compute) / args.cells, 4),
                        "load": os.getloadavg()[0]})
            print(label, row[-1], flush=True)
            shutil.rmtree(os.path.join(root, name))

    if args.only_overhead:
        args.size, args.steps = args.size or 32, args.steps or 2
        client = distributed.Client(local_cluster(1, silence_logs=50))
        try:
            run(spec("warm"), client=client, progress=False)  # the worker loads the model once, as a long grid
            for _ in range(args.repeats):  # interleaved, one run each at a time
                measure("in-process", repeats=1)
                measure("dask local:1", client=client, repeats=1)
        finally:
            client.close()
            client.cluster.close() if getattr(client, "cluster", None) else None
        best = {k: min(x["wall_s"] for x in v) for k, v in results.items()}
        outside = {k: min(x["outside_cell_s_per_cell"] for x in v) for k, v in results.items()}
        print(json.dumps({"cells": args.cells, "best_wall_s": best, "outside_cell_s_per_cell": outside,
                          "overhead_per_cell_ms_outside": round(1000 * (outside["dask local:1"] -
                                                                        outside["in-process"]), 1),
                          "overhead_per_cell_ms":
                          round(1000 * (best["dask local:1"] - best["in-process"]) / args.cells, 1),
                          "loadavg": os.getloadavg(), "runs": results}, indent=1))
        return
    clusters = {}
    for n in (1, 2):
        cluster = local_cluster(n, silence_logs=50)
        clusters[n] = (distributed.Client(cluster), cluster)
    try:
        for _ in range(1):  # interleaved, so the machine's load falls on every executor alike
            measure("in-process")
            measure("dask local:1", client=clusters[1][0])
            measure("workers 1", workers=1)
            measure("workers 2", workers=2)
            measure("dask local:2", client=clusters[2][0])
    finally:
        for client, cluster in clusters.values():
            client.close()
            cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    best = {k: min(r["wall_s"] for r in v) for k, v in results.items()}
    overhead = (best["dask local:1"] - best["in-process"]) / args.cells
    summary = {"cells": args.cells, "size": args.size, "steps": args.steps, "best_wall_s": best,
               "cells_per_min": {k: round(60 * args.cells / v, 2) for k, v in best.items()},
               "dask_overhead_per_cell_s": round(overhead, 3),
               "dask_overhead_percent": round(100 * overhead / (best["in-process"] / args.cells), 1),
               "loadavg": os.getloadavg(), "cpus": os.cpu_count(), "runs": results}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
