"""`make bench`: the daemon's performance, each figure beside a baseline measured in this run.

    .venv/bin/python -m tests.bench [--idle-seconds 60] [--seconds 0.6] [--rounds 5]
        [--profiles 1000] [--fleet-refreshes 15] [--fleet-failovers 3]
        [--only idle,courier,reads,control,cli,refresh,fleet,scale]

Prints one table (value, baseline, ratio, target, and MISSED where a target is missed) and
writes it as JSON to /tmp/aac-tokend-bench.json. Exits 0 either way: benchmarks report,
they do not fail the build. About 3 to 4 minutes with the defaults on 2 cores (plus ~20 s
the first time, to build the regular install the CLI is timed from). The fleet section needs
the etcd binary and is skipped, saying so, without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from tests.bench_cli import cli_rows, regular_install
from tests.bench_courier import courier_rows
from tests.bench_footprint import footprint_rows
from tests.bench_procs import Row, import_request, run_daemon, run_sandbox
from tests.bench_reads import control_rows, read_rows
from tests.bench_refresh import refresh_load_rows
from tests.bench_scale import scale_rows
from tests.etcd_cluster import ETCD, SKIP_REASON

__all__ = ["main"]

JSON_PATH = Path("/tmp/aac-tokend-bench.json")
SECTIONS = ("idle", "courier", "reads", "control", "cli", "refresh", "fleet", "scale")
#: The daemon's profile for every section but scale: a long access TTL, so it never
#: refreshes on its own and only forced refreshes (section "refresh") happen.
LONG_TTL = 3600.0
#: A 1-minute load average above this (the bench itself adds about 1) means other work
#: shared the CPUs, and every figure is noisier than usual.
BUSY_LOAD = 2.5
#: Scale: short-lived access tokens make a thousand profiles refresh ~22 times a second.
SCALE_TTL = 60.0


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 1 else f"{value:.1f}"


def print_table(rows: list[Row]) -> None:
    """One table: measurement, value, unit, baseline (and what it is), ratio, target, result."""
    header = ("measurement", "value", "unit", "baseline", "ratio", "target", "result",
              "baseline is")  # fmt: skip
    lines = [header]
    for r in rows:
        result = "" if r["met"] is None else ("ok" if r["met"] else "MISSED")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append((r["name"], _format(r["value"]), r["unit"], _format(r["baseline"]),
                      ratio, r["target"], result, r["baseline_name"]))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    right = {1, 3, 4}
    for line in lines:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(line, widths, strict=False))]  # fmt: skip
        print("  ".join(cells) + "  " + line[-1])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description="make bench")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=60.0,
        help="idle window for the footprint (default 60)",
    )
    parser.add_argument(
        "--seconds", type=float, default=0.6, help="duration of one socket trial (default 0.6)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="trials per socket figure, taken turn about (default 5)",
    )
    parser.add_argument("--cli-runs", type=int, default=40, help="`token` runs (default 40)")
    parser.add_argument(
        "--courier-rounds",
        type=int,
        default=60,
        help="refreshes per courier kind (cold spawn: a quarter, warm: half; default 60)",
    )
    parser.add_argument("--profiles", type=int, default=1000, help="scale: profiles (1000)")
    parser.add_argument(
        "--fleet-refreshes", type=int, default=15, help="fleet: forced refreshes (default 15)"
    )
    parser.add_argument(
        "--fleet-failovers", type=int, default=3, help="fleet: owners SIGKILLed (default 3)"
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections of {','.join(SECTIONS)}",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[Row]:
    """Every selected section, in an order that keeps them from disturbing each other."""
    only = set(args.only.split(","))
    rows: list[Row] = []
    counts = (1, 16)
    trial, rounds = args.seconds, args.rounds
    with run_sandbox(LONG_TTL) as sandbox, run_daemon() as daemon:
        daemon.import_profile(import_request(sandbox, "default", sandbox.generate()))
        daemon.wait_serving(1)

        def meanwhile() -> list[Row]:
            # Inside the idle window: neither touches the daemon (see bench_footprint).
            if "cli" in only:
                regular_install()
            return courier_rows(sandbox, args.courier_rounds) if "courier" in only else []

        if "idle" in only:
            print(f"idle footprint: {args.idle_seconds:.0f} s (courier benchmark meanwhile)...",
                  flush=True)  # fmt: skip
            idle, courier = footprint_rows(daemon, args.idle_seconds, meanwhile)
            rows += idle
        else:
            courier = meanwhile()
        if "reads" in only:
            print("token reads...", flush=True)
            rows += read_rows(daemon, "default", trial, rounds, counts)[0]
        if "control" in only:
            print("control status...", flush=True)
            rows += control_rows(daemon, trial, rounds, counts)
        if "cli" in only:
            print("`aac-tokend token` wall time...", flush=True)
            rows += cli_rows(daemon, "default", args.cli_runs)
        if "refresh" in only:
            print("token reads during forced refreshes...", flush=True)
            steady = args.profiles / (0.75 * SCALE_TTL)  # the scale section's refresh rate
            rows += refresh_load_rows(daemon, "default", trial, rounds, counts, steady)
        rows += courier
        if "fleet" in only and ETCD is None:
            print(f"fleet: skipped, {SKIP_REASON}", flush=True)
        elif "fleet" in only:
            print("fleet: 3 hosts on a 3-member etcd...", flush=True)
            from tests.bench_fleet import fleet_rows  # imports the fleet code: only when asked

            rows += fleet_rows(sandbox, daemon, refreshes=args.fleet_refreshes,
                               failovers=args.fleet_failovers, trial=trial,
                               rounds=rounds)  # fmt: skip
        if "scale" in only:
            print(f"scale: {args.profiles} profiles...", flush=True)
            rows += scale_rows(daemon, args.profiles, SCALE_TTL, trial, rounds, counts)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write the JSON; always exit 0."""
    args = _parse(argv)
    started = time.monotonic()
    load = [os.getloadavg()[0]]
    rows = run(args)
    load.append(os.getloadavg()[0])
    elapsed = time.monotonic() - started
    print()
    print_table(rows)
    missed = [r["name"].strip() for r in rows if r["met"] is False]
    print()
    print(f"{len(missed)} target(s) MISSED" if missed else "all targets met",
          f"- {elapsed:.0f} s on {os.cpu_count()} CPUs; JSON in {JSON_PATH}")  # fmt: skip
    noisy = "- NOISY: other processes shared these CPUs" if max(load) > BUSY_LOAD else ""
    print(f"load average (1 min) before/after: {load[0]:.2f}/{load[1]:.2f}", noisy)
    JSON_PATH.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0], "machine": platform.platform(),
        "cpus": os.cpu_count(), "seconds": round(elapsed), "args": vars(args),
        "loadavg_before_after": load,
        "rows": rows, "missed": missed,
    }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
