"""The workdir lease (lock.json): taken over at once from a dead process on this host or once
expired, refused while its holder renews it, lost by a holder that stalled past its timeout,
and won by exactly one of several runs racing for it, on a disk and in a bucket."""
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from etils import epath

from jaxdefense import errors
from jaxdefense.workdir import lock


def _write_lease(path, *, host: str, pid: int, age_s: float, timeout_s: float) -> None:
  renewed = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=age_s)
  path.write_text(json.dumps({"host": host, "pid": pid, "started": "earlier",
                              "timeout_s": timeout_s, "token": "theirs",
                              "renewed": renewed.isoformat()}))


def _as_host(monkeypatch, host: str) -> None:
  monkeypatch.setattr(socket, "gethostname", lambda: host)


def test_a_lease_left_by_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write_lease(tmp_path / "lock.json", host=socket.gethostname(), pid=dead.pid, age_s=0,
               timeout_s=300)
  start = time.monotonic()
  with lock.Lease(tmp_path, 300) as lease:
    assert time.monotonic() - start < 1
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == lease.holder["token"]
  assert f"the lease of process {dead.pid} on host {socket.gethostname()} (started earlier): " \
         "that process is gone" in capsys.readouterr().out
  assert not (tmp_path / "lock.json").exists()


def test_an_expired_lease_is_taken_over_in_one_line(tmp_path, capsys):
  _write_lease(tmp_path / "lock.json", host="elsewhere", pid=1, age_s=60, timeout_s=5)
  with lock.Lease(tmp_path, 300) as lease:
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == lease.holder["token"]
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1 and out[0].startswith(
      f"taking over {tmp_path / 'lock.json'}: the lease of process 1 on host elsewhere (started "
      "earlier) was last renewed 60."), out
  assert out[0].endswith(" s ago (timeout 5 s)"), out


def test_a_renewed_lease_on_another_host_refuses_in_one_line(tmp_path, monkeypatch, capsys):
  """Host a renews every 0.25 s (timeout 1 s); host b watches, sees a renewal and refuses,
  leaving a's lease in place."""
  _as_host(monkeypatch, "a")
  holder = lock.Lease(tmp_path, 1).acquire()
  try:
    _as_host(monkeypatch, "b")
    start = time.monotonic()
    with pytest.raises(errors.WorkdirBusy) as refused:
      lock.Lease(tmp_path, 1).acquire()
    assert time.monotonic() - start < 1  # Before the lease could have expired.
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        f"workdir {tmp_path} is in use by a training run on host a, process {os.getpid()}"), message
    assert "while this run waited); wait for it to end or use another --workdir" in message
    assert "waiting up to" in capsys.readouterr().out
    holder.renew()  # Still a's.
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == holder.holder["token"]
  finally:
    holder.release()
  assert not (tmp_path / "lock.json").exists()


def test_a_holder_that_stalls_past_its_timeout_loses_the_lease(tmp_path, monkeypatch, capsys):
  """Host a stops renewing (a stalled or cut-off process); host b, started at once, waits
  for the lease to expire and takes it over; a's next renewal (its next checkpoint save)
  stops it in one line, and its release leaves b's lease in place."""
  _as_host(monkeypatch, "a")
  with monkeypatch.context() as stalled:
    stalled.setattr(lock.Lease, "_renew_periodically", lambda self: None)
    holder = lock.Lease(tmp_path, 1).acquire()
  _as_host(monkeypatch, "b")
  start = time.monotonic()
  taker = lock.Lease(tmp_path, 1).acquire()
  try:
    assert 0.5 < time.monotonic() - start < 5
    assert "on host a (started" in capsys.readouterr().out
    with pytest.raises(errors.WorkdirBusy, match=rf"^this run stops: a training run on host b, "
                       rf"process {os.getpid()} .* took over .*lock.json, which this run had "
                       r"not renewed within 1 s"):
      holder.renew()
    holder.release()
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == taker.holder["token"]
  finally:
    taker.release()


def test_a_damaged_lease_is_one_line_naming_it(tmp_path):
  (tmp_path / "lock.json").write_text(json.dumps({"host": "elsewhere", "pids": 1}))
  with pytest.raises(errors.WorkdirBusy, match=r"lock.json is damaged \(KeyError: 'renewed'\), "
                     r"so its holder is unknown; if no training runs on .*, delete .*lock.json"):
    lock.Lease(tmp_path, 300).acquire()


def test_a_lock_of_the_earlier_version_keeps_its_rules(tmp_path, capsys):
  """lock.json as jaxdefense wrote it before leases (host, pid, started; never renewed):
  taken over at once from a dead process on this host, refused in one line from another
  host (it can never expire: delete it if that run is gone)."""
  (tmp_path / "lock.json").write_text(json.dumps({"host": "elsewhere", "pid": 1,
                                                  "started": "2026-12-01T10:00:00"}))
  with pytest.raises(errors.WorkdirBusy, match=r"held by .*lock.json of an earlier jaxdefense "
                     r"\(a lock without a lease\) for process 1 on host elsewhere; if that run "
                     r"is gone, delete .*lock.json and run again"):
    lock.Lease(tmp_path, 300).acquire()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                  "started": "2026-12-01T10:00:00"}))
  with lock.Lease(tmp_path, 300):
    assert "that process is gone" in capsys.readouterr().out


def _race(workdir, racers: int = 4) -> tuple[list[lock.Lease], list[str]]:
  """`racers` threads acquire the lease on `workdir`, each having read the lease as it was
  before any of them writes; the leases won and the errors of the others."""
  barrier = threading.Barrier(racers)
  local = threading.local()
  won, refused = [], []

  def take():
    try:
      won.append(lock.Lease(workdir, 300).acquire())
    except errors.WorkdirBusy as e:
      refused.append(str(e))
  with pytest.MonkeyPatch.context() as patch:
    for store in (lock._Disk, lock._Bucket):
      def read_then_wait(self, read=store.read):
        seen = read(self)
        if not getattr(local, "waited", False):
          local.waited = True
          barrier.wait(timeout=60)
        return seen
      patch.setattr(store, "read", read_then_wait)
    threads = [threading.Thread(target=take) for _ in range(racers)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=120)
  assert len(won) + len(refused) == racers, (won, refused)
  return won, refused


@pytest.mark.parametrize("start", ["no lease", "an expired lease"])
@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_racing_runs_one_wins(request, tmp_path, where, start):
  """On a disk, and in a bucket: fake-gcs-server (tests/conftest.py), which honours generation
  preconditions on uploads as Cloud Storage does."""
  workdir = tmp_path
  if where == "bucket":
    pytest.importorskip("google.cloud.storage")
    workdir = epath.Path(request.getfixturevalue("gcs_bucket"))
  if start != "no lease":
    _write_lease(workdir / "lock.json", host="elsewhere", pid=1, age_s=60, timeout_s=5)
  won, refused = _race(workdir)
  assert len(won) == 1, refused
  assert all("in use by a training run on host" in r for r in refused), refused
  assert json.loads((workdir / "lock.json").read_text())["token"] == won[0].holder["token"]
  won[0].release()
  assert not (workdir / "lock.json").exists()
