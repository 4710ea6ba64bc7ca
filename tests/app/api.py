"""A small WSGI API for drain-agent's tests, served by gunicorn (gthread, keep-alive).

GET /            -> 200 "ok"
GET /slow?ms=N   -> sleeps N ms, then 200
GET /bytes?n=N   -> N bytes of body, streamed in 64 KiB chunks
GET /mix         -> 200 after 1-10 ms, or 0.2-2 s for one request in ten
POST /upload     -> reads the body in 64 KiB pieces as it arrives, then 200
                    "received N" (N: the bytes it read)
GET /healthz     -> 200, or 503 when the version starts with "broken", or every other
                    300 ms when it starts with "flapping"
Every response carries X-API-Version from $API_VERSION (default "1.0").
"""
import os
import random
import time
from urllib.parse import parse_qs

VERSION = os.environ.get("API_VERSION", "1.0")
CHUNK = b"x" * 65536


def _int(query, name, default):
    try:
        return max(0, int(query.get(name, [default])[0]))
    except ValueError:
        return default


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    headers = [("X-API-Version", VERSION)]
    if path == "/slow":
        time.sleep(_int(query, "ms", 1000) / 1000.0)
        body = b"slow ok\n"
    elif path == "/mix":
        # An API's realistic mix: most calls are quick, one in ten takes 0.2-2 s.
        if random.random() < 0.1:
            time.sleep(random.uniform(0.2, 2.0))
        else:
            time.sleep(random.uniform(0.001, 0.01))
        body = b"mix ok\n"
    elif path == "/upload":
        body = b"received %d" % _read_body(environ)
    elif path == "/bytes":
        n = _int(query, "n", 0)
        start_response("200 OK", headers + [("Content-Type", "application/octet-stream"),
                                            ("Content-Length", str(n))])
        return _stream(n)
    elif path == "/healthz" and VERSION.startswith("flapping") and int(time.time() / 0.3) % 2:
        # Healthy 300 ms, unhealthy 300 ms: never three probes 200 ms apart in a row.
        start_response("503 Service Unavailable", headers + [("Content-Length", "9")])
        return [b"flapping\n"]
    elif path == "/healthz" and VERSION.startswith("broken"):
        start_response("503 Service Unavailable", headers + [("Content-Length", "7")])
        return [b"broken\n"]
    elif path in ("/", "/healthz"):
        body = b"ok\n"
    else:
        start_response("404 Not Found", headers + [("Content-Length", "10")])
        return [b"not found\n"]
    start_response("200 OK", headers + [("Content-Type", "text/plain"),
                                        ("Content-Length", str(len(body)))])
    return [body]


def _read_body(environ):
    try:
        left = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        left = 0
    received = 0
    stream = environ["wsgi.input"]
    while left > 0:
        part = stream.read(min(left, 65536))
        if not part:
            break
        received += len(part)
        left -= len(part)
    return received


def _stream(n):
    while n > 0:
        part = CHUNK if n >= len(CHUNK) else CHUNK[:n]
        n -= len(part)
        yield part
