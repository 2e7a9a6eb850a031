"""An object store's latency and bandwidth on loopback: a TCP proxy in front of a local
server (fake-gcs-server) that delays every chunk a client sends by `latency_s` (each HTTP
request reaches the server that much later) and delivers the server's bytes at most
`bandwidth` bytes/s over all connections together (one host's link), or, with `drop` set,
resets every connection that sends anything (a connection dropped mid-run; `drop_at` sets it
once a client sends those bytes, e.g. a request naming an object), or, with `answer`
set, answers requests itself with an HTTP error and a Cloud Storage JSON error body (access
denied: 403, no valid credentials: 401), those of `answer_methods` only if given.

    python -m tests.latency_proxy --upstream=PORT --latency_s=0.03 --bandwidth=2e8

prints its port and serves until stopped. `running(...)` runs it in a thread of this process
(tests), `process(...)` as a process of its own (the benchmark: it takes no share of the
client's GIL). Only 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import http
import json
import os
import subprocess
import sys
import threading
from typing import Iterator

from tests import storage_server

_HIGH_WATER = 4 * 2**20  # Bytes queued towards one side before the other side is paused.


@dataclasses.dataclass
class Proxy:
  """The settings and the link shared by all connections; `drop` may be set at any time."""
  upstream_port: int
  latency_s: float
  bandwidth: float
  drop: bool = False
  drop_at: bytes | None = None  # Sets `drop` (and is cleared) once a client sends these bytes.
  answer: tuple[int, str] | None = None  # (HTTP status, message) of the requests answered.
  answer_methods: frozenset[str] | None = None  # Those answered (None: every request).
  link_free: float = 0.0  # When the link has delivered everything queued on it.

  def arrival(self, now: float, size: int) -> float:
    """When `size` bytes the server sends now reach the client, the link shared in order."""
    self.link_free = max(now, self.link_free) + size / self.bandwidth
    return self.link_free

  def response(self) -> bytes:
    """`answer` as an HTTP response, its body as Cloud Storage's JSON API writes errors."""
    status, message = self.answer
    reason = {401: "required", 403: "forbidden"}.get(status, "invalid")
    body = json.dumps({"error": {"code": status, "message": message, "errors": [
        {"message": message, "domain": "global", "reason": reason}]}}).encode()
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: "
            f"application/json; charset=UTF-8\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class _Delayed:
  """Chunks written to `sink` at their due times, in order, then closed if `end` was called;
  `source` (where they come from) paused while more than _HIGH_WATER bytes wait."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop = loop
    self.sink: asyncio.Transport | None = None
    self.source: asyncio.Transport | None = None
    self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
    self.queued, self.timer = 0, None

  def put(self, due: float, data: bytes | None) -> None:
    self.queue.append((due, data))
    self.queued += len(data or b"")
    if self.queued > _HIGH_WATER and self.source is not None:
      self.source.pause_reading()
    if self.timer is None:
      self.flush()

  def flush(self) -> None:
    self.timer = None
    if self.sink is None:
      return
    now = self.loop.time()
    while self.queue and self.queue[0][0] <= now:
      data = self.queue.popleft()[1]
      if data is None:
        self.sink.close()
        return
      self.queued -= len(data)
      self.sink.write(data)
    if self.queued <= _HIGH_WATER and self.source is not None and not self.source.is_closing():
      self.source.resume_reading()
    if self.queue:
      self.timer = self.loop.call_at(self.queue[0][0], self.flush)


class _Upstream(asyncio.Protocol):
  """The connection to the server of one client connection."""

  def __init__(self, client: _Client):
    self.client = client

  def connection_made(self, transport: asyncio.BaseTransport) -> None:
    self.client.to_server.sink = self.client.to_client.source = transport
    self.client.to_server.flush()

  def data_received(self, data: bytes) -> None:
    loop = self.client.loop
    self.client.to_client.put(self.client.proxy.arrival(loop.time(), len(data)), data)

  def connection_lost(self, exc: Exception | None) -> None:
    del exc
    queue = self.client.to_client.queue
    self.client.to_client.put(queue[-1][0] if queue else 0.0, None)


class _Client(asyncio.Protocol):
  """A client's connection: its bytes go to the server late, the server's back at the
  link's pace."""

  def __init__(self, proxy: Proxy):
    self.proxy, self.loop = proxy, asyncio.get_running_loop()
    self.to_server, self.to_client = _Delayed(self.loop), _Delayed(self.loop)
    # With `answer` set: the first request's head, read whole before it is answered or
    # forwarded (with `Connection: close`: one request per connection); then None. While a
    # request is answered: how much of its body is still to read before the answer.
    self.head: bytearray | None = bytearray() if proxy.answer is not None else None
    self.body_left: int | None = None

  def connection_made(self, transport: asyncio.BaseTransport) -> None:
    self.transport = transport
    self.to_server.source = self.to_client.sink = transport
    self.upstream = self.loop.create_task(self.loop.create_connection(
        lambda: _Upstream(self), "127.0.0.1", self.proxy.upstream_port))
    self.upstream.add_done_callback(
        lambda task: task.cancelled() or task.exception() is None or transport.abort())

  def data_received(self, data: bytes) -> None:
    if self.proxy.drop_at is not None and self.proxy.drop_at in data:
      self.proxy.drop, self.proxy.drop_at = True, None
    if self.proxy.drop:
      self.transport.abort()
      if self.to_server.sink is not None:
        self.to_server.sink.abort()
      return
    if self.body_left is not None:
      self._answer_after(len(data))
      return
    if self.head is not None:
      data = self._first_request(data)
    if data:
      self.to_server.put(self.loop.time() + self.proxy.latency_s, data)

  def _first_request(self, data: bytes) -> bytes:
    """What of `data` goes to the server while the first request's head is read: nothing
    until it is whole; then nothing if the request is answered here, else the head with
    `Connection: close` and what follows it."""
    self.head += data
    end = self.head.find(b"\r\n\r\n")
    if end < 0:
      return b""
    head, rest = bytes(self.head[:end + 4]), bytes(self.head[end + 4:])
    self.head = None
    line, *fields = head.decode("latin-1").split("\r\n")
    methods = self.proxy.answer_methods
    if methods is not None and line.split(" ")[0] not in methods:
      return head.replace(b"\r\n", b"\r\nConnection: close\r\n", 1) + rest
    self.body_left = next((int(f.split(":", 1)[1]) for f in fields
                           if f.lower().startswith("content-length:")), 0)
    self._answer_after(len(rest))
    return b""

  def _answer_after(self, size: int) -> None:
    """Counts `size` more bytes of the body read; once all are, answers and closes."""
    self.body_left -= size
    if self.body_left <= 0:
      self.transport.write(self.proxy.response())
      self.transport.close()

  def connection_lost(self, exc: Exception | None) -> None:
    del exc
    self.to_server.put(0.0, None)


