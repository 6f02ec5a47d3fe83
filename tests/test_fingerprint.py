"""Behaviour is unchanged: short fixed-seed runs of the three scripts (a first part, then a resumed second part)
reproduce, bit for bit, the fingerprint recorded before a behaviour-keeping change (tests/fingerprint.py says how and
what). tests/fingerprint.json holds one record per machine type; the floats differ between CPU models in their last
bits, so the test compares against this machine's record, fails if the runs differ from it, and skips only where the
file holds no record for this machine (saying how to add one)."""

import json

import pytest

from fingerprint import RUNS, collect, machine, records

RECORD = next((r for r in records() if r["machine"] == machine()), None)


@pytest.mark.parametrize("script", list(RUNS))
def test_runs_reproduce_the_recorded_fingerprint(script, tmp_path):
    if RECORD is None:
        commit = records()[0]["commit"][:7]
        pytest.skip(f"tests/fingerprint.json has no record for {machine()}: add one from commit {commit} as "
                    "tests/fingerprint.py says")
    recorded = RECORD["runs"][script]
    got = json.loads(json.dumps(collect(script, tmp_path)))  # tuples -> lists, as in the record
    assert got["counts"] == recorded["counts"]
    assert got["scalars"] == recorded["scalars"]
    assert got["weights_sha256"] == recorded["weights_sha256"]
    assert recorded["counts"]["n_updates"] > 0 and recorded["counts"]["n_target_syncs"] > 0
    assert len(recorded["scalars"]["charts/episodic_return"]) > 0


def test_every_record_is_of_one_commit_and_a_clean_tree():
    assert records() and len({r["commit"] for r in records()}) == 1 and not any(r["dirty"] for r in records())
