"""Capture-point identity: which role a capture plays in the mesh data path and which node it belongs to.

The guess uses, in order: an explicit assignment (CLI `--point`, API `points=`), the file name
(`node-a-eth0.pcap`, `ztunnel-a-pistioout.pcapng`, `pod-b-eth0.pcap`), pcapng interface names, and traffic
signatures (Geneve VNI 1000/1001, the 192.168.126.0/30 and 192.168.127.0/30 tunnel addresses, port 15008).
Every guess carries its reason. With a Kubernetes inventory (`--k8s`), `hbonecap.k8s.placement` then places the
captures without an explicit point from their addresses (node, pod).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("pod", "node", "istioout", "istioin", "pistioout", "pistioin", "ztunnel", "waypoint", "loopback", "unknown")
# Device names first: they are more specific than the host kind.
DEVICE_ROLES = (("pistioout", "pistioout"), ("pistioin", "pistioin"), ("istioout", "istioout"),
                ("istioin", "istioin"))
HOST_ROLES = (("waypoint", "waypoint"), ("ztunnel", "ztunnel"), ("pod", "pod"), ("node", "node"),
              ("worker", "node"), ("control-plane", "node"))
HOST_RE = re.compile(r"(?:^|[-_.])(node|ztunnel|pod|waypoint|worker)[-_]?([a-z0-9]+)(?=[-_.]|$)")


@dataclass(frozen=True)
class Point:
    role: str
    node: str | None
    reason: str


def parse_point(spec: str) -> tuple[str, Point]:
    """`FILE=ROLE[@NODE]` as given on the command line."""
    from hbonecap.errors import ManifestError

    if "=" not in spec:
        raise ManifestError(f"--point {spec!r}: expected FILE=ROLE[@NODE]")
    name, _, rhs = spec.rpartition("=")
    role, _, node = rhs.partition("@")
    role = role.strip().lower()
    if role not in ROLES:
        raise ManifestError(f"--point {spec!r}: role must be one of {', '.join(ROLES)}")
    return name.strip(), Point(role, node.strip() or None, "given")


def guess_point(name: str, interfaces: list[str], vnis: set[int], addresses: set[str], ports: set[int]) -> Point:
    low = re.split(r"[/\\]", name)[-1].lower()     # a folder prefix (two files of one name) is not a hint
    stem = re.sub(r"\.(pcapng|pcap|cap)(\d*)(\.gz)?$", "", low)
    tokens = re.split(r"[-_.]", stem)
    node = None
    m = HOST_RE.search(stem)
    if m:
        node = f"{m.group(1) if m.group(1) != 'worker' else 'node'}-{m.group(2)}"
        if m.group(1) == "node":
            node = f"node-{m.group(2)}"
    for key, role in DEVICE_ROLES:
        if key in tokens or stem.endswith(key):
            return Point(role, _node_of(node), f"file name contains '{key}'")
    # A capture on one Geneve device takes its role; a capture on several interfaces ("any", SLL2 with one
    # pcapng interface per index) is the host's, so the file name's host kind comes first.
    named = [i for i in interfaces if i]
    if len(set(i.lower() for i in named)) == 1:
        il = named[0].lower()
        for key, role in DEVICE_ROLES:
            if il == key:
                return Point(role, _node_of(node), f"pcapng interface '{named[0]}'")
    if tokens and tokens[-1] in ("lo", "loopback") or any(i.lower() == "lo" for i in interfaces):
        return Point("loopback", _node_of(node), "loopback interface")
    for key, role in HOST_ROLES:
        if key in tokens:
            why = f"file name contains '{key}'"
            if len(set(i.lower() for i in named)) > 1:
                why += f" (capture on {len(set(named))} interfaces: {', '.join(sorted(set(named)))})"
            return Point(role, _node_of(node), why)
    for iface in named:
        for key, role in DEVICE_ROLES:
            if iface.lower() == key:
                return Point(role, _node_of(node), f"pcapng interface '{iface}' (one of {len(set(named))})")
    if vnis & {1000, 1001}:
        return Point("node", None, f"Geneve VNI {sorted(vnis & {1000, 1001})} seen")
    if 15008 in ports:
        return Point("node", None, "HBONE port 15008 seen")
    return Point("unknown", _node_of(node), "no name, interface or traffic hint")


def _node_of(node: str | None) -> str | None:
    """The node a host token names: `node-a` itself, and `ztunnel-a` (one ztunnel per node) lives on node-a.
    A pod's or waypoint's node is not in its name; correlation places it from the traffic."""
    if node is None:
        return None
    kind, _, rest = node.partition("-")
    return f"node-{rest}" if kind in ("node", "ztunnel") and rest else None


def parse_manifest(text: str, fmt: str = "toml") -> dict[str, Point]:
    """Capture-point assignments from a small manifest, TOML or YAML, in either of two shapes:

    ```toml
    [points]                                  # FILE = "ROLE[@NODE]"
    "node-a-eth0.pcap" = "node@node-a"

    [[capture]]                               # or one table per capture
    file = "mystery.pcapng"
    role = "ztunnel"
    node = "node-b"
    ```
    YAML: the same keys (`points:` mapping, or `capture:` list). Returns {file name: Point}.
    """
    from hbonecap.errors import ManifestError

    fmt = fmt.lower().lstrip(".")
    try:
        if fmt == "toml":
            import tomllib

            data = tomllib.loads(text)
        elif fmt in ("yaml", "yml"):
            try:
                import yaml
            except ImportError as e:
                raise ManifestError("YAML manifests need PyYAML (pip install pyyaml); TOML works without it") from e
            data = yaml.safe_load(text) or {}
        else:
            raise ManifestError(f"manifest format {fmt!r}: expected toml or yaml")
    except ManifestError:
        raise
    except Exception as e:   # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ManifestError(f"manifest is not valid {fmt}: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError("manifest: expected a table/mapping at the top level")
    out: dict[str, Point] = {}
    for name, spec in (data.get("points") or {}).items():
        if not isinstance(spec, str):
            raise ManifestError(f"manifest points.{name}: expected 'ROLE[@NODE]'")
        file, pt = parse_point(f"{name}={spec}")
        out[file] = Point(pt.role, pt.node, "manifest")
    for i, entry in enumerate(data.get("capture") or []):
        if not isinstance(entry, dict) or "file" not in entry or "role" not in entry:
            raise ManifestError(f"manifest capture #{i + 1}: needs 'file' and 'role'")
        spec = f"{entry['file']}={entry['role']}" + (f"@{entry['node']}" if entry.get("node") else "")
        file, pt = parse_point(spec)
        out[file] = Point(pt.role, pt.node, "manifest")
    unknown = set(data) - {"points", "capture"}
    if unknown:
        raise ManifestError(f"manifest: unknown keys {sorted(unknown)} (expected 'points' or 'capture')")
    return out


def load_manifest(path) -> dict[str, Point]:
    """`parse_manifest` on a file; the format follows the suffix (.toml, .yaml, .yml)."""
    from pathlib import Path

    p = Path(path)
    return parse_manifest(p.read_text(encoding="utf-8"), p.suffix or "toml")
