"""hbonecap: packet-capture forensics for Istio ambient mesh.

Public API::

    import hbonecap
    a = hbonecap.analyze(["captures/*.pcap"], keylog=None)
    a.captures, a.packets, a.connections, a.anomalies

Heavy modules (pandas, numpy) are imported on first use so that the CLI starts quickly.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["analyze", "load", "Analysis", "__version__"]


def __getattr__(name: str):
    if name in ("analyze", "load", "Analysis"):
        from hbonecap import api

        return getattr(api, name)
    raise AttributeError(name)
