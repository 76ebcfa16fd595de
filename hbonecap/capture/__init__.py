"""Reading capture files (the only packet I/O): pcap, pcapng, gzip."""
from hbonecap.capture.reader import CaptureInfo, CaptureReader, read_secrets

__all__ = ["CaptureInfo", "CaptureReader", "read_secrets"]
