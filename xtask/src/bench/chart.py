"""Draws chart.png from the summary rows of a `cargo xtask bench` results.json.

Run by the benchmark with Debian's python3-matplotlib:
    /usr/bin/python3 chart.py results.json chart.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "direct": "direct",
    "weft": "weft cross-node",
    "weft-same-node": "weft same-node",
    "stunnel": "stunnel",
    "haproxy": "HAProxy",
}
COLORS = {
    "direct": "#7f7f7f",
    "weft": "#1f77b4",
    "weft-same-node": "#aec7e8",
    "stunnel": "#ff7f0e",
    "haproxy": "#2ca02c",
}


def main(source, target):
    with open(source) as f:
        results = json.load(f)
    rows = {row["id"]: row for row in results["summary"]}
    paths = results["paths"]

    panels = [
        (
            "Throughput, iperf3 (Gbit/s, higher is better)",
            [
                ("1 stream", "throughput.iperf1"),
                ("4 streams", "throughput.iperf4"),
                ("8 streams", "throughput.iperf8"),
            ],
            False,
        ),
        (
            "Keep-alive, 1 KB, 1k rps: latency (µs, log)",
            [
                ("p50", "latency.keepalive-rate.p50"),
                ("p90", "latency.keepalive-rate.p90"),
                ("p99", "latency.keepalive-rate.p99"),
                ("p99.9", "latency.keepalive-rate.p99.9"),
            ],
            True,
        ),
        (
            "New connection per request, 1k rps: latency (µs, log)",
            [
                ("p50", "latency.newconn-rate.p50"),
                ("p90", "latency.newconn-rate.p90"),
                ("p99", "latency.newconn-rate.p99"),
                ("p99.9", "latency.newconn-rate.p99.9"),
            ],
            True,
        ),
        (
            "Saturation, 2 clients (per second, higher is better)",
            [
                ("keep-alive req/s", "rate.keepalive-saturation"),
                ("new conn/s", "rate.newconn-saturation"),
            ],
            False,
        ),
        (
            "Saturation, 2 clients: latency (µs, log)",
            [
                ("keep-alive p50", "latency.keepalive-saturation.p50"),
                ("keep-alive p99", "latency.keepalive-saturation.p99"),
                ("new conn p50", "latency.newconn-saturation.p50"),
                ("new conn p99", "latency.newconn-saturation.p99"),
            ],
            True,
        ),
        (
            "HTTP/2 (10 conn × 10 streams) and gRPC (10 conn, 50 callers): saturation (per second)",
            [
                ("HTTP/2 req/s", "rate.http2-saturation"),
                ("gRPC calls/s", "rate.grpc-saturation"),
            ],
            False,
        ),
        (
            "HTTP/2 and gRPC, 1k rps: latency (µs, log)",
            [
                ("HTTP/2 p50", "latency.http2-rate.p50"),
                ("HTTP/2 p99", "latency.http2-rate.p99"),
                ("gRPC p50", "latency.grpc-rate.p50"),
                ("gRPC p99", "latency.grpc-rate.p99"),
            ],
            True,
        ),
        (
            "Proxy CPU per GiB, both ends (s, lower is better)",
            [
                ("1 stream", "cpu.per-gib.iperf1"),
                ("8 streams", "cpu.per-gib.iperf8"),
            ],
            False,
        ),
        (
            "Proxy CPU per 1k requests, both ends (s, log)",
            [
                ("keep-alive 1k rps", "cpu.per-1k.keepalive-rate"),
                ("keep-alive sat.", "cpu.per-1k.keepalive-saturation"),
                ("new conn 1k rps", "cpu.per-1k.newconn-rate"),
                ("new conn sat.", "cpu.per-1k.newconn-saturation"),
                ("HTTP/2 sat.", "cpu.per-1k.http2-saturation"),
                ("gRPC sat.", "cpu.per-1k.grpc-saturation"),
            ],
            True,
        ),
        (
            "Proxy memory, larger end (MiB)",
            [
                ("idle RSS", "memory.idle"),
                ("RSS under load", "memory.peak-under-load"),
                ("high-water", "memory.high-water"),
            ],
            False,
        ),
    ]

    fig, axes = plt.subplots(3, 4, figsize=(22, 15))
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, groups, log) in zip(axes.flat, panels):
        groups = [(label, rows[key]) for label, key in groups if key in rows]
        if not groups:
            ax.set_visible(False)
            continue
        width = 0.8 / max(len(paths), 1)
        for i, path in enumerate(paths):
            xs, ys = [], []
            for g, (_, row) in enumerate(groups):
                value = row["values"].get(path)
                if value is not None and value > 0:
                    xs.append(g + (i - (len(paths) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=LABELS.get(path, path), color=COLORS.get(path))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([label for label, _ in groups], fontsize=9)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.955),
        ncol=len(paths),
        frameon=False,
    )
    machine = results["machine"]
    fig.suptitle(
        f"weft benchmark {results['started']} — {machine['cpu']}, {machine['cores']} cores, "
        f"Linux {machine['kernel']}, weft {machine['weft_commit']}",
        y=0.995,
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(target, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
