#!/usr/bin/env python3
"""Turns bench/results/<date>.json into the results table of
docs/benchmarks.md (between the results markers) and docs/benchmarks.png.

usage: report.py RESULTS.json docs/benchmarks.md docs/benchmarks.png
"""
import json
import statistics
import sys

results_path, md_path, png_path = sys.argv[1:4]
data = json.load(open(results_path))
runs = data["runs"]
SERVERS = ["pollgate", "nchan", "pushpin"]


def med(label, server, key, sub=None):
    vals = []
    for r in runs:
        if r.get("label") == label and r.get("server") == server:
            v = r.get(key)
            if sub is not None and isinstance(v, dict):
                v = v.get(sub)
            if isinstance(v, (int, float)):
                vals.append(v)
    return statistics.median(vals) if vals else None


def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) < 100:
        return f"{v:.2f}{unit}"
    return f"{v:,.0f}{unit}"


rows = []  # (scenario, metric, values per server, ratio, target, met)


def row(label, metric, key, sub=None, target=None, better="high", scale=1.0, unit=""):
    vals = [med(label, s, key, sub) for s in SERVERS]
    vals = [None if v is None else v * scale for v in vals]
    pg, nc = vals[0], vals[1]
    ratio = None if pg is None or not nc else pg / nc
    met = ""
    if target is not None and ratio is not None:
        met = "yes" if (ratio >= target if better == "high" else ratio <= target) else "**no**"
    rows.append((label, metric, [fmt(v, unit) for v in vals], fmt(ratio, "×") if ratio else "–",
                 (("≥ " if better == "high" else "≤ ") + f"{target}× Nchan") if target is not None else "", met))


for label in ["fanout 1ch", "fanout 100ch"]:
    row(label, "deliveries/s", "deliveries_per_sec", target=1.5)
    row(label, "p99 latency (ms)", "latency_ms", "p99", target=0.7, better="low")
    row(label, "p50 latency (ms)", "latency_ms", "p50")
    row(label, "server CPU µs / delivery", "server_cpu_us_per_delivery", better="low")
    row(label, "lost", "lost")
    row(label, "duplicates", "duplicates")
    row(label, "client CPU %", "client_cpu_percent")
for label in ["latency 1ch", "churn", "fanout 10k 1/s"]:
    row(label, "p50 latency (ms)", "latency_ms", "p50", target=0.7, better="low")
    row(label, "p99 latency (ms)", "latency_ms", "p99", target=0.7, better="low")
    row(label, "server CPU µs / delivery", "server_cpu_us_per_delivery", target=0.67, better="low")
    row(label, "… of it in user space", "server_user_us_per_delivery", better="low")
    row(label, "… of it in the kernel", "server_kernel_us_per_delivery", better="low")
    row(label, "client CPU %", "client_cpu_percent")
row("churn", "lost", "lost")
row("hold", "RSS per held poll (KiB)", "rss_per_held_poll", scale=1 / 1024, target=0.8, better="low")
row("hold", "idle server CPU %", "idle_cpu_percent")
row("hold tls", "RSS per held poll (KiB)", "rss_per_held_poll", scale=1 / 1024)
row("hold h2", "RSS per held poll (KiB)", "rss_per_held_poll", scale=1 / 1024)


def per_core(label):
    """Deliveries per second of server CPU time (one core's worth)."""
    vals = [r["delivered"] / r["server_cpu_seconds"] for r in runs
            if r.get("label") == label and r.get("server") == "pollgate" and r.get("server_cpu_seconds")]
    return statistics.median(vals) if vals else None


def extra(label, server):
    """A held poll's extra RSS over TLS or h2 against plain HTTP/1.1, KiB."""
    a, b = med(label, server, "rss_per_held_poll"), med("hold", server, "rss_per_held_poll")
    return (a - b) / 1024 if a is not None and b is not None else None


one, two = per_core("fanout 1ch"), per_core("fanout 1ch threads 2")

mem = med("fanout 1ch", "pollgate", "deliveries_per_sec")
red = med("fanout 1ch redis", "pollgate", "deliveries_per_sec")
red_ratio = (red / mem) if red and mem else None
hold_kib = med("hold", "pollgate", "rss_per_held_poll")
hold_kib = hold_kib / 1024 if hold_kib else None
churn_lost = med("churn", "pollgate", "lost")

lines = [
    f"Run of {data.get('commit', '?')}, {len(runs)} runs, medians per row. "
    "Ratios are pollgate ÷ Nchan in the same run.",
    "",
    "| Scenario | Metric | pollgate | Nchan | Pushpin | pollgate/Nchan | Target | Met |",
    "|---|---|---|---|---|---|---|---|",
]
for label, metric, vals, ratio, target, met in rows:
    lines.append(f"| {label} | {metric} | {' | '.join(vals)} | {ratio} | {target} | {met} |")
