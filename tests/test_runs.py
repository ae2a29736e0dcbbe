"""What a job's own directory already holds, when a sweep runs again into it: skip, continue, restart or refuse."""

import json

import pytest

from sift_cli.errors import SiftError
from sift_cli.runs import CHECKPOINT_DIR, CHECKPOINT_FILE, FINGERPRINT_FILE, held_in

THIS, OTHER = "a" * 64, "b" * 64


def run_dir(tmp_path, status=None, results_print=THIS, checkpoint_print=None):
    if status is not None:
        (tmp_path / "results.json").write_text(json.dumps({"status": status, "fingerprint": results_print}))
    if checkpoint_print is not None:
        (tmp_path / CHECKPOINT_DIR).mkdir()
        (tmp_path / CHECKPOINT_DIR / FINGERPRINT_FILE).write_text(checkpoint_print)
        (tmp_path / CHECKPOINT_DIR / CHECKPOINT_FILE).write_bytes(b"state")
    return tmp_path


@pytest.mark.parametrize("status, checkpoint, held", [
    (None, None, None),  # a fresh directory
    ("completed", None, "completed"),
    ("interrupted", THIS, "unfinished"),
    (None, THIS, "unfinished"),  # killed after a checkpoint, before any record
    ("interrupted", None, "restart"),  # stopped before its first checkpoint
])
def test_a_run_of_this_config_is_skipped_continued_or_restarted(tmp_path, status, checkpoint, held):
    assert held_in(run_dir(tmp_path, status, checkpoint_print=checkpoint), THIS) == held


@pytest.mark.parametrize("status, results_print, checkpoint, message", [
    ("completed", OTHER, None, "another run"),
    ("interrupted", OTHER, OTHER, "another run"),
    (None, None, OTHER, "another run"),
    ("failed", THIS, None, "failed run of this config"),
])
def test_another_config_or_a_failed_run_is_never_overwritten(tmp_path, status, results_print, checkpoint, message):
    with pytest.raises(SiftError, match=message):
        held_in(run_dir(tmp_path, status, results_print, checkpoint), THIS)


def test_an_unreadable_record_is_never_overwritten(tmp_path):
    (tmp_path / "results.json").write_text("{half")
    with pytest.raises(SiftError, match="unreadable"):
        held_in(tmp_path, THIS)


def test_a_completed_run_is_known_by_its_recorded_config_when_its_recorded_print_is_stale(tmp_path):
    """A sweep reads config files at each job but its code at the start: a run recorded before the code left
    trainer.train_tokens out of the fingerprint is still this config's run, and a run of another lr is not."""
    from omegaconf import OmegaConf

    from sift_cli.runs import completed_run, fingerprint

    for name, lr in (("old", 1e-4), ("other", 2e-4)):
        (tmp_path / name).mkdir()
        record = {"status": "completed", "fingerprint": "x" * 64,
                  "config": {"trainer": {"lr": lr, "train_tokens": "auto"}, "runs_dir": f"runs/{name}"}}
        (tmp_path / name / "results.json").write_text(json.dumps(record))
    today = fingerprint(OmegaConf.create({"trainer": {"lr": 1e-4}, "runs_dir": "elsewhere"}))
    assert completed_run(tmp_path, today) == tmp_path / "old"
    assert completed_run(tmp_path, fingerprint(OmegaConf.create({"trainer": {"lr": 3e-4}}))) is None
