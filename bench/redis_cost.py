#!/usr/bin/env python3
"""Redis's own CPU per publish, by the way a publish is sent (docs/scaling.md).

Starts a redis-server on a free port, subscribes two connections (two
gateway instances) to CHANNELS announcement names, then sends publishes at
a steady RATE for SECONDS from one connection and reads the server's CPU
time from /proc. Each way is run REPS times:

  script    pollgate's publish script (EVALSHA), as pollgate sends it
  function  the same script as a Redis Function (FCALL; Redis >= 7)
  plain     XADD + PEXPIRE + PUBLISH pipelined, no script (not atomic:
            another client's publish may be announced between them)
  xadd      XADD alone (stored, announced to nobody)
  ping      PING: what any request costs Redis at this rate
  batch:N   the publish script for N publishes at once (N times fewer calls)

    bench/redis_cost.py                      # every way, 2000/s, 8 s, 3 reps
    RATE=6000 bench/redis_cost.py script ping

Prints microseconds of Redis CPU per publish (user + system) for each run.
"""
import os
import random
import socket
import subprocess
import sys
import threading
import time

RATE = int(os.environ.get("RATE", "2000"))
SECONDS = float(os.environ.get("SECONDS", "8"))
REPS = int(os.environ.get("REPS", "3"))
CHANNELS = 200
DATA = b'{"text":"hello there, this is a message of some 60 bytes ..."}'
HERE = os.path.dirname(os.path.abspath(__file__))


def publish_script():
    """The publish script, read from src/broker/redis/layout.rs."""
    src = open(os.path.join(HERE, "..", "src", "broker", "redis", "layout.rs")).read()
    start = src.index('pub const PUBLISH_SCRIPT: &str = r#"') + len('pub const PUBLISH_SCRIPT: &str = r#"')
    return src[start:src.index('"#;', start)]


def batch_script():
    """The publish script's steps for N publishes in one call."""
    return r"""
local ids = {}
for i = 1, #KEYS do
  local ct = ARGV[3 * i + 2]
  if string.find(ct, '%c') then ct = 'application/octet-stream' end
  local id = redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '*', 'ct', ct, 'd', ARGV[3 * i + 3])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
  redis.call('PUBLISH', ARGV[3 * i + 1], id .. '\n' .. ct .. '\n' .. ARGV[3 * i + 3])
  ids[i] = id
end
return ids
"""


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def connect(port):
    for _ in range(100):
        try:
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError:
            time.sleep(0.05)
    sys.exit(f"redis-server on port {port} never answered")


def drain(s):
    while True:
        try:
            if not s.recv(1 << 16):
                return
        except OSError:
            return


def call(s, *args):
    s.sendall(resp(*args))
    reply = s.recv(4096)
    if reply.startswith(b"-"):
        sys.exit(f"redis refused {args[0]}: {reply.decode().strip()}")
    return reply.decode().split("\r\n")[-2]


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(way):
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        subscribers = []
        for _ in range(2):
            s = connect(port)
            s.sendall(b"".join(resp("SUBSCRIBE", f"pg:{{c{c}}}") for c in range(CHANNELS)))
            threading.Thread(target=drain, args=(s,), daemon=True).start()
            subscribers.append(s)
        p = connect(port)
        script = call(p, "SCRIPT", "LOAD", publish_script())
        batched = call(p, "SCRIPT", "LOAD", batch_script())
        body = publish_script().replace("KEYS", "keys").replace("ARGV", "args")
        call(p, "FUNCTION", "LOAD", "REPLACE",
             f"#!lua name=pgcost\nredis.register_function('publish', function(keys, args)\n{body}\nend)")
        threading.Thread(target=drain, args=(p,), daemon=True).start()
        per_call = int(way.split(":")[1]) if way.startswith("batch:") else 1

        def request(channels):
            if way.startswith("batch:"):
                keys = [f"pg:{{c{c}}}:h" for c in channels]
                args = [100, 60000, "PUBLISH"]
                for c in channels:
                    args += [f"pg:{{c{c}}}", "application/json", DATA]
                return resp("EVALSHA", batched, len(keys), *keys, *args)
            out = []
            for c in channels:
                k = f"pg:{{c{c}}}"
                one = (k + ":h", k + ":f", k, 100, 60000, "application/json", DATA, "PUBLISH")
                if way == "script":
                    out.append(resp("EVALSHA", script, 2, *one))
                elif way == "function":
                    out.append(resp("FCALL", "publish", 2, *one))
                elif way == "plain":
                    out.append(resp("XADD", k + ":h", "MAXLEN", "~", 100, "*", "ct", "application/json", "d", DATA)
                               + resp("PEXPIRE", k + ":h", 60000)
                               + resp("PUBLISH", k, b"1-1\napplication/json\n" + DATA))
                elif way == "xadd":
                    out.append(resp("XADD", k + ":h", "MAXLEN", "~", 100, "*", "ct", "application/json", "d", DATA))
                elif way == "ping":
                    out.append(resp("PING"))
                else:
                    sys.exit(f"unknown way {way!r}")
            return b"".join(out)

        before = cpu_seconds(server.pid)
        start = next_send = time.monotonic()
        sent = 0
        while time.monotonic() - start < SECONDS:
            p.sendall(request([random.randrange(CHANNELS) for _ in range(per_call)]))
            sent += per_call
            next_send += per_call / RATE
            pause = next_send - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        time.sleep(0.3)
        used = cpu_seconds(server.pid) - before
        print(f"{way:10} {RATE}/s  {sent} publishes  {1e6 * used / sent:6.1f} µs of Redis CPU each", flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    ways = sys.argv[1:] or ["script", "function", "plain", "xadd", "ping", "batch:2", "batch:4"]
    for _ in range(REPS):
        for way in ways:
            run(way)
