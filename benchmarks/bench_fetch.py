"""Time per 1,000 URLs of ``fetch_vggface`` (v2m-build-dataset fetch-vggface) against a local server.

    python benchmarks/bench_fetch.py [--urls 1000] [--workers 1,4,16,32] [--latency-ms 0,100]
                                     [--per-host N] [--image-kb 45] [--json out.json]

A server on 127.0.0.1 runs in its own process (a ThreadingHTTPServer) and answers every URL with
a distinct JPEG of about ``--image-kb`` kB (400x300 px; VGGFace images are typically 20-100 kB)
after ``--latency-ms`` of simulated network latency (the time from request to first byte of a
far-away host; 0 = loopback only). For each (workers, latency) pair a fresh output folder is
fetched with the real code path (requests, validation by decoding, sha256, atomic writes, the
journal and the manifest). ``--per-host`` defaults to the number of workers, because every URL
here goes to one host, while the real URLs are spread over thousands of hosts.

Printed per row: seconds for the run, seconds per 1,000 URLs, URLs/s, MB/s and the CPU time the
fetching process used per URL (what bounds the rate once latency is hidden by concurrency).
"""

from __future__ import annotations

import argparse
import http.server
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine  # benchmarks/_machine.py, beside this script


def _image(i: int, kb: int) -> bytes:
    import cv2
    import numpy as np

    rng = np.random.default_rng(i)
    w, h = 400, 300
    small = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    for q in (95, 90, 85, 75, 60, 40):
        data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()
        if len(data) <= kb * 1024:
            break
    return data


def _serve(port_q, n: int, kb: int, latency: mp.Value) -> None:
    images = [_image(i, kb) for i in range(n)]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            i = int(self.path.rsplit("/", 1)[1].split(".")[0])
            if latency.value:
                time.sleep(latency.value)
            data = images[i % len(images)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.request_queue_size = 128
    port_q.put((srv.server_address[1], sum(map(len, images))))
    srv.serve_forever()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--urls", type=int, default=1000)
    ap.add_argument("--workers", default="1,4,16,32")
    ap.add_argument("--latency-ms", default="0,100")
    ap.add_argument("--per-host", type=int, default=None)
    ap.add_argument("--image-kb", type=int, default=45)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)
    os.environ["no_proxy"] = "127.0.0.1,localhost"

    from v2m_data.vggface_fetch import FetchConfig, fetch_vggface

    latency = mp.Value("d", 0.0)
    port_q: mp.Queue = mp.Queue()
    server = mp.Process(target=_serve, args=(port_q, args.urls, args.image_kb, latency), daemon=True)
    server.start()
    port, total_bytes = port_q.get(timeout=120)
    print(f"server: 127.0.0.1:{port}, {args.urls} images, {total_bytes / args.urls / 1024:.1f} kB each on average")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ann = Path(tmp) / "files"
            ann.mkdir()
            lines = "".join(
                f"{i:08d} http://127.0.0.1:{port}/img/{i}.jpg 100.00 60.00 300.00 260.00 3.00 4.00 1\n" for i in range(args.urls)
            )
            (ann / "Bench_Person.txt").write_text(lines)
            print(f"{'workers':>7} {'per_host':>8} {'latency':>8} {'s':>7} {'s/1000':>7} {'URLs/s':>7} {'MB/s':>6} {'CPU ms/URL':>10}")
            for lat in [float(x) for x in args.latency_ms.split(",")]:
                latency.value = lat / 1000.0
                for w in [int(x) for x in args.workers.split(",")]:
                    out = Path(tmp) / f"out-{w}-{lat:g}"
                    config = FetchConfig(
                        annotations=str(ann), out=str(out), identities_from="all", workers=w,
                        per_host=args.per_host or w, timeout=30.0, retries=0, progress=False,
                    )
                    r0 = resource.getrusage(resource.RUSAGE_SELF)
                    t0 = time.perf_counter()
                    res = fetch_vggface(config)
                    dt = time.perf_counter() - t0
                    r1 = resource.getrusage(resource.RUSAGE_SELF)
                    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                    if res.totals["ok"] != args.urls:
                        print(f"warning: only {res.totals['ok']} of {args.urls} ok: {res.totals['by_reason']}", file=sys.stderr)
                    row = {
                        "workers": w, "per_host": config.per_host, "latency_ms": lat, "urls": args.urls,
                        "seconds": round(dt, 3), "s_per_1000": round(dt * 1000 / args.urls, 2),
                        "urls_per_s": round(args.urls / dt, 1), "mb_per_s": round(res.bytes_downloaded / dt / 1e6, 2),
                        "cpu_ms_per_url": round(cpu * 1000 / args.urls, 2), "ok": res.totals["ok"],
                    }
                    rows.append(row)
                    print(f"{w:>7} {config.per_host:>8} {lat:>6g}ms {dt:>7.2f} {row['s_per_1000']:>7.2f} "
                          f"{row['urls_per_s']:>7.1f} {row['mb_per_s']:>6.2f} {row['cpu_ms_per_url']:>10.2f}")
    finally:
        server.terminate()
        server.join(5)
    info = machine(image_kb=args.image_kb)
    print("machine:", json.dumps(info))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
