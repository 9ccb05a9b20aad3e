"""The benchmark's table, its targets (met or not, with the numbers) and its plot."""

from __future__ import annotations

from pathlib import Path


def _size(results: dict, slots: int) -> dict | None:
    return next((s for s in results["sizes"] if s["slots"] == slots), None)


def table(results: dict) -> str:
    lines = [
        "| slots | workload | reference ev/s | library ev/s | e2e 1 worker ev/s | "
        "e2e 2 workers ev/s | p50 / p99 ms at half rate | worker RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in results["sizes"]:
        e2e, lib, ref = s["e2e"], s["library"], s.get("reference", {})
        for key, lib_key in (
            ("mixed/one/1w", "mixed/one"),
            ("mixed/many/1w", "mixed/many"),
            ("writes/many/1w", "writes/many"),
            ("queries/many/1w", "queries/many"),
        ):
            if key not in e2e:
                continue
            two = e2e.get(key.replace("/1w", "/2w"), {}).get("events_per_s")
            half = e2e.get(f"{key}@half")
            latency = f"{half['p50_ms']:.1f} / {half['p99_ms']:.1f}" if half else "-"
            lines.append(
                f"| {s['slots']:,} | {lib_key} | {_n(ref.get(lib_key))} | {_n(lib.get(lib_key))}"
                f" | {_n(e2e[key]['events_per_s'])} | {_n(two)} | "
                f"{latency} | "
                f"{e2e[key]['worker_peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines)


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    s = _size(results, 100_000)
    if s:
        e2e = s["e2e"]
        one = e2e.get("mixed/one/1w")  # (the reference's workload: one memory)
        ref = s.get("reference", {}).get("mixed/one")
        if ref and not one:  # (--quick runs 64 memories only: another workload)
            out.append(
                (
                    "e2e 1 worker, mixed, 100k >= 20x reference",
                    None,
                    "--quick runs 64 memories, not one",
                )
            )
        if ref and one:
            ratio = one["events_per_s"] / ref
            out.append(
                (
                    "e2e 1 worker, mixed, 100k >= 20x reference",
                    ratio >= 20,
                    f"{one['events_per_s']:,.0f} vs {ref:,.0f} ev/s = {ratio:.1f}x",
                )
            )
        lib_key = "mixed/one" if one else "mixed/many"  # (the same workload on both sides)
        e2e_rate = e2e[f"{lib_key}/1w"]["events_per_s"]
        share = e2e_rate / s["library"][lib_key]
        out.append(
            (
                "e2e >= 60% of in-process",
                share >= 0.6,
                f"{e2e_rate:,.0f} vs {s['library'][lib_key]:,.0f} = {share:.0%}",
            )
        )
        wp, rc = s.get("write_path"), s["recall"]
        if wp:
            ok = wp["speedup"] >= 5 and min(rc["g_recall_at_1"], rc["o_recall_at_k"]) >= 0.99
            out.append(
                (
                    "write path >= 5x in-place at 100k, recall >= 0.99",
                    ok,
                    f"{wp['memnet_writes_per_s']:,.0f} vs {wp['in_place_writes_per_s']:,.0f} "
                    f"writes/s = {wp['speedup']:.1f}x; G recall@1 {rc['g_recall_at_1']:.3f}, "
                    f"O recall@k {rc['o_recall_at_k']:.3f}",
                )
            )
        two, single = e2e["mixed/many/2w"]["events_per_s"], e2e["mixed/many/1w"]["events_per_s"]
        out.append(
            (
                "2 workers >= 1.6x one",
                two / single >= 1.6,
                f"{two:,.0f} vs {single:,.0f} = {two / single:.2f}x",
            )
        )
        half = next(v for k, v in e2e.items() if k.endswith("@half"))
        for ms in (5, 10):  # issue 5's target, then issue 15's
            out.append(
                (
                    f"query p99 <= {ms} ms at half max throughput",
                    half["p99_ms"] <= ms,
                    f"p99 {half['p99_ms']:.1f} ms (p50 {half['p50_ms']:.1f}) at "
                    f"{half['events_per_s']:,.0f} ev/s{_steps(half)}",
                )
            )
        before = e2e.get("mixed/many/1w@blas")
        if before:
            gain = single / before["events_per_s"]
            out.append(
                (
                    "e2e 1 worker, 100k >= 3x the float32 candidate pass (MEMNET_SCAN=blas)",
                    gain >= 3,
                    f"{single:,.0f} vs {before['events_per_s']:,.0f} ev/s = {gain:.2f}x",
                )
            )
    for s in results["sizes"]:
        rc = s.get("recall")
        if rc and s["slots"] != 100_000:
            out.append(
                (
                    f"{s['slots']:,} slots: recall >= 0.99",
                    min(rc["g_recall_at_1"], rc["o_recall_at_k"]) >= 0.99,
                    f"G recall@1 {rc['g_recall_at_1']:.3f}, O recall@k {rc['o_recall_at_k']:.3f}",
                )
            )
    big = _size(results, 1_000_000)
    if big:
        rss = max(r["worker_peak_rss_mb"] for r in big["e2e"].values())
        snap = big["snapshot"]
        out.append(("1M slots: worker RSS <= 1 GiB", rss <= 1024, f"peak {rss:.0f} MB"))
        times = ("snapshot_s", "restore_s", "full_snapshot_s", "full_restore_s")
        worst = max(snap[k] for k in times)
        out.append(
            (
                "1M slots: snapshot and restore <= 5 s each",
                worst <= 5,
                f"after 500 writes {snap['snapshot_s']:.1f} s / {snap['restore_s']:.1f} s "
                f"({snap['snapshot_mb']:.1f} MB); every slot changed "
                f"{snap['full_snapshot_s']:.1f} s / {snap['full_restore_s']:.1f} s "
                f"({snap['full_snapshot_mb']:.0f} MB)",
            )
        )
    return out


def details(results: dict) -> str:
    """Per size: snapshot and restore, recall, and the graph's ef sweep beside the scan."""
    lines = [
        "| slots | snapshot / restore s (500 writes) | snapshot / restore s (every slot) "
        "| G recall@1 | O recall@k | the reference's recall@k |",
        "|---|---|---|---|---|---|",
    ]
    for s in results["sizes"]:
        sn, rc = s["snapshot"], s.get("recall", {})
        ref = s.get("reference", {}).get("recall_at_k")
        lines.append(
            f"| {s['slots']:,} | {sn['snapshot_s']:.2f} / {sn['restore_s']:.2f} | "
            f"{sn['full_snapshot_s']:.2f} / {sn['full_restore_s']:.2f} "
            f"({sn['full_snapshot_mb']:.0f} MB) | {rc.get('g_recall_at_1', '-')} | "
            f"{rc.get('o_recall_at_k', '-')} | {'-' if ref is None else f'{ref:.3f}'} |"
        )
    for s in results["sizes"]:
        if "ef_sweep" in s:
            lines += ["", f"{s['slots']:,} slots, top-k queries: search | queries/s | recall@k"]
            lines += ["|---|---|---|"]
            for name, r in s["ef_sweep"].items():
                label = "exact batched scan (memnet)" if name == "exact" else f"hnswlib ef={name}"
                lines.append(f"| {label} | {r['queries_per_s']:,.0f} | {r['o_recall_at_k']:.3f} |")
    return "\n".join(lines)


def report(results: dict) -> str:
    lines = ["", table(results), "", details(results), "", "targets:"]
    for name, ok, detail in targets(results):
        said = "not measured" if ok is None else "met" if ok else "NOT met"
        lines.append(f"  [{said}] {name}: {detail}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s["slots"] for s in results["sizes"]]
    series = {
        "reference (one memory)": [
            s.get("reference", {}).get("mixed/one") for s in results["sizes"]
        ],
        "library (one memory)": [s["library"].get("mixed/one") for s in results["sizes"]],
        "e2e 1 worker": [
            (s["e2e"].get("mixed/one/1w") or s["e2e"]["mixed/many/1w"])["events_per_s"]
            for s in results["sizes"]
        ],
        "e2e 2 workers (64 memories)": [
            s["e2e"].get("mixed/many/2w", {}).get("events_per_s") for s in results["sizes"]
        ],
    }
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.2
    for n, (name, values) in enumerate(series.items()):
        xs = [i + (n - 1.5) * width for i, v in enumerate(values) if v]
        ax.bar(xs, [v for v in values if v], width, label=name)
    ax.set_xticks(range(len(sizes)), [f"{s:,} slots" for s in sizes])
    ax.set_yscale("log")
    ax.set_ylabel("events/s (50/50 writes and queries)")
    ax.set_title(
        f"memnet vs the reference code ({results['machine']['cores']} cores, "
        f"{results['machine']['date']})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _steps(run: dict) -> str:
    """The worker's steps during an end-to-end run (scripts/bench_e2e.py), where measured."""
    steps = run.get("steps")
    if not steps:
        return ""
    return (
        f"; steps of {steps['events_per_step']:.1f} events, {steps['ms_per_step']:.1f} ms each,"
        f" the worker in them {steps['busy']:.0%} of the time"
    )
