"""Behaviour is unchanged: short fixed-seed runs of the three scripts (a first part, then a resumed second part)
reproduce, bit for bit, the fingerprint recorded before a behaviour-keeping change (tests/fingerprint.py says how and
what). Elsewhere than on the recording machine the floats may differ in their last bits: skipped there, with the way
to record one there."""

import json

import pytest

from fingerprint import DEFAULT_OUT, RUNS, collect, machine

RECORD = json.loads(DEFAULT_OUT.read_text())


@pytest.mark.parametrize("script", list(RUNS))
def test_runs_reproduce_the_recorded_fingerprint(script, tmp_path):
    if RECORD["machine"] != machine():
        pytest.skip(f"the fingerprint was recorded on {RECORD['machine']}, this is {machine()}: record one here from "
                    f"commit {RECORD['commit'][:7]} as tests/fingerprint.py says")
    recorded = RECORD["runs"][script]
    got = json.loads(json.dumps(collect(script, tmp_path)))  # tuples -> lists, as in the record
    assert got["counts"] == recorded["counts"]
    assert got["scalars"] == recorded["scalars"]
    assert got["weights_sha256"] == recorded["weights_sha256"]
    assert recorded["counts"]["n_updates"] > 0 and recorded["counts"]["n_target_syncs"] > 0
    assert len(recorded["scalars"]["charts/episodic_return"]) > 0
