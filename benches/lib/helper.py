#!/usr/bin/env python3
"""Two measurements of run.sh that need finer control than bash gives.

hold: opens N keep-alive HTTP/1.1 connections to a proxy, makes one GET on each (checking
  for a 200), writes "ok N" to --ready-file and keeps them all open and idle until it is
  killed or --max-seconds pass. run.sh reads the proxy's RSS while they are held: what a
  proxy keeps per idle client connection. With --h2, each connection is HTTP/2 with prior
  knowledge (h2c) and makes its GET on stream 1.

startup: starts a command (a `spur proxy`) --runs times (after one start that is not
  counted, which brings the binary into the page cache) and, for each, measures the time
  from just before the fork to the first `GET /ready` on the admin port that answers 200,
  polling every 0.2 ms from the helper's own CPU (the command is pinned to --cpus); stops it
  with SIGTERM in between. Prints each time in ms and the
  median. Everything is bounded: each run waits at most --timeout seconds.

Only 127.0.0.1 is ever contacted.
"""

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: spur-bench-hold\r\n\r\n"


def read_response(sock):
    """Reads one HTTP/1.1 response with a Content-Length body; returns its status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        body += chunk
    return status


# HTTP/2 with prior knowledge: the preface, an empty SETTINGS, and a HEADERS frame for
# stream 1 (END_STREAM | END_HEADERS) with GET, http, / from HPACK's static table and
# :authority 127.0.0.1 as a literal without indexing.
_AUTHORITY = b"127.0.0.1"
_H2_BLOCK = b"\x82\x86\x84\x01" + bytes([len(_AUTHORITY)]) + _AUTHORITY
H2_REQUEST = (
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    + len(_H2_BLOCK).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + _H2_BLOCK
)
_STATUS = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}


def read_h2_response(sock):
    """Reads frames until stream 1 ends; returns its status code (from the static table's
    :status entries or a literal with the entry's name), answering the server's SETTINGS."""
    buf, status = b"", None
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before stream 1 ended")
            buf += chunk
        n = int.from_bytes(buf[:3], "big")
        kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload, buf = buf[9 : 9 + n], buf[9 + n :]
        if kind == 0x4 and not flags & 0x1:
            sock.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
        elif kind == 0x7:
            raise ConnectionError("GOAWAY")
        elif kind == 0x3 and stream == 1:
            raise ConnectionError("stream 1 reset")
        elif kind == 0x1 and stream == 1:
            first = payload[0]
            if first in _STATUS:
                status = _STATUS[first]
            elif first & 0xF0 in (0x00, 0x10) and first & 0x0F == 8:
                status = int(payload[2 : 2 + payload[1]])
            else:
                raise ValueError(f"unexpected :status encoding {first:#x}")
        if stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            if status is None:
                raise ValueError("stream 1 ended without a response head")
            return status


def hold(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.conns + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    deadline = time.monotonic() + args.max_seconds
    socks, ok, errors = [], 0, []
    for _ in range(args.conns):
        if time.monotonic() > deadline:
            errors.append("time limit while opening connections")
            break
        try:
            s = socket.create_connection(("127.0.0.1", args.port), timeout=5)
            s.sendall(H2_REQUEST if args.h2 else REQUEST)
            if (read_h2_response(s) if args.h2 else read_response(s)) == 200:
                ok += 1
            socks.append(s)
        except (OSError, ValueError, IndexError) as e:
            errors.append(str(e))
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"ok {ok} open {len(socks)} errors {len(errors)}\n")
        for e in errors[:5]:
            f.write(f"error {e}\n")
    os.rename(tmp, args.ready_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return 0


def probe_ready(port):
    """One GET /ready; True on a 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return read_response(s) == 200
    except (OSError, ValueError, IndexError):
        return False


def parse_cpus(text):
    """ "0-2,5" -> {0, 1, 2, 5} """
    cpus = set()
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            cpus.update(range(int(a), int(b) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def startup(args):
    cpus = parse_cpus(args.cpus) if args.cpus else None

    def pin():
        if cpus:
            os.sched_setaffinity(0, cpus)

    times = []
    # Start 0 is not counted: it brings the binary into the page cache, as on a node where
    # the sidecar image is already there.
    for i in range(args.runs + 1):
        log = open(f"{args.log_prefix}.{i}.log", "w")
        t0 = time.monotonic()
        proc = subprocess.Popen(args.command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
        elapsed = None
        while time.monotonic() - t0 < args.timeout:
            if probe_ready(args.admin_port):
                elapsed = (time.monotonic() - t0) * 1000
                break
            if proc.poll() is not None:
                break
            time.sleep(0.0002)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if elapsed is None:
            print(f"run {i}: not ready within {args.timeout}s (exit {proc.returncode})", file=sys.stderr)
            return 1
        if i > 0:
            times.append(elapsed)
    print("median_ms %.2f" % statistics.median(times))
    print("min_ms %.2f" % min(times))
    print("runs_ms " + ",".join("%.2f" % t for t in times))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold", help="hold N idle keep-alive connections that each made one request")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--conns", type=int, default=1000)
    h.add_argument("--ready-file", required=True)
    h.add_argument("--max-seconds", type=float, default=60)
    h.add_argument("--h2", action="store_true", help="HTTP/2 with prior knowledge (h2c)")
    s = sub.add_parser("startup", help="time from start to /ready answering 200")
    s.add_argument("--admin-port", type=int, required=True)
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--timeout", type=float, default=10)
    s.add_argument("--log-prefix", required=True)
    s.add_argument("--cpus", help="CPU list for the command (the helper itself stays where it is)")
    s.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.cmd == "hold":
        return hold(args)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("startup: give the command after --")
    return startup(args)


if __name__ == "__main__":
    sys.exit(main())
