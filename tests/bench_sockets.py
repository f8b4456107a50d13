"""Benchmark of the Unix-socket edge (not collected by pytest; run it by hand).

    .venv/bin/python tests/bench_sockets.py [seconds-per-run]

Token reads per second and latency with 1 and 16 concurrent client processes, for the
TokenServer and, in the same run, for the bare baseline it is held to: a blocking
accept-send-close loop on one thread serving a fixed token. Then control-socket `status`
round trips per second with a trivial handler (the per-connection rate limit lifted, since
it would otherwise be what is measured).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aac_tokend.client import ControlClient
from aac_tokend.serve.control_server import ControlServer
from aac_tokend.serve.token_server import TokenServer

__all__ = ["main"]

TOKEN = b"eyJhbGciOiJSUzI1NiJ9." + b"x" * 900 + b".sig"  # about the size of an AAC access JWT
CLIENT_COUNTS = (1, 16)

Row = dict[str, Any]


class _ConstantSource:
    def current_token(self, profile: str) -> bytes | None:
        return TOKEN


class _StatusHandler:
    def handle(self, request: dict[str, object]) -> dict[str, object]:
        return {"ok": True, "profiles": []}


def _token_reader(path: str, duration: float, go: Any, out: Any) -> None:
    expected = TOKEN + b"\n"
    go.wait()
    latencies = array("d")
    bad = 0
    perf = time.perf_counter
    end = perf() + duration
    while (t0 := perf()) < end:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        data = sock.recv(4096)
        sock.close()
        latencies.append(perf() - t0)
        bad += data != expected
    out.put((latencies.tobytes(), bad))


def _control_client(path: str, duration: float, go: Any, out: Any) -> None:
    with ControlClient(path) as client:
        go.wait()
        latencies = array("d")
        bad = 0
        perf = time.perf_counter
        end = perf() + duration
        while (t0 := perf()) < end:
            bad += client.request("status").get("ok") is not True
            latencies.append(perf() - t0)
    out.put((latencies.tobytes(), bad))


def _thread_cpu(tid: int) -> float:
    """Return the CPU seconds thread ``tid`` of this process has used (Linux /proc)."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drive(
    target: Callable[..., None], server: tuple[str, int], clients: int, duration: float
) -> Row:
    """Run ``clients`` processes of ``target`` at once; return rates, latencies, server CPU."""
    path, tid = server
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(path, duration, go, out)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    time.sleep(0.3)  # let every client get to the starting line
    cpu = _thread_cpu(tid)
    go.set()
    latencies = array("d")
    bad = 0
    for _ in procs:
        raw, wrong = out.get(timeout=duration + 30)
        latencies.frombytes(raw)
        bad += wrong
    cpu = _thread_cpu(tid) - cpu
    for proc in procs:
        proc.join()
    ordered = sorted(latencies)
    return {
        "rate": len(ordered) / duration,
        "p50": ordered[len(ordered) // 2] * 1e6,
        "p99": ordered[int(len(ordered) * 0.99)] * 1e6,
        "cpu": cpu / max(1, len(ordered)) * 1e6,
        "bad": bad,
    }


@contextmanager
def _token_server(directory: Path) -> Iterator[tuple[str, int]]:
    server = TokenServer(directory, _ConstantSource())
    path = server.add_profile("bench")
    server.start()
    assert server._thread is not None and server._thread.native_id is not None
    try:
        yield str(path), server._thread.native_id
    finally:
        server.stop()


@contextmanager
def _baseline_server(directory: Path) -> Iterator[tuple[str, int]]:
    path = str(directory / "baseline.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(512)
    stop = threading.Event()
    data = TOKEN + b"\n"

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            if stop.is_set():
                conn.close()
                return
            conn.sendall(data)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert thread.native_id is not None
    try:
        yield path, thread.native_id
    finally:
        stop.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as poke:
            poke.connect(path)
        thread.join()
        listener.close()
        Path(path).unlink()


@contextmanager
def _control_server(directory: Path) -> Iterator[tuple[str, int]]:
    server = ControlServer(directory / "control.sock", _StatusHandler(), rate_limit=1e9)
    server.start()
    assert server._thread is not None and server._thread.native_id is not None
    try:
        yield str(server.path), server._thread.native_id
    finally:
        server.stop()


def _rows(name: str, unit: str, got: Row, base: Row | None) -> list[Row]:
    rows = []
    measures = (
        ("rate", "", unit),
        ("p50", " p50", "us"),
        ("p99", " p99", "us"),
        ("cpu", " server CPU/op", "us"),
    )
    for key, label, row_unit in measures:
        value = got[key]
        baseline = base[key] if base else None
        rows.append(
            {
                "name": f"{name}{label}",
                "value": round(value, 1),
                "baseline": round(baseline, 1) if baseline else None,
                "ratio": round(value / baseline, 2) if baseline else None,
                "unit": row_unit,
            }
        )
    return rows


def main(duration: float = 2.0) -> list[Row]:
    """Run every measurement, print a table, and return its rows."""
    directory = Path(tempfile.mkdtemp(prefix="atkb", dir="/tmp"))
    rows: list[Row] = []
    for clients in CLIENT_COUNTS:
        with _baseline_server(directory) as path:
            base = _drive(_token_reader, path, clients, duration)
        with _token_server(directory) as path:
            got = _drive(_token_reader, path, clients, duration)
        if got["bad"] or base["bad"]:
            raise SystemExit(f"wrong token bytes read: server {got['bad']}, base {base['bad']}")
        rows += _rows(f"token reads, {clients} clients", "reads/s", got, base)
    for clients in CLIENT_COUNTS:
        with _control_server(directory) as path:
            got = _drive(_control_client, path, clients, duration)
        if got["bad"]:
            raise SystemExit(f"{got['bad']} control requests failed")
        rows += _rows(f"control status, {clients} clients", "requests/s", got, None)
    directory.rmdir()
    print(f"{'measurement':42} {'value':>10} {'baseline':>10} {'ratio':>6}  unit")
    for row in rows:
        base_text = "-" if row["baseline"] is None else f"{row['baseline']:.1f}"
        ratio_text = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        value = f"{row['value']:>10.1f}"
        print(f"{row['name']:42} {value} {base_text:>10} {ratio_text:>6}  {row['unit']}")
    return rows


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 2.0)
