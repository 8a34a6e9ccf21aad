"""The report of ``python -m fraudstream.loadtest``: ratios to the baselines, ``result.json``, the
plots (loadtest/plots.py) and the summary printed on stdout."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fraudstream.loadtest import plots
from fraudstream.loadtest.decided_by import brief, describe
from fraudstream.loadtest.live import LAG_BACKLOG_S, LAG_RATE_RATIO
from fraudstream.loadtest.rss import RssSampler, rss_report
from fraudstream.loadtest.runs import Runs, timeline


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} ms" if v < 1000 else f"{v:,.0f} ms"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _cpu(run: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in run["cpu_pct"].items())


def _cpu_short(run: dict) -> str:
    c = run["cpu_pct"]
    return "/".join(f"{c[k]:.0f}" if k in c else "-" for k in ("worker", "broker", "bench"))


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def quix_line(quix: dict | None) -> str:
    """The Quix Streams peer's line of the baselines: its rate, or why there is none."""
    label = "  Quix Streams: Avro decode, per-card state"
    if not quix or "rate" not in quix:
        why = (quix or {}).get("skipped", "not run")
        return f"{label}  skipped: {why}"
    return (f"{label} {quix['rate']:>9,.0f}/s   (RocksDB with changelog, one output each; "
            f"to the final commit; {quix['rate_until_processed']:,.0f}/s until the last "
            f"record was processed; quixstreams {quix['quixstreams']})")


def print_summary(result: dict, what: str) -> None:
    b, k = result["bare_faust"], result["kafka_loop"]
    w, sat, budget = result["worker"], result["saturation"], result["budget_ms"]
    print()
    print(f"baselines on the same {result['events']:,} pre-produced transactions")
    print(f"  bare Faust agent, consume only            {b['rate']:>9,.0f}/s")
    print(f"  Kafka loop: consume, decode, produce      {k['rate']:>9,.0f}/s   (to the final "
          f"flush; {k['rate_until_produced']:,.0f}/s until the last produce call)")
    print(quix_line(result.get("quix")))
    if not result.get("models"):
        print("NOTE: no --models: the rules decide every transaction by design; the model "
              "made no decision in any rate below")
    # the ratio columns end where the rows' do (2 + 30 + 1 + 11 + 3 + 12, then 2 + 12 each)
    print(f"{f'worker ({what})':<46}{'vs bare Faust':>13}  {'vs Kafka loop':>12}  "
          f"{'vs Quix':>12}")
    rows = [("backlog drain", w["rate"], "drain", w.get("decided_by"))]
    if result["steps"]:
        by_budget, lag_only = sat["by_budget"] or {}, sat["lag_only"] or {}
        rows += [(f"saturation, p99 <= {budget:g} ms", by_budget.get("rate"),
                  "saturation_by_budget", by_budget.get("decided_by")),
                 ("saturation, lag only", lag_only.get("rate"), "saturation_lag_only",
                  lag_only.get("decided_by"))]
    for name, rate, key, decided in rows:
        r = result["ratios"][key]
        shown = "none" if rate is None else f"{rate:,.0f}/s"
        print(f"  {name:<30} {shown:>11}   {_x(r['vs_bare_faust']):>12}  "
              f"{_x(r['vs_kafka_loop']):>12}  {_x(r.get('vs_quix')):>12}")
        if rate is not None:
            print(f"    {describe(decided)}")
    for note in (sat.get("note"), sat.get("note_lag")):
        if note and result["steps"]:
            print(f"  NOTE: {note}")
    live = [*result["steps"], *filter(None, [result.get("latency_at_70pct")]),
            *result["latency"]]
    if live and result["broker"] == "shared":
        print()
        print("live runs: all on the backlog drain's broker and worker (--shared-broker)")
    elif live:
        ready = [r["ready_s"] for r in live]
        print()
        print(f"live runs: each on a fresh broker and worker, ready in {min(ready):.1f}-"
              f"{max(ready):.1f}s ({result['warm_up_transactions']} warm-up decisions each, "
              "not measured)")
    if result["steps"]:
        print()
        print(f"steps (open-loop Poisson, {result['step_seconds']:g}s each; lag grew = decided "
              f"< {LAG_RATE_RATIO:.0%} of sent over the 2nd half and backlog > "
              f"{LAG_BACKLOG_S:g}s of traffic at the end)")
        print(f"  {'rate':>8} {'sent':>7} {'decided/s':>9} {'p50':>10} {'p90':>10} "
              f"{'p99':>10} {'decided p50/p99':>20} {'backlog end':>11} {'lag':>5} "
              f"{'budget':>6} {'send late p99':>13} {'CPU% wkr/brk/gen':>16}  decided by")
        for s in result["steps"]:
            td = f"{_ms(s['to_decided_p50_ms'])} / {_ms(s['to_decided_p99_ms'])}"
            backlog = "-" if s["backlog_end_s"] is None else f"{s['backlog_end_s']:.2f}s"
            print(f"  {s['rate']:>8,.0f} {s['sent']:>7,} {s['throughput']:>9,.0f} "
                  f"{_ms(s['p50_ms']):>10} {_ms(s['p90_ms']):>10} {_ms(s['p99_ms']):>10} "
                  f"{td:>20} {backlog:>11} {'grew' if s['lag_grew'] else 'ok':>5} "
                  f"{'ok' if s['within_budget'] else 'over':>6} "
                  f"{_ms(s['sender_late_p99_ms']):>13} {_cpu_short(s):>16}  "
                  f"{brief(s.get('decided_by'))}")
    lt = result.get("latency_at_70pct")
    if lt:
        print()
        print(f"latency at 70% of saturation ({lt['basis']}): {lt['rate']:,.0f}/s, "
              f"{lt['decided']:,} decisions: p50 {_ms(lt['p50_ms'])}, p90 {_ms(lt['p90_ms'])}, "
              f"p99 {_ms(lt['p99_ms'])} (until decided p50 {_ms(lt['to_decided_p50_ms'])}, "
              f"p99 {_ms(lt['to_decided_p99_ms'])}); lag grew: {lt['lag_grew']}; worker batch "
              f"time p50 {_ms(lt['worker_batch_p50_ms'])}, p99 {_ms(lt['worker_batch_p99_ms'])}; "
              f"CPU %: {_cpu(lt)}; {describe(lt.get('decided_by'))}")
        print("  by third of the run: worker batch p99 "
              f"{_thirds(lt, 'worker_batch_p99_by_third_ms')}, end-to-end p50 "
              f"{_thirds(lt, 'p50_by_third_ms')}")
    elif result["steps"]:
        print()
        print(f"latency at 70% of saturation: not run ({result.get('latency_at_70pct_note')})")
    for lt in result["latency"]:
        print(f"latency at {lt['ratio']:.2f}x the drain rate, {lt['rate']:,.0f}/s "
              f"({lt['decided']:,} decisions): p50 {_ms(lt['p50_ms'])}, "
              f"p90 {_ms(lt['p90_ms'])}, p99 {_ms(lt['p99_ms'])} (until decided p50 "
              f"{_ms(lt['to_decided_p50_ms'])}, p99 {_ms(lt['to_decided_p99_ms'])}; worker "
              f"batch time p50 {_ms(lt['worker_batch_p50_ms'])}, "
              f"p99 {_ms(lt['worker_batch_p99_ms'])}; CPU %: {_cpu(lt)}; "
              f"{describe(lt.get('decided_by'))})")
    rss = result["rss"]
    if rss["peak_mb"] is not None:
        n = len(rss["workers"])
        print(f"worker RSS: peak {rss['peak_mb']:,.0f} MB, at end {rss['end_mb']:,.0f} MB "
              f"(the worker of {rss['peak_worker']}; highest of {n} worker{'s' * (n > 1)})")
    load = result["loadavg"]
    print(f"load average (1 min): {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end "
          f"({os.cpu_count()} CPUs)")


