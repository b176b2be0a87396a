"""The benchmark's figures (from the runs' raw measurements) and its outputs: results.json,
results.md (a markdown table), completion.png (every host's completion time) and
progress.png (the share of the release the fleet holds over time, against the limit)."""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

IDLE_FLAG = 0.10  # a run whose CPU idle share was below this was CPU-bound: flagged
MiB = 1024 * 1024


def t_min(size: int, hosts: int, b: float, b_origin: float) -> float:
    """The physical limit: max(S/B_origin, S/B, N·S/(B_origin + N·B)), B in bytes/s."""
    return max(size / b_origin, size / b, hosts * size / (b_origin + hosts * b))


def run_figures(run: dict[str, Any], size: int, limit: float, racks: int) -> dict[str, Any]:
    """The figures of one run: times, η, origin egress and cross-rack bytes per S."""
    times = [t for t in run["host_times"].values()]
    done = sorted(t for t in times if t is not None)
    complete = len(done) == len(times) and bool(times)
    before, after = run["counters_before"], run["counters_after"]
    measured = before is not None and after is not None
    egress = after["origin_tx"] - before["origin_tx"] if measured else None
    figures: dict[str, Any] = {
        "t_first": done[0] if done else None,
        "t_p50": statistics.median(done) if complete else None,
        "t_last": done[-1] if complete else None,
        "eta": limit / done[-1] if complete and done[-1] > 0 else None,
        "origin_egress_bytes": egress,
        "origin_egress_ratio": egress / size if measured else None,
        "cpu_seconds": run["cpu_seconds"],
        "cpu_system_seconds": run.get("cpu_system_seconds"),
        "cpu_seconds_origin": run["cpu_seconds_origin"],
        "cpu_idle": run["cpu_idle"],
        "cpu_idle_min_1s": run["cpu_idle_min_1s"],
        "correct": run["correct"],
    }
    if racks and measured:
        cross = sum(after[f"rack{r}_in"] - before[f"rack{r}_in"] for r in range(1, racks + 1))
        figures["cross_rack_bytes"] = cross
        figures["cross_rack_ratio"] = cross / (racks * size)
    elif racks:
        figures["cross_rack_bytes"] = figures["cross_rack_ratio"] = None
    return figures


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if len(present) != len(values) or not present:
        return None
    return statistics.median(present)


def summarize(runs: list[dict[str, Any]], size: int, limit: float, racks: int) -> dict[str, Any]:
    """One system's figures over its runs: medians (a figure is null if a run lacks it)."""
    per_run = [run_figures(r, size, limit, racks) for r in runs]
    keys = ["t_first", "t_p50", "t_last", "eta", "origin_egress_ratio", "origin_egress_bytes",
            "cpu_seconds", "cpu_system_seconds", "cpu_seconds_origin", "cpu_idle"]  # fmt: skip
    if racks:
        keys += ["cross_rack_ratio", "cross_rack_bytes"]
    summary: dict[str, Any] = {k: _median([f[k] for f in per_run]) for k in keys}
    idles = [f["cpu_idle_min_1s"] for f in per_run if f["cpu_idle_min_1s"] is not None]
    summary["cpu_idle_min_1s"] = min(idles) if idles else None
    summary["cpu_saturated"] = summary["cpu_idle"] is not None and summary["cpu_idle"] < IDLE_FLAG
    summary["correct"] = all(f["correct"] for f in per_run)
    hosts = list(runs[0]["host_times"])
    summary["host_times"] = {h: _median([r["host_times"][h] for r in runs]) for h in hosts}
    summary["runs"] = [
        {
            **f,
            "host_times": r["host_times"],
            "host_progress": r.get("host_progress", {}),
            "origin_upload": r.get("origin_upload", []),
            "problems": r["problems"],
            "wall_s": r["wall_s"],
        }
        for f, r in zip(per_run, runs)
    ]
    return summary


