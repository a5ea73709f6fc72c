"""Writing and reading vialign's own output files so that a crash or a full disk never leaves them
inconsistent.

- Whole files (PNGs, ``eval.json``, rewritten indexes) are written to a temporary name, synced and
  renamed: a reader sees the old file or the new one, never half of one.
- JSONL indexes (``samples.jsonl``, ``scores.jsonl``, ``metrics.jsonl``) grow one complete line per
  ``write``. A process killed mid-line, or a disk that fills mid-line, leaves at most one unterminated
  last line: :func:`read_jsonl_rows` drops it (that row is redone on resume), and any other line that
  does not parse is reported as damage, naming the line.
- Every write goes through :func:`_write`, so a failing disk raises one :class:`DiskWriteError` naming the
  file, and tests can make the disk "fill up" at any byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from vialign.errors import VialignInputError


class DiskWriteError(VialignInputError):
    """A write that failed (no space left, permission, I/O error); what was written before is intact."""


def _write(handle: IO[bytes], data: bytes) -> None:
    handle.write(data)


def disk_error(path: str | os.PathLike, error: OSError, kept: str) -> DiskWriteError:
    return DiskWriteError(f"could not write {os.fspath(path)}: {error.strerror or error}; {kept}")


def write_atomically(
    path: str | os.PathLike, data: bytes | str, *, kept: str = "nothing was changed"
) -> None:
    """Write ``data`` to ``path`` through a temporary file that is synced and renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            _write(handle, data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise disk_error(path, error, kept) from error
    finally:
        tmp.unlink(missing_ok=True)


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def read_jsonl_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSONL file. An unterminated last line that does not parse is a write that was cut
    short and is dropped; a line that does not parse elsewhere is damage and an error naming it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as error:
        raise VialignInputError(f"cannot read {path}: {error.strerror or error}") from None
    lines = text.split("\n")
    if not _is_object(lines[-1]):
        lines.pop()  # after the last newline: nothing, or a line whose write was cut short
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise VialignInputError(
                f"{path}:{number} is not valid JSON ({error.msg}): the file is damaged; repair or delete that line"
            ) from None
        if not isinstance(row, dict):
            raise VialignInputError(
                f"{path}:{number} is damaged (a JSON {type(row).__name__}, not an object)"
            )
        rows.append(row)
    return rows


class JsonlAppender:
    """Appends one JSON object per line; each line is one write, flushed, so the file always ends with
    complete lines or one cut-short line that :func:`read_jsonl_rows` drops."""

    def __init__(self, path: str | os.PathLike, *, fresh: bool, kept: str):
        self.path = Path(path)
        self.kept = kept
        try:
            if not fresh:
                self._drop_unterminated_tail()
            self.handle = open(self.path, "wb" if fresh else "ab")  # noqa: SIM115 - closed in close()
        except OSError as error:
            raise disk_error(self.path, error, kept) from error

    def _drop_unterminated_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end == len(data):
            return
        if _is_object(data[end:].decode("utf-8", errors="replace")):
            with open(self.path, "ab") as handle:  # a complete row that lacks only its newline
                handle.write(b"\n")
        else:
            with open(self.path, "r+b") as handle:
                handle.truncate(end)

    def write(self, rows: list[dict[str, Any]]) -> None:
        try:
            for row in rows:
                _write(self.handle, (json.dumps(row) + "\n").encode("utf-8"))
            self.handle.flush()
        except OSError as error:
            raise disk_error(self.path, error, self.kept) from error

    def close(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass  # a failed final flush was already reported by write()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
