"""Exceptions raised by hbonecap.

Three failure levels (see the style notes):

* a file that cannot be read as a capture (or a key log that cannot be opened) raises one of the
  exceptions below, naming the file, and the CLI exits with code 2;
* a bad packet, record, frame or key log line becomes a row in the anomalies table and the run goes on;
* anything else is a bug and propagates.

Exception tree::

    HbonecapError
     +-- CaptureError            a file is not a capture we can read (bad magic, unsupported version, unreadable)
     +-- KeylogError             a key log file cannot be opened or holds no usable line at all
     +-- ManifestError           a capture-point manifest or --point override is malformed
     +-- ProtocolError           a sans-I/O stage met input it cannot interpret (carried as an anomaly, not raised
                                 to the user; the streams stages raise subclasses of it internally)
"""
from __future__ import annotations


class HbonecapError(Exception):
    """Base class of every error hbonecap raises on purpose."""


class CaptureError(HbonecapError):
    """A file cannot be read as a packet capture."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):          # picklable: it travels back from worker processes
        return type(self), (self.path, self.reason)


class KeylogError(HbonecapError):
    """A TLS key log cannot be used at all."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):          # picklable: it travels back from worker processes
        return type(self), (self.path, self.reason)


class ManifestError(HbonecapError):
    """A capture-point assignment is malformed."""


class ProtocolError(HbonecapError):
    """Input that a protocol stage cannot interpret; becomes an anomaly row."""
