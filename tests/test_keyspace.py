"""Keys and per-module metadata re-rooted under a prefix, and put back: the edge cases."""

from __future__ import annotations

from ckptmigrate.formats import keyspace


def test_metadata_under_a_prefix_and_back() -> None:
    meta = {
        "": {"version": 1},
        "encoder": {"ckptmigrate.revision": "r1"},
        "encoder.layer": {"version": 2},
        "encoder2": {"version": 3},  # shares the letters, not the module
    }
    inner = keyspace.metadata_under(meta, "encoder.")
    assert inner == {"": {"ckptmigrate.revision": "r1"}, "layer": {"version": 2}}
    assert keyspace.metadata_outside(meta, "encoder.") == {
        "": {"version": 1},
        "encoder2": {"version": 3},
    }
    assert keyspace.metadata_at(inner, "encoder.") == {
        "encoder": {"ckptmigrate.revision": "r1"},
        "encoder.layer": {"version": 2},
    }
    assert keyspace.metadata_under(meta, "") == meta  # the root lineage sees everything


def test_replace_under_leaves_the_rest() -> None:
    meta = {"": {"v": 1}, "m": {"old": 1}, "m.x": {"old": 2}, "mm": {"v": 3}}
    keyspace.replace_under(meta, "m.", {"": {"new": 1}, "y": {"new": 2}})
    assert meta == {"": {"v": 1}, "mm": {"v": 3}, "m": {"new": 1}, "m.y": {"new": 2}}
    keys = {"m.a": 1, "mm.b": 2, "m.c": 3}
    assert keyspace.keys_under(keys, "m.") == {"a": 1, "c": 3}
    assert keyspace.keys_at({"a": 1}, "m.") == {"m.a": 1}
    assert keyspace.normal("model") == "model." and keyspace.normal(None) == ""
