"""Crash safety for PEFT adapter folders: the config and the tensors switch together.

PEFT builds an adapter's modules from ``adapter_config.json`` and then loads
``adapter_model.safetensors`` into them, so a folder holding the new config
beside the old tensors (or the reverse) would load wrongly, without an error.
tests/harness/adapter_crash.py kills ``upgrade`` with SIGKILL at seeded
random moments while it rewrites a 32 MB adapter in place; this test checks
its report: after every kill the folder held exactly the old pair of files
or exactly the new pair, and a later run left no half-built folder behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sigkill_while_rewriting_an_adapter_leaves_the_old_pair_or_the_new(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.harness.adapter_crash", str(tmp_path), "--seed", "20260101"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["changed"] and report["new_config"]["target_modules"] == ["a", "b"]
    assert "fan_in_fan_out" not in report["new_config"]  # unchanged, so not added
    outcomes = report["outcomes"]
    assert outcomes["mixed"] == 0, report
    # the kills spread over the run: some before the switch, some after it
    assert outcomes["old"] >= 3 and outcomes["new"] >= 3, report
    assert report["most_leftovers_after_a_kill"] >= 1, report  # killed while building
    assert report["final_exit"] == 0 and report["final_is_new"], report
    assert report["leftovers_after_final_run"] == [], report
