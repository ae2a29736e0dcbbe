"""task.extra_eval: more evaluation sets with the task's label space, scored with every test evaluation under
suffixed metric keys; entries from a split, another task folder or a file with its own column names."""

import json

import pytest

from sift_cli.errors import SiftError
from sift_cli.models import load_tokenizer
from sift_cli.tasks import build_task
from tests.conftest import FAST, compose_config, make_job


def load(overrides):
    cfg = compose_config(overrides)
    return build_task(cfg, load_tokenizer(cfg.model)).load()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_extra_sets_are_scored_with_the_tests_under_their_suffix(tmp_path):
    reviews = write_rows(tmp_path / "reviews.jsonl", [{"text": f"review {i}", "stars": i % 2} for i in range(6)])
    entries = (f"[{{name: again, split: validation}}, "
               f"{{name: reviews, path: '{reviews}', text_columns: [text], label_column: stars}}]")
    job = make_job(tmp_path, [*FAST, f"task.extra_eval={entries}"])
    assert [(t.split, t.suffix) for t in job.data.tests] == [("validation", ""), ("again", "_again"),
                                                             ("reviews", "_reviews")]
    assert job.data.info["n_eval"] == {"validation": 8, "again": 8, "reviews": 6}
    metrics = job.trainer.evaluate_tests()
    assert set(metrics) == {f"{key}{suffix}" for key in ("accuracy", "ece", "predicted_class_share")
                            for suffix in ("", "_again", "_reviews")}
    assert metrics["accuracy_again"] == metrics["accuracy"]  # the same rows under another name


def test_matched_against_mismatched_mnli(tmp_path):
    data = load([*FAST, "task=glue/mnli", "~task.eval_splits.validation_mismatched",
                 "task.extra_eval=[{name: mm, split: validation_mismatched}]"])
    assert [(t.split, t.suffix) for t in data.tests] == [("validation_matched", ""), ("mm", "_mm")]


def test_another_task_folder_with_its_own_columns():
    data = load([*FAST, "task.extra_eval=[{name: cola, split: validation, local_dir: glue/cola, "
                        "text_columns: [sentence]}]", "data.max_eval_samples=3"])
    assert len(data.tests[1].dataset) == 3


@pytest.mark.parametrize("entry, message", [
    ("{name: x}", "split or path"),
    ("{name: x, split: validation, path: a.jsonl}", "split or path"),
    ("{name: 'bad name', split: validation}", "letters, digits or _"),
    ("{name: x, split: validation, colour: red}", "split or path"),
    ("{name: validation, split: validation}", "used twice or by an evaluation split"),
    ("{name: x, path: /nowhere/rows.jsonl}", "not a .jsonl, .parquet or .csv file"),
    ("{name: x, split: validation, label_column: stars}", "missing column.*stars"),
    ("{name: x, split: validation, text_columns: [a, b]}", "must name 1 column"),
])
def test_bad_entries_are_one_clear_error(entry, message):
    with pytest.raises(SiftError, match=message):
        load([*FAST, f"task.extra_eval=[{entry}]"])


def test_labels_outside_the_label_space_are_refused(tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", [{"sentence": "s", "label": 5}])
    with pytest.raises(SiftError, match=r"rows\.jsonl:1: label 5 out of range"):
        load([*FAST, f"task.extra_eval=[{{name: x, path: '{rows}'}}]"])


def test_every_glue_task_starts_with_no_extra_sets():
    assert list(compose_config(["task=glue/qnli"]).task.extra_eval) == []