def _ratios(rate: float | None, result: dict) -> dict:
    return {"rate": rate, "vs_bare_faust": _ratio(rate, result["bare_faust"]["rate"]),
            "vs_kafka_loop": _ratio(rate, result["kafka_loop"]["rate"]),
            "vs_quix": _ratio(rate, (result.get("quix") or {}).get("rate"))}


def finish(result: dict, runs: Runs, samplers: list[RssSampler], out_dir: Path, budget: float,
           what: str) -> None:
    """Ratios, timeline, RSS and plots into ``result``; ``result.json`` and the plots into
    ``out_dir``; the summary on stdout."""
    samplers += runs.samplers
    sat = result["saturation"]
    result["loadavg"]["end"] = os.getloadavg()
    result["ratios"] = {
        "drain": _ratios(result["worker"]["rate"], result),
        "saturation_by_budget": _ratios((sat["by_budget"] or {}).get("rate"), result),
        "saturation_lag_only": _ratios((sat["lag_only"] or {}).get("rate"), result),
    }
    result["worker_over_bare"] = result["ratios"]["drain"]["vs_bare_faust"]
    result["worker_over_quix"] = result["ratios"]["drain"]["vs_quix"]
    buckets, timed_runs, segments = timeline(runs.segments)
    result["timeline"] = {
        "rebased": runs.fresh, "segments": segments, "buckets": buckets,
        "runs": [{k: r[k] for k in ("label", "rate", "start_s", "end_s")} for r in timed_runs]}
    result["rss"] = rss_report(samplers)
    cdfs = [(f"{r['label']}: {r['rate']:,.0f}/s", live.latencies[r["label"]])
            for live in runs.segments for r in live.runs]
    xlabel = ("seconds of live traffic (each run on a fresh broker; runs placed end to end)"
              if runs.fresh else "seconds since the first live run started")
    result["plots"] = plots.write_all(
        out_dir, buckets=buckets, runs=timed_runs, cdfs=cdfs, budget_ms=budget,
        rss=[(w["worker"], w["series_mb"], w["marks"]) for w in result["rss"]["workers"]],
        xlabel=xlabel)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print_summary(result, what)
    print(f"results: {out_dir}/ (result.json, {', '.join(result['plots'])})")


def _thirds(run: dict, key: str) -> str:
    """A run's three values of ``key`` (one per third of its time), as "a ms / b ms / c ms"."""
    values = run.get(key) or []
    return " / ".join(_ms(v) for v in values) if values else "-"