async def _serve(proxy: Proxy, started) -> None:
  """Serves on a free port, given to `started(port)`, until cancelled."""
  loop = asyncio.get_running_loop()
  server = await loop.create_server(lambda: _Client(proxy), "127.0.0.1", 0)
  started(server.sockets[0].getsockname()[1])
  async with server:
    await server.serve_forever()


@contextlib.contextmanager
def running(upstream_port: int, *, latency_s: float = 0.0,
            bandwidth: float = float("inf")) -> Iterator[tuple[Proxy, str]]:
  """(the proxy, its http://127.0.0.1:PORT) in a thread of this process, for the block."""
  proxy = Proxy(upstream_port, latency_s, bandwidth)
  loop = asyncio.new_event_loop()
  port: list[int] = []
  ready = threading.Event()
  task = loop.create_task(_serve(proxy, lambda p: (port.append(p), ready.set())))
  thread = threading.Thread(target=loop.run_until_complete,
                            args=(asyncio.gather(task, return_exceptions=True),), daemon=True)
  thread.start()
  try:
    if not ready.wait(10):
      raise RuntimeError("the latency proxy did not start")
    yield proxy, f"http://127.0.0.1:{port[0]}"
  finally:
    loop.call_soon_threadsafe(task.cancel)
    thread.join(10)
    loop.close()


@contextlib.contextmanager
def process(upstream_port: int, *, latency_s: float, bandwidth: float) -> Iterator[str]:
  """The proxy as a process of its own for the block; yields its http://127.0.0.1:PORT."""
  command = [sys.executable, "-m", "tests.latency_proxy", f"--upstream={upstream_port}",
             f"--latency_s={latency_s}", f"--bandwidth={bandwidth}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=root)
  try:
    line = child.stdout.readline()
    if not line.strip().isdigit():
      raise RuntimeError(f"the latency proxy did not start (exit {child.poll()})")
    yield f"http://127.0.0.1:{int(line)}"
  finally:
    storage_server.stop(child)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--upstream", type=int, required=True, help="the server's port")
  parser.add_argument("--latency_s", type=float, default=0.0)
  parser.add_argument("--bandwidth", type=float, default=float("inf"), help="bytes/s")
  args = parser.parse_args()
  proxy = Proxy(args.upstream, args.latency_s, args.bandwidth)
  asyncio.run(_serve(proxy, lambda port: print(port, flush=True)))


if __name__ == "__main__":
  main()