def add_ratios(systems: dict[str, dict[str, Any]]) -> None:
    """T_last(other) / T_last(roost) for every system (roost itself: 1.0)."""
    base = systems.get("roost", {}).get("t_last")
    for s in systems.values():
        s["ratio_to_roost"] = s["t_last"] / base if base and s.get("t_last") else None


# ---------------------------------------------------------------------------
# output


def fmt_num(value: Any, fmt: str) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else fmt.format(value)
    )


def markdown(results: dict[str, Any]) -> str:
    sc = results["scenario"]
    tb = results["testbed"]
    check = tb["self_check"]
    racks = sc["racks"]
    lines = [
        f"`{results['command']}`",
        "",
        f"N = {sc['hosts']} hosts, S = {sc['size_bytes'] / MiB:.0f} MiB ({sc['files']} files,"
        f" {sc['pieces']} pieces of {sc['piece_size'] / 1024:.0f} KiB),"
        f" B = {sc['bandwidth']}, B_origin = {sc['origin_bandwidth']}"
        + (f", {racks} racks behind {sc['uplink']} uplinks" if racks else "")
        + f"; {sc['repeat']} run(s) per system"
        + (", medians" if sc["repeat"] > 1 else "")
        + ".",
        f"Measured on the testbed: B = {tb['bandwidth_Bps'] / 1e6:.2f} MB/s,"
        f" B_origin = {tb['origin_bandwidth_Bps'] / 1e6:.2f} MB/s (TCP payload);"
        f" T_min = {tb['t_min']:.2f} s. Self-check "
        + ("passed" if check["passed"] else "**FAILED** (figures not trusted)")
        + " ("
        + ", ".join(f"{c['name']} {c['share']:.0%}" for c in check["checks"])
        + ").",
        "",
    ]
    head = ["system", "T_first s", "T_p50 s", "T_last s", "η", "T_last ÷ roost",
            "origin egress ÷ S"]  # fmt: skip
    if racks:
        head.append("cross-rack ÷ (racks·S)")
    head += ["CPU s", "CPU idle", "correct"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|" + "---:|" * (len(head) - 2) + ":---:|")
    for name, s in results["systems"].items():
        idle = fmt_num(s["cpu_idle"], "{:.0%}") + (" ⚠ CPU-bound" if s["cpu_saturated"] else "")
        row = [
            name,
            fmt_num(s["t_first"], "{:.2f}"),
            fmt_num(s["t_p50"], "{:.2f}"),
            fmt_num(s["t_last"], "{:.2f}"),
            fmt_num(s["eta"], "{:.2f}"),
            fmt_num(s["ratio_to_roost"], "{:.2f}×"),
            fmt_num(s["origin_egress_ratio"], "{:.2f}"),
        ]
        if racks:
            row.append(fmt_num(s.get("cross_rack_ratio"), "{:.2f}"))
        row += [fmt_num(s["cpu_seconds"], "{:.1f}"), idle, "yes" if s["correct"] else "**NO**"]
        lines.append("| " + " | ".join(row) + " |")
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"\n{name}: skipped, {reason}")
    for name, s in results["systems"].items():
        problems = [p for run in s["runs"] for p in run["problems"]]
        if problems:
            lines.append(f"\n{name} problems: " + "; ".join(problems[:5]).replace("\n", " "))
    lines.append("")
    framing = fmt_num(tb["framing_overhead"], "{:.3f}")
    lines.append(
        "η = T_min / T_last. Origin egress and cross-rack bytes are the links' byte counters,"
        f" headers included (a bulk TCP flow counted {framing} bytes per payload byte)."
        f" CPU idle: share of all {results['environment']['cores']} cores idle during the run;"
        f" below {IDLE_FLAG:.0%} the run was CPU-bound and is flagged."
    )
    return "\n".join(lines) + "\n"


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_chart(plt: Any, fig: Any, ax: Any, path: str, title: str, *, legend: str) -> str:
    """The finish every chart shares: title, light grid, legend, a PNG at ``path``."""
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc=legend, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _title(sc: dict[str, Any]) -> str:
    return (
        f"{sc['hosts']} hosts, {sc['size_bytes'] / MiB:.0f} MiB, B = {sc['bandwidth']},"
        f" B_origin = {sc['origin_bandwidth']}" + (f", {sc['racks']} racks" if sc["racks"] else "")
    )


