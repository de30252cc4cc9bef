"""The report: each row's best round, the targets, and the section written into BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.wrk import Run

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "BENCHMARKS.md"

TARGETS = {  # what the service should reach; each ratio compares runs made side by side in one run
    "ratio_vs_reference": 60.0,
    "fraction_of_http_ceiling": 0.30,
    "p99_over_mean": 2.0,
    "p99_ms_at_16": 25.0,
    "p50_ms_at_1": 3.0,
    "lag_p99_ms": 250.0,
    "integration_delay_p99_ms": 1500.0,
    "integrator_cost": 0.05,  # c=top uploads with the tree integrator within 5% of without it
    "ratio_vs_bentoml": {1: 4.0, 16: 4.0, 64: 5.0},  # by connections (issue 15)
}


def best_runs(runs: list[Run]) -> list[Run]:
    """Per target, connection count and body: the round with the most req/s (noise from other
    work on the machine only ever slows a run down), in the order the rows were first run."""
    best: dict[tuple[str, int, str], Run] = {}
    for run in runs:
        key = (run.target, run.connections, run.mode)
        if key not in best or run.rps > best[key].rps:
            best[key] = run
    return list(best.values())


def no_errors(runs: list[Run]) -> tuple[str, str, bool]:
    errors = sum(run.errors + run.warmup_errors for run in runs)
    return ("no errors (non-2xx or socket) in any run, warm-ups included", str(errors), errors == 0)


def find(runs: list[Run], target: str, connections: int, mode: str = "multipart") -> Run | None:
    for run in runs:
        if run.target == target and run.connections == connections and run.mode == mode:
            return run
    return None


def checks(runs: list[Run], lag: dict[str, Any], top: int, tlog: dict[str, Any] | None = None
           ) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    ours, ref, ceiling = find(runs, "ours", top), find(runs, "reference", top), find(runs, "ceiling", top)
    if ours and ref and ref.rps:
        ratio = ours.rps / ref.rps
        out.append((f"c={top}: ours/reference req/s ≥ {TARGETS['ratio_vs_reference']:g}×", f"{ratio:.0f}×",
                    ratio >= TARGETS["ratio_vs_reference"]))
    if ours and ceiling and ceiling.rps:
        fraction = ours.rps / ceiling.rps
        out.append((f"c={top}: ours ≥ {TARGETS['fraction_of_http_ceiling']:.0%} of the HTTP-stack ceiling",
                    f"{fraction:.0%}", fraction >= TARGETS["fraction_of_http_ceiling"]))
    for c, target in TARGETS["ratio_vs_bentoml"].items():
        mine, peer = find(runs, "ours", c), find(runs, "bentoml", c)
        if mine and peer and peer.rps:
            ratio = mine.rps / peer.rps
            out.append((f"c={c}: ours/BentoML req/s ≥ {target:g}×", f"{ratio:.1f}×", ratio >= target))
    if ours:
        ratio = ours.latency_ms["p99"] / ours.latency_ms["mean"]
        out.append((f"c={top}: p99 ≤ {TARGETS['p99_over_mean']:g}× mean latency",
                    f"p99 {ours.latency_ms['p99']:.1f} ms = {ratio:.2f}× mean {ours.latency_ms['mean']:.1f} ms",
                    ratio <= TARGETS["p99_over_mean"]))
    if (run := find(runs, "ours", 16)) is not None:
        out.append((f"c=16: p99 ≤ {TARGETS['p99_ms_at_16']:g} ms", f"{run.latency_ms['p99']:.1f} ms",
                    run.latency_ms["p99"] <= TARGETS["p99_ms_at_16"]))
    if (run := find(runs, "ours", 1)) is not None:
        out.append((f"c=1: p50 ≤ {TARGETS['p50_ms_at_1']:g} ms", f"{run.latency_ms['p50']:.2f} ms",
                    run.latency_ms["p50"] <= TARGETS["p50_ms_at_1"]))
    if lag.get("p99_ms") is not None:
        out.append((f"c={top}: projection lag p99 ≤ {TARGETS['lag_p99_ms']:g} ms", f"{lag['p99_ms']:.0f} ms",
                    lag["p99_ms"] <= TARGETS["lag_p99_ms"]))
    if tlog and tlog.get("p99_ms") is not None:
        out.append((f"c={top}: commit → inside a signed checkpoint p99 ≤ {TARGETS['integration_delay_p99_ms']:,.0f} ms",
                    f"{tlog['p99_ms']:,.0f} ms", tlog["p99_ms"] <= TARGETS["integration_delay_p99_ms"]))
    if ours and (without := find(runs, "no-tree", top)) is not None and without.rps:
        cost = 1 - ours.rps / without.rps
        out.append((f"c={top}: req/s with the tree integrator within {TARGETS['integrator_cost']:.0%} of without",
                    f"{ours.rps:,.0f} vs {without.rps:,.0f} ({-cost:+.1%})", cost <= TARGETS["integrator_cost"]))
    out.append(no_errors(runs))
    return out


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def report(result: dict[str, Any]) -> str:
    runs: list[Run] = result["runs"]
    m, top = result["machine"], max(result["connections"])
    lines: list[str] = []
    add = lines.append
    server = result["durability"].get("server_version", "?")
    add(f"Run of {m['date']} at commit `{m['commit']}` on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), "
        f"Linux {m['kernel']}, Python {m['python']}, PostgreSQL {server} ({result['database']}), {m['wrk']}. "
        f"wrk: 1 thread, `--timeout 30s`, {result['warmup']:g} s warm-up then {result['duration']:g} s per row, "
        f"{result['rounds']} round(s); the servers ran side by side and the rows were interleaved; each row "
        f"reports its best round. The service ran with its defaults (`WORKERS={result['workers']}`). Latencies in ms.")
    add("")
    add("### Headline: the service against the naive reference, the best peer and the HTTP-stack ceiling")
    add("")
    add("BentoML: the same model file behind BentoML with adaptive batching and no storage "
        "(bench/bentoml_peer/service.py).")
    add("")
    add("| connections | ours req/s | reference req/s | **ours / reference** | BentoML req/s | **ours / BentoML** | "
        "HTTP ceiling req/s | ours / ceiling | ours / model ceiling at batch = connections |")
    add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    model_rows = {row["batch"]: row for row in result["model"]["sizes"]}

    def versus(run: Run | None, ours: Run, digits: str = ",.0f") -> tuple[str, str]:
        if run is None or not run.rps:
            return "–", "–"
        return f"{run.rps:{digits}}", f"**{ours.rps / run.rps:,.{0 if ours.rps / run.rps >= 10 else 1}f}×**"

    for c in result["connections"]:
        ours = find(runs, "ours", c)
        if not ours:
            continue
        ref_rps, ref_ratio = versus(find(runs, "reference", c), ours, ",.1f")
        peer_rps, peer_ratio = versus(find(runs, "bentoml", c), ours)
        ceiling = find(runs, "ceiling", c)
        model_row = model_rows.get(c) or model_rows[max(model_rows)]
        add(f"| {c} | {ours.rps:,.0f} | {ref_rps} | {ref_ratio} | {peer_rps} | {peer_ratio} | "
            + (f"{ceiling.rps:,.0f} | {ours.rps / ceiling.rps:.0%} | " if ceiling and ceiling.rps else "– | – | ")
            + f"{ours.rps / model_row['images_per_s']:.0%} (of {model_row['images_per_s']:,.0f}/s) |")
    raw_ours, raw_ceiling = find(runs, "ours", top, "raw"), find(runs, "ceiling", top, "raw")
    if raw_ours and raw_ceiling:
        add(f"| {top}, raw body | {raw_ours.rps:,.0f} | – | – | – | – | {raw_ceiling.rps:,.0f} | "
            f"{raw_ours.rps / raw_ceiling.rps:.0%} | – |")
    add("")
    add("### Every run")
    add("")
    add("The round in bold is the one reported above and below (the most req/s of its row).")
    add("")
    add("Successes are 201s (200s for BentoML, which stores nothing).")
    add("")
    add("| target | conn. | body | round | req/s | p50 | p90 | p99 | mean | max | successes | errors |")
    add("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in sorted(result["all_runs"], key=lambda r: (r.mode, r.connections, r.target, r.round)):
        lat = run.latency_ms
        errors = f"{run.non_201} non-2xx, {sum(run.socket_errors.values())} socket"
        mark = "**" if run in runs else ""
        add(f"| {run.target} | {run.connections} | {run.mode} | {mark}{run.round}{mark} | {run.rps:,.1f} | {fmt_ms(lat['p50'])} | "
            f"{fmt_ms(lat['p90'])} | {fmt_ms(lat['p99'])} | {fmt_ms(lat['mean'])} | {fmt_ms(lat['max'])} | "
            f"{run.created:,} | {errors} |")
    add("")
    add("### Targets")
    add("")
    add("| target | measured | |")
    add("| --- | --- | --- |")
    for name, measured, ok in result["checks"]:
        add(f"| {name} | {measured} | {'met' if ok else '**missed**'} |")
    add("")
    add("### Where the CPU went during each run")
    add("")
    add("CPU from /proc (100% = one core; the machine has "
        f"{m['cores']}): the target's processes (with its uvicorn workers and, for the service, its "
        "projection worker process), the main threads of the HTTP processes (the asyncio event loops), "
        "the PostgreSQL "
        "backends of its database, and the whole machine (wrk included). Batch and commit-group sizes "
        "from the service's /metrics.")
    add("")
    add("| target | conn. | body | process CPU | event loop | loop µs/req | PostgreSQL | PG µs/req | machine busy | "
        "mean batch | mean commit group | mean commit ms |")
    add("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        cpu, inside = run.cpu, run.inside
        add(f"| {run.target} | {run.connections} | {run.mode} | {cpu['process_pct']:.0f}% | {cpu['loop_thread_pct']:.0f}% | "
            f"{cpu.get('loop_us_per_request', 0):,.0f} | {cpu['postgres_pct']:.0f}% | "
            f"{cpu.get('postgres_us_per_request', 0):,.0f} | {cpu['machine_busy_pct']:.0f}% | "
            + (f"{inside['mean_batch']:.1f} | {inside['mean_commit_group']:.1f} | {inside['mean_commit_ms']:.2f} |"
               if inside else "– | – | – |"))
    add("")
    stage_rows = [run for run in runs if run.target == "ours" and run.mode == "multipart" and run.inside.get("uploads")]
    if stage_rows:
        add("### Where an upload's time went, by stage")
        add("")
        add("Mean per upload, in ms, from the service's own /metrics scraped right before and after the row "
            "(best round): `prediction_stage_seconds` (decode: from the handler's call to the decoded "
            "array; inference: submitted to the micro-batcher until the output is back; record: handed "
            "to the group committer until committed), the batcher's `inference_queue_wait_seconds` and "
            "`inference_batch_seconds` (one model call), the committer's `event_commit_seconds` (one group's "
            "transaction), and `http_request_duration_seconds` of `POST /prediction` (the whole request "
            "inside the ASGI app). Hand-offs: the inference stage less queue wait and model call (the "
            "future's way back to the handler); waiting for a group: the record stage less the group's "
            "transaction; rest of the handler: the request less the three stages (multipart parsing, "
            "checks, the JSON answer, middleware); outside the app: wrk's mean less the request (sockets, "
            "uvicorn's HTTP parsing, the event loop's turns, wrk itself).")
        add("")
        add("| conn. | wrk mean | request in the app | decode | queue wait | model call | hand-offs | "
            "group's commit | waiting for a group | rest of the handler | outside the app |")
        add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for run in stage_rows:
            i = run.inside
            stages = i["mean_decode_stage_ms"] + i["mean_inference_stage_ms"] + i["mean_record_stage_ms"]
            cells = [run.latency_ms["mean"], i["mean_http_ms"], i["mean_decode_stage_ms"], i["mean_queue_wait_ms"],
                     i["mean_inference_ms"],
                     i["mean_inference_stage_ms"] - i["mean_queue_wait_ms"] - i["mean_inference_ms"],
                     i["mean_commit_ms"], i["mean_record_stage_ms"] - i["mean_commit_ms"],
                     i["mean_http_ms"] - stages, run.latency_ms["mean"] - i["mean_http_ms"]]
            add(f"| {run.connections} | " + " | ".join(f"{cell:.3f}" for cell in cells) + " |")
        add("")
    if any(run.target == "workers-2" for run in runs):
        add("### WORKERS=2 against WORKERS=1")
        add("")
        add("The same service with `WORKERS=2` (two uvicorn processes, one TensorFlow each, one projection "
            "worker) on its own database, run right after `ours` (`WORKERS=1`) at each load in each round.")
        add("")
        add("| conn. | WORKERS=1 req/s | p50 | p99 | WORKERS=2 req/s | p50 | p99 | **2 / 1** | "
            "process CPU 1 → 2 | PG µs/req 1 → 2 |")
        add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for c in result["connections"]:
            one, two = find(runs, "ours", c), find(runs, "workers-2", c)
            if one and two and one.rps:
                add(f"| {c} | {one.rps:,.0f} | {fmt_ms(one.latency_ms['p50'])} | {fmt_ms(one.latency_ms['p99'])} | "
                    f"{two.rps:,.0f} | {fmt_ms(two.latency_ms['p50'])} | {fmt_ms(two.latency_ms['p99'])} | "
                    f"**{two.rps / one.rps:.2f}×** | {one.cpu['process_pct']:.0f}% → {two.cpu['process_pct']:.0f}% | "
                    f"{one.cpu.get('postgres_us_per_request', 0):,.0f} → {two.cpu.get('postgres_us_per_request', 0):,.0f} |")
        add("")
    if result.get("memory"):
        add("### Memory")
        add("")
        add("Resident memory (VmRSS) of each server's processes after all the rounds, in MiB.")
        add("")
        add("| target | process | RSS MiB |")
        add("| --- | --- | ---: |")
        for name, rows in result["memory"].items():
            for row in rows:
                add(f"| {name} | {row['role']} | {row['rss_mib']:,.0f} |")
            if len(rows) > 1:
                add(f"| {name} | **all** | **{sum(row['rss_mib'] for row in rows):,.0f}** |")
        add("")
    add("### Ceilings")
    add("")
    model = result["model"]
    add(f"Model alone (`KerasModel.predict_batch`, the service's serving function, TensorFlow "
        f"{model['tensorflow']}, {model['intra_op_threads']} intra-op thread, {model['model']['device']}):")
    add("")
    add("| batch | ms/call (median) | ms/call (p90) | images/s |")
    add("| ---: | ---: | ---: | ---: |")
    for row in model["sizes"]:
        add(f"| {row['batch']} | {row['median_s'] * 1e3:.3f} | {row['p90_s'] * 1e3:.3f} | {row['images_per_s']:,.0f} |")
    add("")
    add("HTTP stack: bench/http_ceiling_app.py, the same Litestar/uvicorn settings, middleware and body "
        "reading as the service, answering 201 without inference or storage (rows `ceiling` above).")
    add("")
    lag = result["lag"]
    add(f"### Projection lag during the c={top} run")
    add("")
    if lag.get("events"):
        add(f"Per event, over {lag['events']:,} events: p50 {lag['p50_ms']:.0f} ms, p90 {lag['p90_ms']:.0f} ms, "
            f"p99 {lag['p99_ms']:.0f} ms, max {lag['max_ms']:.0f} ms (from `recorded_at`, taken under the append "
            f"lock before COMMIT, to the first 10 ms sample of `projection_tracking` that covers the event; "
            f"{lag['samples']:,} samples). Events behind (head − tracked position) in the samples: "
            f"p50 {lag['behind_p50']:.0f}, p99 {lag['behind_p99']:.0f}, max {lag['behind_max']:.0f}."
            + (f" {lag['unobserved']} events were not projected within 30 s of the end." if lag.get("unobserved") else ""))
    else:
        add("Not measured.")
    add("")
    tlog = result.get("tlog") or {}
    add(f"### Transparency log during the c={top} run")
    add("")
    if tlog.get("events"):
        add(f"Commit → inside a signed checkpoint, per event of the predictions acknowledged in that run "
            f"({tlog['events']:,} events; `recorded_at` to the `signed_at` of the first checkpoint whose tree "
            f"holds the event, both on the database's clock): p50 {tlog['p50_ms']:,.0f} ms, "
            f"p99 {tlog['p99_ms']:,.0f} ms, max {tlog['max_ms']:,.0f} ms; {tlog['checkpoints']:,} checkpoints "
            f"signed over the whole bench (`CHECKPOINT_INTERVAL_MS` 1000)"
            + (f"; {tlog['unsigned']} events were in no checkpoint when measured." if tlog.get("unsigned") else ".")
            + " The row `no-tree` is the same service with `TREE_INTEGRATOR=off` on its own database, "
              "run right after `ours` in each round.")
    else:
        add("Not measured.")
    add("")
    rebuild = result["rebuild"]
    add("### Rebuild")
    add("")
    if rebuild.get("events_per_s"):
        add(f"`python -m cli rebuild` on the database this run produced: {rebuild['events']:,} events "
            f"rebuilt in {rebuild['build_s']:.2f} s, **{rebuild['events_per_s']:,.0f} events/s** "
            f"({rebuild['wall_s']:.1f} s for the whole command, start-up included).")
    else:
        add(f"`python -m cli rebuild` failed: {rebuild.get('error', rebuild.get('output'))!r}")
    add("")
    d = result["durability"]
    add("### Durability check")
    add("")
    add(f"{d['acknowledged_201']:,} 201s were counted by wrk's `response()` hook (warm-ups included); "
        f"{d['acknowledged_ids_in_table']:,} of their {d['acknowledged_ids']:,} prediction ids are "
        f"`PredictionMade` events; the table holds {d['prediction_made_events']:,} `PredictionMade` "
        f"({d['answered_after_wrk_stopped']} answered after wrk stopped waiting, at most "
        f"{d['in_flight_bound']} could be) and {d['prediction_failed_events']} `PredictionFailed`. "
        f"Server settings as the service's role sees them: "
        + ", ".join(f"`{k}={v}`" for k, v in sorted(d["server_settings"].items()))
        + f" (the append pool sets `synchronous_commit=on` itself). **{'OK' if d['ok'] else 'FAILED'}**.")
    if result.get("profile"):
        add("")
        lines.extend(profile_section(result["profile"], top))
    return "\n".join(lines)


def profile_section(p: dict[str, Any], top: int) -> list[str]:
    threads = p.get("threads", {})
    total = sum(threads.values()) or 1

    def thread_name(name: str) -> str:  # "thread (5718): MainThread", "projection worker: thread (…): MainThread"
        role, _, rest = name.partition(": thread ")
        return f"{role}'s {rest.split(': ')[-1]}" if rest else name.split(": ")[-1]

    lines = [
        f"### Profile (py-spy, c={top}, event-loop thread)",
        "",
        f"Flame graph: `{Path(p['svg']).relative_to(REPO)}` (not committed). py-spy samples by thread "
        "(active samples only): " + ", ".join(f"{thread_name(name)} {count / total:.0%}"
                                               for name, count in list(threads.items())[:6])
        + f". Share of the event-loop thread's {p.get('loop_samples', 0):,} samples (inclusive, then self):",
        "",
        "| frame | inclusive | | frame | self |",
        "| --- | ---: | --- | --- | ---: |",
    ]
    for (inc, inc_share), (own, own_share) in zip(p.get("inclusive", [])[:20], p.get("self", [])[:20]):
        lines.append(f"| `{inc}` | {inc_share:.0%} | | `{own}` | {own_share:.0%} |")
    return lines


def write_marked_section(name: str, text: str, heading: str) -> None:
    """Put `text` between BENCHMARKS.md's `<!-- name:begin -->`/`<!-- name:end -->` markers; the
    prose around them is kept. Without the markers, the block goes at the end under `heading`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text}\n{end}"
    content = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if begin in content and end in content:
        head, _, rest = content.partition(begin)
        _, _, tail = rest.partition(end)
        BENCHMARKS.write_text(head + block + tail)
        return
    BENCHMARKS.write_text(content.rstrip() + f"\n\n## {heading}\n\n" + block + "\n")


def write_benchmarks(section: str) -> None:
    write_marked_section("bench", section, "Latest run")
