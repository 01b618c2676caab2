"""Draws chart.png from a `cargo xtask soak` results.json: each agent's RSS (and the
memory its allocator handed out) and open file descriptors over the soak, the load's progress, and the churn steps.

Run by the soak with Debian's python3-matplotlib:
    /usr/bin/python3 chart.py results.json chart.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results_path, png_path):
    with open(results_path) as f:
        results = json.load(f)
    samples = results["samples"]
    nodes = sorted({s["node"] for s in samples})
    figure, (rss, fds, load) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for node in nodes:
        mine = [s for s in samples if s["node"] == node]
        minutes = [s["seconds"] / 60 for s in mine]
        line = rss.plot(minutes, [s["rss_bytes"] / 2**20 for s in mine], label=f"agent {node} RSS")
        heap = [s for s in mine if s.get("heap_bytes")]
        if heap:
            rss.plot(
                [s["seconds"] / 60 for s in heap],
                [s["heap_bytes"] / 2**20 for s in heap],
                linestyle="--",
                color=line[0].get_color(),
                label=f"agent {node} heap in use",
            )
        fds.plot(minutes, [s["fds"] for s in mine], label=f"agent {node}")
    first = [s for s in samples if s["node"] == nodes[0]] if nodes else []
    minutes = [s["seconds"] / 60 for s in first]
    load.plot(minutes, [s["requests"] / 1e6 for s in first], label="requests (millions)")
    load.plot(
        minutes,
        [s["new_connections"] / 1e6 for s in first],
        label="new connections (millions)",
    )
    load.plot(minutes, [s["failed"] / 1e6 for s in first], label="failed requests (millions)")
    for axis in (rss, fds, load):
        for event in results["events"]:
            axis.axvline(event["seconds"] / 60, color="#dddddd", linewidth=0.5, zorder=0)
        axis.grid(True, linewidth=0.3)
        axis.legend(loc="upper left", fontsize="small")
    rss.set_ylabel("memory (MiB)")
    rss.set_ylim(bottom=0)
    fds.set_ylabel("open file descriptors")
    fds.set_ylim(bottom=0)
    load.set_ylabel("count (millions)")
    load.set_xlabel("minutes (grey lines: churn steps)")
    figure.suptitle(
        f"weft soak: {results['new_connections']:,} new connections, "
        f"{results['requests']:,} requests, {results['failed']:,} failed; "
        f"{results['certificates_issued']:,} certificates issued"
    )
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
