"""Keep third-party chatter off the user's terminal while qgraph calls into the runtimes.

Two kinds of output reach a user who asked for none:

* **C++ log lines.** ExecuTorch's runtime probes the CPU when it first loads a program and
  logs what it could not read (``[cpuinfo_utils.cpp:87] Failed to open midr file ...``).
  C++ writes to file descriptor 2 directly, beneath Python's ``sys.stderr``, so only
  pointing descriptor 2 elsewhere stops it.
* **Known library warnings** about the libraries' own internals, e.g. torch's pytree
  logger telling torchao that registering its ``KernelPreference`` enum is deprecated
  (logged once, when ExecuTorch's lowering first imports torchao), or the ONNX exporter's
  notes on its own translation.

:func:`quiet` filters the known messages (:data:`KNOWN_LOG_NOISE`, :data:`KNOWN_WARNINGS`)
in its block; ``quiet(native_stderr=True)`` also points
descriptor 2 at a private file. When the block raises, what was written there meanwhile is
copied back to the real stderr before the exception travels on, so a failure keeps its
diagnostics; when it succeeds, it is dropped. ``QGRAPH_VERBOSE=1`` in the environment turns
all of this off.

Descriptor 2 belongs to the whole process: while any thread is inside a redirecting block,
every thread's stderr goes to the private file. Nested and concurrent blocks share one
redirection (a counter under a lock): the first to enter redirects, the last to leave
restores. Each redirection costs a few system calls (tens of microseconds where system
calls are slow), so it wraps loading, not every inference call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from typing import IO, Iterator

VERBOSE_ENV = "QGRAPH_VERBOSE"

KNOWN_LOG_NOISE: tuple[tuple[str, str], ...] = (
    # torchao registers KernelPreference (an Enum) as a pytree constant; torch 2.14 logs a
    # deprecation addressed to torchao on the first import (through ExecuTorch's lowering).
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported"),
)
"""``(logger name, message regex)`` of log records :func:`quiet` drops."""

KNOWN_WARNINGS: tuple[dict[str, object], ...] = (
    # the ONNX exporter's remarks on its own translation
    {"module": r"torch\.onnx"},
    {"module": r"onnxscript"},
    {"module": r"onnx_ir"},
    # ExecuTorch's notes on its own API (ExperimentalWarning of the runtime bindings,
    # deprecations inside its lowering)
    {"module": r"executorch"},
    # ExecuTorch reads its schema files with importlib.resources' legacy functions, whose
    # deprecation is attributed to importlib itself
    {"message": r"(read_text|open_text|read_binary|open_binary) is deprecated", "category": DeprecationWarning},
)
"""``warnings.filterwarnings`` arguments of the warnings :func:`quiet` drops: warnings
about a library's internals that a qgraph user cannot act on."""


def verbose() -> bool:
    """True when ``QGRAPH_VERBOSE`` asks to see everything (any value but '', '0')."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextlib.contextmanager
def _known_noise_filtered() -> Iterator[None]:
    filters = [(logging.getLogger(name), _Drop(pattern)) for name, pattern in KNOWN_LOG_NOISE]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for known in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", **known)  # type: ignore[arg-type]
            yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


class _Stderr:
    """The shared redirection of descriptor 2 (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: int | None = None
        self.sink: IO[bytes] | None = None

    def enter(self) -> int:
        """Redirect (if not already) and return the sink's offset at entry."""
        with self.lock:
            if self.depth == 0:
                _flush_python_stderr()
                self.sink = tempfile.TemporaryFile()
                self.saved = os.dup(2)
                os.dup2(self.sink.fileno(), 2)
            self.depth += 1
            assert self.sink is not None
            return os.lseek(self.sink.fileno(), 0, os.SEEK_END)

    def leave(self, start: int, failed: bool) -> None:
        """Copy what was written since ``start`` back to the real stderr when ``failed``;
        restore descriptor 2 and close the sink when the last block leaves."""
        with self.lock:
            _flush_python_stderr()
            assert self.sink is not None and self.saved is not None
            if failed:
                end = os.lseek(self.sink.fileno(), 0, os.SEEK_END)
                os.write(self.saved, os.pread(self.sink.fileno(), end - start, start))
            self.depth -= 1
            if self.depth == 0:
                os.dup2(self.saved, 2)
                os.close(self.saved)
                self.sink.close()
                self.saved, self.sink = None, None


def _flush_python_stderr() -> None:
    with contextlib.suppress(Exception):  # a replaced or closed sys.stderr has nothing to flush
        sys.stderr.flush()


_STDERR = _Stderr()


@contextlib.contextmanager
def quiet(native_stderr: bool = False) -> Iterator[None]:
    """Drop the known log records and warnings in the block; with ``native_stderr=True``, also
    keep what is written to descriptor 2 (C++ log lines) off the terminal unless the block fails.

    Redirecting descriptor 2 hides every write to stderr, Python's own included, so it is for
    calls that are known to print from C++ (loading an ExecuTorch program), not for whole
    exports, where a warning meant for the user may come. Does nothing when
    ``QGRAPH_VERBOSE=1``.
    """
    if verbose():
        yield
        return
    with _known_noise_filtered():
        if not native_stderr or not _has_stderr_fd():
            yield
            return
        start = _STDERR.enter()
        failed = True
        try:
            yield
            failed = False
        finally:
            _STDERR.leave(start, failed)


def _has_stderr_fd() -> bool:
    try:
        os.fstat(2)
    except OSError:
        return False
    return True
