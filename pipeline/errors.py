"""The exception tree. Lower-level errors (aiohttp, JSON, sqlite, polars) are translated into
these in exactly one place each, so the CLI can map every one to a message and an exit code.

    PipelineError
    ├── UserError                 exit 1: the job could not run; nothing was sent
    │   ├── ConfigError           a config key or flag is wrong (names the key and what is valid)
    │   ├── InputError            an input file, column or row is wrong
    │   └── JournalError          the journal belongs to another job, is locked, or is damaged
    ├── RequestError              one request failed (never leaves the answer layer, attempt.py)
    │   ├── RetryableError        408, 429, 5xx, timeouts, dropped connections, bad bodies
    │   └── PermanentError        400, 403, 404, 413, 422: this row fails
    ├── JobStopped                exit 4: every further request would fail too; resumable
    │   ├── AuthError             401: the key is missing, wrong or disabled
    │   ├── CreditsError          402: out of credits
    │   ├── BudgetReached         a cap in [cost] would be passed (pipeline.budget)
    │   ├── TrustError            the endpoint's TLS certificate does not verify
    │   ├── DiskFull              the journal or the output cannot be written (full disk, quota)
    │   └── Unreachable           the endpoint cannot be reached, or stopped answering
    ├── NotSent                   the run is stopping: a row's next request is not sent
    ├── Locked                    exit 5: another run holds the job's lock; nothing was touched
    └── Interrupted               exit 130 / 143: SIGINT / SIGTERM, journal flushed; resumable
"""

from __future__ import annotations

import errno
import os
from enum import StrEnum
from typing import Any


class PipelineError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class UserError(PipelineError):
    """Something the user can fix; the job did not start sending."""

    exit_code = 1


class ConfigError(UserError):
    """A configuration key or command-line flag is invalid."""


class InputError(UserError):
    """An input file, column or value cannot be used."""


class JournalError(UserError):
    """The journal cannot be used for this job as it stands."""


class Kind:
    """The `error_type` of a failed row: short, stable names that scripts filter on."""

    INPUT = "input"  # the row cannot be sent (a null prompt, bad messages JSON)
    TIMEOUT = "timeout"
    CONNECTION_FAILED = "connection_failed"
    CONNECTION_DROPPED = "connection_dropped"
    CONNECTION_ERROR = "connection_error"
    INVALID_JSON = "invalid_json"
    ERROR_BODY = "error_body"  # an HTTP 200 whose body is an error
    NO_CHOICES = "no_choices"
    CHOICE_ERROR = "choice_error"
    EMPTY = "empty"
    LENGTH = "length"  # cut off by max_tokens with no usable answer
    INVALID_ANSWER = "invalid_answer"  # outside the labels / schema after every re-ask
    ABANDONED = "abandoned"  # in flight when a stop's grace ran out: perhaps billed
    HTTP_429 = "http_429"

    @staticmethod
    def http(status: int) -> str:
        return f"http_{status}"


class Throttle(StrEnum):
    """Whose limit a 429 is (`client.throttled_by`): the key's, which every request of the job
    runs into until the reset, or one upstream provider's (or nobody says), which concerns the
    request it refused."""

    KEY = "key"
    UPSTREAM = "upstream"
    UNKNOWN = "unknown"


class RequestError(PipelineError):
    """One request failed. `kind` is a short stable name recorded in the `error_type` column;
    `throttle`, for a 429, whose limit it was."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        generation_id: str | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.generation_id = generation_id
        self.throttle = throttle


class RetryableError(RequestError):
    """Worth another attempt after a back-off."""


class PermanentError(RequestError):
    """Fails the same way every time: the row is recorded as an error."""


class JobStopped(PipelineError):
    """A job-wide failure: dispatching stops at once and the journal is kept for a resume.

    `results`: what the row being answered had already been paid for (answers turned down
    before the stop), to be journaled all the same."""

    exit_code = 4
    results: tuple[Any, ...] = ()


class NotSent(PipelineError):
    """The run began to stop before this row's next request was sent: nothing more is sent
    for it now (the next run does); `results` as for `JobStopped`."""

    results: tuple[Any, ...] = ()


class AuthError(JobStopped):
    """401: the API key is missing, unknown or disabled."""


class CreditsError(JobStopped):
    """402: the account or key is out of credits."""


class TrustError(JobStopped):
    """The endpoint's TLS certificate failed verification (which cannot be switched off)."""


class DiskFull(JobStopped):
    """The journal or the output could not be written: a full disk, a quota, a file size
    limit. What was committed stays; the next run, once there is room, resumes."""


# errno values of a write that found no room: no space, a quota, a file size limit (ulimit -f).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_disk_full(exc: BaseException) -> bool:
    """Whether a failed write (an OSError, or sqlite3's) found no room. SQLite says SQLITE_FULL
    for ENOSPC, but a plain write error (SQLITE_IOERR_WRITE, "disk I/O error") for EFBIG and
    EDQUOT."""
    name = getattr(exc, "sqlite_errorname", None)
    if name is not None:
        return bool(name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR"))
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_message(what: str, path: object, exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        detail = os.strerror(exc.errno)  # pyarrow's own wording is long
    else:
        detail = str(exc).strip().splitlines()[0]
    return f"cannot write {what} {path}: the disk is full, or a quota or file size limit is reached ({detail})"


class Unreachable(JobStopped):
    """The endpoint answers no request: connecting fails (refused, DNS, TLS), or every
    request since some point failed before any response came back. `cause` is the reason
    alone ("connection refused"); `connected`, whether a connection was made at all."""

    def __init__(self, message: str, cause: str, *, connected: bool) -> None:
        super().__init__(message)
        self.cause = cause
        self.connected = connected


class Locked(PipelineError):
    """Another run of the same job holds its lock."""

    exit_code = 5


class OutOfTime(PipelineError):
    """`--max-runtime` ran out: dispatching stopped in time to drain and flush; the next run
    resumes. Its own exit code, so a scheduler can tell "not finished yet" from a failure."""

    exit_code = 6


class BatchesPending(PipelineError):
    """Batch mode with `--no-wait`: batches were submitted (or are still running) and their
    results are not in yet; the next run collects them. Exit 7, so a cron job can tell "come
    back later" from a failure."""

    exit_code = 7


class Interrupted(PipelineError):
    """SIGINT or SIGTERM: the journal was flushed; the next run resumes. Exit 128 + signal."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        super().__init__(message or f"interrupted by signal {signum}")
        self.exit_code = 128 + signum


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt wherever the program is (outside a run,
    whose own handler stops it gracefully), so every phase exits 143 and cleans up alike."""

    exit_code = 143