lines += [
    "",
    "| Other targets | Measured | Target | Met |",
    "|---|---|---|---|",
    f"| churn: lost messages (pollgate) | {fmt(churn_lost)} | 0 | {'yes' if churn_lost == 0 else '**no**'} |",
    f"| hold: RSS per held poll (pollgate) | {fmt(hold_kib, ' KiB')} | ≤ 8 KiB | {'yes' if hold_kib is not None and hold_kib <= 8 else '**no**'} |",
    f"| Redis broker, 2 instances: deliveries/s ÷ memory broker's | {fmt(red_ratio, '×')} ({fmt(red)} vs {fmt(mem)}) | ≥ 0.8× | {'yes' if red_ratio and red_ratio >= 0.8 else '**no**'} |",
    "",
    "| Reported | pollgate | Nchan |",
    "|---|---|---|",
    f"| extra RSS per held poll over TLS, HTTP/1.1 (KiB) | {fmt(extra('hold tls', 'pollgate'))} | {fmt(extra('hold tls', 'nchan'))} |",
    f"| extra RSS per held poll over HTTP/2 on TLS, 100 per connection (KiB) | {fmt(extra('hold h2', 'pollgate'))} | {fmt(extra('hold h2', 'nchan'))} |",
    f"| fanout 1ch deliveries per core-second, `threads: 1` | {fmt(one)} | – |",
    f"| fanout 1ch deliveries per core-second, `threads: 2` | {fmt(two)} ({fmt(two / one if one and two else None, '×')}) | – |",
    f"| churn: server CPU per delivery (µs), presence off / on (`webhooks: {{linger: 15s}}`) | {fmt(med('churn', 'pollgate', 'server_cpu_us_per_delivery'))} / {fmt(med('churn presence', 'pollgate', 'server_cpu_us_per_delivery'))} | – |",
    "",
    "| Watch routes (one resource, one write a second) | backend requests per change | backend requests/s | change → client p50 / p99 (ms) | clients |",
    "|---|---|---|---|---|",
    f"| through a pollgate watch route | {fmt(med('watch', 'pollgate', 'backend_requests_per_change'))} (goal 1) | {fmt(med('watch', 'pollgate', 'backend_requests_per_sec'))} | {fmt(med('watch', 'pollgate', 'delay_ms', 'p50'))} / {fmt(med('watch', 'pollgate', 'delay_ms', 'p99'))} | {fmt(med('watch', 'pollgate', 'subscribers'))} |",
    f"| polling the backend every second | {fmt(med('watch direct', 'pollgate', 'backend_requests_per_change'))} | {fmt(med('watch direct', 'pollgate', 'backend_requests_per_sec'))} | {fmt(med('watch direct', 'pollgate', 'delay_ms', 'p50'))} / {fmt(med('watch direct', 'pollgate', 'delay_ms', 'p99'))} | {fmt(med('watch direct', 'pollgate', 'subscribers'))} |",
    "",
    "![benchmark chart](benchmarks.png)",
]
block = "\n".join(lines)

md = open(md_path).read() if __import__("os").path.exists(md_path) else "# Benchmarks\n"
begin, end = "<!-- results:begin -->", "<!-- results:end -->"
if begin in md and end in md:
    md = md[: md.index(begin) + len(begin)] + "\n" + block + "\n" + md[md.index(end):]
else:
    md += f"\n{begin}\n{block}\n{end}\n"
open(md_path, "w").write(md)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(2, 2, figsize=(11, 7))
colors = {"pollgate": "#2b7bba", "nchan": "#8c8c8c", "pushpin": "#e08a2b"}


def bars(ax, title, series, unit):
    labels = [s[0] for s in series]
    width = 0.26
    for i, server in enumerate(SERVERS):
        vals = [med(lbl, server, key, sub) or 0 for (lbl, key, sub) in [s[1] for s in series]]
        xs = [x + (i - 1) * width for x in range(len(series))]
        ax.bar(xs, vals, width, label=server, color=colors[server])
    ax.set_xticks(range(len(series)))
    ax.set_xticklabels(labels)
    ax.set_title(title)
    ax.set_ylabel(unit)


bars(axes[0][0], "Deliveries per second (higher is better)",
     [("10k subs, 1 ch", ("fanout 1ch", "deliveries_per_sec", None)),
      ("10k subs, 100 ch", ("fanout 100ch", "deliveries_per_sec", None))], "deliveries/s")
bars(axes[0][1], "p99 publish→receive latency (lower is better)",
     [("2k subs, 5 msg/s", ("latency 1ch", "latency_ms", "p99")),
      ("churn", ("churn", "latency_ms", "p99")),
      ("10k subs saturated", ("fanout 1ch", "latency_ms", "p99"))], "ms")
bars(axes[1][0], "Server CPU per delivery (lower is better)",
     [("fanout 1 ch", ("fanout 1ch", "server_cpu_us_per_delivery", None)),
      ("fanout 100 ch", ("fanout 100ch", "server_cpu_us_per_delivery", None)),
      ("churn", ("churn", "server_cpu_us_per_delivery", None))], "µs")
bars(axes[1][1], "Server RSS per held poll (lower is better)",
     [("18k idle polls", ("hold", "rss_per_held_poll", None))], "bytes")
axes[0][1].set_yscale("log")
axes[1][0].set_yscale("log")
axes[0][0].legend()
fig.tight_layout()
fig.savefig(png_path, dpi=90)
