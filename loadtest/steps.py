"""Step mode of ``python -m fraudstream.loadtest``: rates that grow until the worker falls
behind, the saturation rates they give, then the run at 70% of saturation and the ratio runs."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator

from fraudstream.loadtest.decided_by import describe
from fraudstream.loadtest.harness import _progress
from fraudstream.loadtest.report import _cpu, _ms
from fraudstream.loadtest.runs import Runs


def step_rates(start: float, factor: float, increment: float) -> Iterator[float]:
    """start, then x factor (or + increment when it is set) per step."""
    for k in itertools.count():
        yield start + k * increment if increment > 0 else start * factor**k


def run_steps(live: Runs, args: argparse.Namespace, budget_ms: float) -> list[dict]:
    steps: list[dict] = []
    both_failed = lag_grew = 0
    rates = step_rates(args.step_start, args.step_factor, args.step_increment)
    for i, rate in zip(range(args.max_steps), rates, strict=False):
        rate = round(rate)
        _progress(f"step {i + 1}/{args.max_steps}: {rate:,}/s for {args.step_seconds:g}s")
        step = live.run(f"step {i + 1}", f"{rate:,}/s", "step", rate, args.step_seconds,
                        args.drain_timeout)
        step["within_budget"] = step["p99_ms"] is not None and step["p99_ms"] <= budget_ms
        steps.append(step)
        _progress(f"  -> p99 {_ms(step['p99_ms'])}, lag grew: {step['lag_grew']}, "
                  f"drained in {step['drain_s']:.1f}s; worker batch time p50 "
                  f"{_ms(step['worker_batch_p50_ms'])}, p99 {_ms(step['worker_batch_p99_ms'])}; "
                  f"CPU %: {_cpu(step)}; {describe(step['decided_by'])}")
        both_failed = both_failed + 1 if step["lag_grew"] and not step["within_budget"] else 0
        lag_grew = lag_grew + 1 if step["lag_grew"] else 0
        if not step["drained"]:
            step["stopped"] = f"not drained within {args.drain_timeout:g}s"
        elif both_failed >= args.stop_after:
            step["stopped"] = f"{both_failed} step(s) in a row failed both criteria"
        elif lag_grew >= 2:
            step["stopped"] = "lag grew two steps in a row"
        if "stopped" in step:
            _progress(f"  stepping stops: {step['stopped']}")
            break
    return steps


def saturation(steps: list[dict], budget_ms: float) -> dict:
    by_budget = [s for s in steps if s["within_budget"] and not s["lag_grew"]]
    by_lag = [s for s in steps if not s["lag_grew"]]

    def pick(found: list[dict]) -> dict | None:
        if not found:
            return None
        s = max(found, key=lambda s: s["rate"])
        return {"rate": s["rate"], "step": s["label"], "throughput": s["throughput"],
                "p99_ms": s["p99_ms"], "decided_by": s["decided_by"]}

    out = {"budget_ms": budget_ms, "by_budget": pick(by_budget), "lag_only": pick(by_lag)}
    if not steps:
        out["note"] = "no steps were run"
    elif out["by_budget"] is None:
        out["note"] = f"no step met the budget (p99 <= {budget_ms:g} ms and lag not growing)"
    if steps and out["lag_only"] is None:
        out["note_lag"] = "lag grew at every step: the first step's rate is already too high"
    return out


def live_runs(runs: Runs, args: argparse.Namespace, budget: float, result: dict) -> None:
    """Steps, the 70% run and the ratio runs, into ``result``."""
    result["steps"] = run_steps(runs, args, budget) if args.steps else []
    sat = saturation(result["steps"], budget)
    result["saturation"] = sat
    basis, base = ("by budget", sat["by_budget"]) if sat["by_budget"] else (
        "lag only: no step met the budget", sat["lag_only"])
    result["latency_at_70pct"] = None
    if args.steps and base is not None:
        target = round(0.7 * base["rate"])
        _progress(f"latency at 70% of saturation ({basis}): {target:,}/s for "
                  f"{args.latency_seconds:g}s")
        result["latency_at_70pct"] = runs.run(
            "70% of saturation", f"70%: {target:,}/s", "latency", target,
            args.latency_seconds, args.drain_timeout) | {"basis": basis}
    elif args.steps:
        result["latency_at_70pct_note"] = "lag grew at every step: no rate to take 70% of"
    result["latency"] = []
    for ratio in args.latency_ratios:
        target = round(result["worker"]["rate"] * ratio)
        _progress(f"latency at {ratio:g}x the drain rate: {target:,}/s for "
                  f"{args.latency_seconds:g}s")
        result["latency"].append(runs.run(
            f"{ratio:g}x drain", f"{ratio:g}x: {target:,}/s", "ratio", target,
            args.latency_seconds, args.drain_timeout) | {"ratio": ratio})
