"""Capture-point guesses (file names, pcapng interfaces, multi-interface captures) and manifests."""
from __future__ import annotations

import pytest

from hbonecap.capture.points import Point, guess_point, parse_manifest
from hbonecap.errors import ManifestError


@pytest.mark.parametrize("name, ifaces, role, node", [
    ("node-a-eth0.pcap", [], "node", "node-a"),
    ("ztunnel-b-pistioin.pcap", [], "pistioin", "node-b"),
    ("capture.pcapng", ["istioout"], "istioout", None),
    # tcpdump -i any written as pcapng with one interface per SLL2 index: the host, not one of its devices
    ("ztunnel-a-any.pcapng", ["eth0", "pistioout", "hbl-br0"], "ztunnel", "node-a"),
    ("node-b-any.pcapng", ["eth0", "istioin", "vethztb"], "node", "node-b"),
    ("mystery.pcapng", ["eth0", "pistioin"], "pistioin", None),
    ("pod-a-eth0.pcap", [], "pod", None),
    # two files of one name in different folders are named folder/file: the folder is no hint
    ("concurrent/node-a-eth0.pcap", [], "node", "node-a"),
    ("incident-7\\ztunnel-b-pistioin.pcap", [], "pistioin", "node-b"),
])
def test_guess(name, ifaces, role, node):
    p = guess_point(name, ifaces, set(), set(), set())
    assert (p.role, p.node) == (role, node), p.reason


def test_manifest_toml_and_yaml():
    toml = '[points]\n"a.pcap" = "node@node-a"\n\n[[capture]]\nfile = "b.pcapng"\nrole = "ztunnel"\nnode = "node-b"\n'
    m = parse_manifest(toml, "toml")
    assert m["a.pcap"] == Point("node", "node-a", "manifest")
    assert m["b.pcapng"] == Point("ztunnel", "node-b", "manifest")
    pytest.importorskip("yaml")
    y = parse_manifest("points:\n  a.pcap: pod\ncapture:\n  - {file: b.pcap, role: waypoint}\n", "yaml")
    assert y["a.pcap"].role == "pod" and y["b.pcap"].role == "waypoint"


@pytest.mark.parametrize("text", ['[points]\n"a.pcap" = "router"\n', "[[capture]]\nfile = 'x'\n", "x = [", "other = 1\n"])
def test_manifest_errors(text):
    with pytest.raises(ManifestError):
        parse_manifest(text, "toml")
