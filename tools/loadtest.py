"""Load test of `mmtag serve`: N concurrent clients post real photos and captions to /v1/tag for
a bounded time; prints requests/s, latency percentiles, errors and the server's memory.

    python tools/loadtest.py --serve RUN_OR_EXPORT --engine onnx-int8 \
        --data ../shared/data/comp5329 --clients 8 --seconds 60

starts the server itself on a free port of 127.0.0.1 (its memory is then measured from
/proc), waits for /healthz, runs the clients, and stops it. `--url URL` tests a server that is
already running instead (no memory figures). Every client sends the rows of test.csv whose
images exist, in turn.

`--hostile K` adds K clients that each send, again and again, a small PNG file of a huge
16-bit image (6300 x 6300, under the pixel limit, about 75 kB): the ordinary clients' latency
and the server's peak memory (VmHWM) then show whether one client can starve the rest.

    python tools/loadtest.py --serve RUN --data DIR --clients 2 --hostile 8 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from mmtag.data.csv_io import read_csv


def samples(data: Path, n: int) -> list[tuple[str, bytes, str]]:
    """(file name, JPEG bytes, caption) of the first `n` test rows whose image exists."""
    rows = [r for r in read_csv(data / "test.csv") if (data / "data" / r.image_id).exists()][:n]
    if not rows:
        raise SystemExit(f"no row of {data / 'test.csv'} has its image in {data / 'data'}")
    return [(r.image_id, (data / "data" / r.image_id).read_bytes(), r.caption) for r in rows]


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid`, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(path: str, engine: str | None, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mmtag", "serve", path, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    cmd += ["--engine", engine] if engine else []
    # the server's log goes to a file: a pipe nobody reads would fill and block it
    log = open(args.server_log, "w")  # noqa: SIM115 -- open for the server's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=2)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited; its log: {args.server_log}") from None
            if time.time() - t0 > 300:
                proc.kill()
                raise SystemExit("the server did not open its port in 300 s") from None
            time.sleep(0.2)


def hostile_png(side: int = 6300) -> bytes:
    """A 16-bit greyscale PNG of side x side pixels that compresses to a small file."""
    import io

    import numpy as np
    from PIL import Image

    a = np.zeros((side, side), dtype=np.uint16)
    a[::97, :] = 40000  # a few lines, so that it is not one colour
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of process `pid` so far (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client(url: str, items, deadline: float, offset: int, out: list, errors: list) -> None:
    with httpx.Client(timeout=60) as http:
        i = offset
        while time.perf_counter() < deadline:
            name, data, caption = items[i % len(items)]
            i += 1
            t = time.perf_counter()
            try:
                r = http.post(f"{url}/v1/tag", files={"image": (name, data, "image/jpeg")},
                              data={"caption": caption})
                ok = r.status_code == 200
            except httpx.HTTPError as e:
                ok, r = False, e
            if ok:
                out.append(time.perf_counter() - t)
            else:
                errors.append(str(getattr(r, "text", r))[:200])


def run_load(url: str, items, clients: int, seconds: float, hostile: int = 0) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(url, items, deadline, k * 7, lat, errors))
               for k in range(clients)]
    if hostile:
        huge = [("huge.png", hostile_png(), "a photo")]
        h_lat: list[float] = []
        h_err: list[str] = []
        threads += [threading.Thread(target=client, args=(url, huge, deadline, 0, h_lat, h_err))
                    for _ in range(hostile)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()

    def pct(q: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else float("nan")

    extra = ({"hostile_clients": hostile, "hostile_answered": len(h_lat),
              "hostile_refused": len(h_err), "hostile_first_answer": (h_err or [""])[0][:160]}
             if hostile else {})
    return {**extra, "clients": clients, "seconds": round(wall, 1), "requests": len(lat),
            "requests_per_second": round(len(lat) / wall, 2),
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                           "mean": round(1000 * statistics.fmean(lat), 1) if lat else None},
            "errors": len(errors), "first_errors": errors[:3]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--serve", help="start `mmtag serve` on this run or export folder")
    g.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--engine", help="for --serve: torch, onnx or onnx-int8 (default: serve's)")
    p.add_argument("--data", required=True, help="Kaggle-layout folder: test.csv and data/")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--samples", type=int, default=200, help="distinct rows sent (default 200)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--server-log", default="loadtest-server.log",
                   help="where --serve writes the server's log (default %(default)s)")
    p.add_argument("--hostile", type=int, default=0,
                   help="also this many clients sending small PNGs of huge 16-bit images")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    items = samples(Path(args.data), args.samples)
    proc = None
    url = args.url
    if args.serve:
        proc, url = start_server(args.serve, args.engine, args)
    try:
        before = rss_mb(proc.pid) if proc else None
        res = run_load(url, items, args.clients, args.seconds, args.hostile)
        after = rss_mb(proc.pid) if proc else None
        peak = peak_rss_mb(proc.pid) if proc else None
        model = httpx.get(f"{url}/v1/model", timeout=10).json()
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    res.update(engine=model["engine"], batching=model["batching"],
               server_rss_mb={"before": before and round(before, 1),
                              "after": after and round(after, 1),
                              "peak": peak and round(peak, 1)})
    if args.json:
        print(json.dumps(res))
    else:
        lat = res["latency_ms"]
        print(f"{res['clients']} clients for {res['seconds']} s against the {res['engine']} engine: "
              f"{res['requests']} requests, {res['requests_per_second']} requests/s, "
              f"latency p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms; "
              f"errors {res['errors']}; mean batch {res['batching']['mean_batch']}")
        if proc:
            print(f"server memory (RSS): {res['server_rss_mb']['before']} MB before, "
                  f"{res['server_rss_mb']['after']} MB after, {res['server_rss_mb']['peak']} MB "
                  f"at its peak")
        if args.hostile:
            print(f"{args.hostile} hostile clients: {res['hostile_answered']} huge images "
                  f"answered, {res['hostile_refused']} refused "
                  f"({res['hostile_first_answer'] or '-'})")
    return 1 if res["errors"] else 0  # a hostile client's refusal is not an error


if __name__ == "__main__":
    raise SystemExit(main())
