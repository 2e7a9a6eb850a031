"""The errors a run reports as one line, and the exit code `main.py` gives each
(docs/faults.md). Anything else is a bug, reported with its traceback (exit 1)."""
from __future__ import annotations

import errno
import os
import re

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving; rerun to resume.


class RunError(Exception):
  """A fault of the run's inputs or state, not of the program."""
  exit_code = 2


class ConfigError(RunError, ValueError):
  """A config value (or command-line argument) that is not allowed: the message names the
  field, the value and what is allowed. Raised before any data is loaded."""
  exit_code = 2


class DataError(RunError, ValueError):
  """A data set that is not prepared, or a data file that is missing or malformed."""
  exit_code = 2


class Diverged(RunError):
  """The loss or the gradient norm became non-finite; nothing from that step was saved."""
  exit_code = 3


class WorkdirBusy(RunError):
  """Another training run holds the workdir."""
  exit_code = 4


class ConfigMismatch(RunError):
  """The config builds other parameters than the workdir's checkpoints hold."""
  exit_code = 5


class WeightsMismatch(RunError):
  """Imported weights (a PyTorch state_dict) that do not fit the layout or the config."""
  exit_code = 5


class NoIntactCheckpoint(RunError):
  """No saved step restores, or the one asked for holds non-finite parameters."""
  exit_code = 6


class NoCheckpoint(RunError, FileNotFoundError):
  """Evaluation or analysis of a workdir with nothing trained in it."""
  exit_code = 6


class WorkdirError(RunError, OSError):
  """A workdir (or a file in it) that cannot be read or written: damaged, not writable,
  out of space. The message names the path and what to do."""
  exit_code = 6


def _io_failure(e: OSError) -> WorkdirError:
  where = f" ({e.filename})" if e.filename else ""
  if e.errno == errno.ENOSPC:
    todo = ("free space there and rerun the same command: the run resumes from its last "
            "intact checkpoint")
  elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    todo = "make it writable (or use another --workdir) and rerun the same command"
  else:
    todo = "fix the path or the file and rerun the same command"
  return WorkdirError(f"{e.strerror or e}{where}: {todo}")


def _refusal(e: BaseException) -> tuple[int, str] | None:
  """(401 or 403, why) if `e` is Cloud Storage refusing a request for want of valid
  credentials (401; google-auth finding none, or none that refresh, counts as one) or of
  permission (403), as gcsfs, google-cloud-storage or TensorStore raise it; else None."""
  kind, text = type(e).__module__, str(e)
  code = getattr(e, "code", None)
  if kind == "google.auth.exceptions":
    return 401, f"{type(e).__name__}: {text}"
  if kind.startswith(("gcsfs", "google.api_core")) and code in (401, 403):
    body = re.search(r'"message": "((?:[^"\\]|\\.)*)"', text)  # The JSON error's.
    return int(code), f"HTTP {int(code)}: " + (
        body.group(1) if body else text.removesuffix(f", {int(code)}"))
  if type(e) is OSError and text.startswith("Forbidden: "):  # gcsfs's 403: URL, then why.
    return 403, "HTTP 403: " + text.partition("\n")[2]
  status = re.match(r"(PERMISSION_DENIED|UNAUTHENTICATED): .*? gs://\S+: (.*?)(?: \[|$)",
                    text, re.S)  # TensorStore's.
  if status:
    code = re.search(r"\[http_response_code='(\d+)'\]", text)
    number = int(code.group(1)) if code else 401 if status.group(1) == "UNAUTHENTICATED" else 403
    return number, f"HTTP {number}: {status.group(2)}" if code else status.group(2)
  return None


def storage_refusal(e: BaseException, workdir: object = None) -> WorkdirError | None:
  """Cloud Storage refusing `e` (`_refusal`) as one line naming `workdir` and what to do,
  or None."""
  refusal = _refusal(e)
  if refusal is None:
    return None
  status, why = refusal
  why = " ".join(why.split())
  if status == 401:
    where = f" for {workdir}" if workdir is not None else ""
    return WorkdirError(
        f"Cloud Storage refused the run's credentials{where} ({why}): run `gcloud auth "
        "application-default login` (or point GOOGLE_APPLICATION_CREDENTIALS at a service "
        "account's key), or give the VM a service account, and rerun the same command")
  where = f" to {workdir}" if workdir is not None else ""
  return WorkdirError(
      f"Cloud Storage denied the run access{where} ({why}): grant the account the run uses "
      "Storage Object Admin (roles/storage.objectAdmin) on the bucket, or use another "
      "--workdir, and rerun the same command")


def _connection_failure(e: BaseException) -> str | None:
  """What went wrong if `e` is a connection that failed for good (reset, refused, timed out,
  after the client's own retries), as gcsfs (aiohttp), google-cloud-storage (requests,
  google-api-core's retry) or TensorStore raise it; else None."""
  kind, names, text = type(e).__module__, {c.__name__ for c in type(e).__mro__}, str(e)
  if (isinstance(e, (ConnectionResetError, ConnectionRefusedError, ConnectionAbortedError))
      or (kind.startswith("aiohttp") and "ClientConnectionError" in names)
      or (kind.startswith("requests") and "ConnectionError" in names)
      or (kind.startswith("google.api_core") and "RetryError" in names)):
    return f"{type(e).__name__}: {text}"
  failed = re.match(r"(?:UNAVAILABLE|ABORTED|DEADLINE_EXCEEDED): (.*? gs://\S+: .*?)(?: \[|$)",
                    text, re.S)  # TensorStore's, once out of retries.
  return failed.group(1) if failed and ("retry attempts" in text or "CURL" in text) else None


def as_run_error(e: BaseException, workdir: object = None) -> RunError | None:
  """`e` as the one-line fault it stands for: itself if a RunError; Cloud Storage refusing
  the run's credentials or permissions (`storage_refusal`), a connection failed for good
  (naming `workdir`, the run's, in both), or an I/O failure (an OSError, e.g. a full disk
  under a checkpoint save), anywhere in its cause chain, as a WorkdirError naming the path
  and what to do; None for anything else (a bug: keep its traceback)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, RunError):
      return e
    refused = storage_refusal(e, workdir)
    if refused is not None:
      return refused
    failure = _connection_failure(e)
    if failure:
      where = workdir if workdir is not None else "the storage server"
      return WorkdirError(
          f"the connection to {where} failed ({' '.join(failure.split())}): check the "
          "network, then rerun the same command (a training resumes from its last whole "
          "checkpoint)")
    if isinstance(e, OSError) and e.errno is not None:
      return _io_failure(e)
    code = re.search(r"\[os_error_code='(\d+)'\]", str(e))  # TensorStore's (orbax's) I/O.
    if code:
      path = re.search(r'(?:Failed writing|local file): "([^"]+)"', str(e))
      number = int(code.group(1))
      return _io_failure(OSError(number, os.strerror(number), path and path.group(1)))
    e = e.__cause__ or e.__context__
  return None