def fleet_progress(run: dict[str, Any], step: float = 0.25) -> tuple[list[float], list[float]]:
    """The share of the release the whole fleet holds over time (mean over hosts), from
    each host's progress reports, sampled every ``step`` seconds."""
    timelines = list(run.get("host_progress", {}).values())
    if not timelines or not any(timelines):
        return [], []
    end = max(t for tl in timelines for t, _ in tl)
    xs = [i * step for i in range(int(end / step) + 2)]
    ys = []
    for x in xs:
        total = 0.0
        for tl in timelines:
            total += max((f for t, f in tl if t <= x), default=0.0)
        ys.append(total / len(timelines))
    return xs, ys


def progress_chart(results: dict[str, Any], path: str) -> str | None:
    """A PNG: the share of the release held by the fleet over time, per system, against
    the physical limit (a straight line reaching 100 % at T_min)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    size = results["scenario"]["size_bytes"]
    for i, (name, s) in enumerate(results["systems"].items()):
        for k, run in enumerate(s["runs"]):
            xs, ys = fleet_progress(run)
            if xs:
                ax.plot(xs, [100 * y for y in ys], color=colors[i % len(colors)],
                        alpha=0.9 if k == 0 else 0.35, label=name if k == 0 else None)  # fmt: skip
        sent = s["runs"][0].get("origin_upload") if s["runs"] else None
        if sent and sent[-1][1] <= 1.2 * size:  # one copy: how far the fleet lags it
            ax.plot([t for t, _ in sent], [min(100.0, 100 * b / size) for _, b in sent],
                    color=colors[i % len(colors)], linestyle=":", linewidth=1)  # fmt: skip
    limit = results["testbed"]["t_min"]
    ax.plot([0, limit], [0, 100], color="black", linestyle="--", linewidth=1, label="limit")
    ax.set_xlabel("seconds since launch")
    ax.set_ylabel("% of the release held, fleet average\n(dotted: sent by the origin, run 1)")
    ax.set_ylim(0, 102)
    ax.set_xlim(0, 3 * limit)  # a system slower than that shows its start only
    return save_chart(plt, fig, ax, path, _title(results["scenario"]), legend="lower right")


def chart(results: dict[str, Any], path: str) -> str | None:
    """A PNG: hosts holding the release over time, per system, with T_min. None if
    matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    sc = results["scenario"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, s) in enumerate(results["systems"].items()):
        color = colors[i % len(colors)]
        for k, run in enumerate(s["runs"]):
            times = sorted(t for t in run["host_times"].values() if t is not None)
            if not times:
                continue
            xs = [0.0, *times]
            ys = list(range(len(times) + 1))
            label = f"{name} (η {s['eta']:.2f})" if s["eta"] is not None else name
            ax.step(xs, ys, where="post", color=color, alpha=0.9 if k == 0 else 0.35,
                    label=label if k == 0 else None)  # fmt: skip
            ax.plot(times, ys[1:], "o", color=color, markersize=3, alpha=0.9 if k == 0 else 0.35)
    limit = results["testbed"]["t_min"]
    ax.axvline(limit, color="black", linestyle="--", linewidth=1)
    ax.text(limit, sc["hosts"] * 0.02, " T_min", fontsize=8)
    ax.set_xlabel("seconds since launch")
    ax.set_ylabel("hosts holding the verified release")
    ax.set_ylim(0, sc["hosts"] + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(left=0)
    return save_chart(plt, fig, ax, path, _title(sc), legend="lower right")


def write(results: dict[str, Any], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    written = []
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    written.append(path)
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write(markdown(results))
    written.append(path)
    for draw, name in ((chart, "completion.png"), (progress_chart, "progress.png")):
        png = draw(results, os.path.join(out, name))
        if png:
            written.append(png)
    return written
