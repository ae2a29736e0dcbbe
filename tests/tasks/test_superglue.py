"""SuperGLUE CB and WSC load from a local root in the aps/super_glue schema and train as classification."""

import json

import pytest

from sift_cli.config import available_options
from sift_cli.errors import SiftError
from sift_cli.models import load_tokenizer
from sift_cli.tasks import build_task
from tests.conftest import FAST, compose_config, make_job


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config(["model=tiny-bert"]).model)


def test_the_superglue_tasks_are_offered():
    assert {"superglue/cb", "superglue/copa", "superglue/wsc"} <= set(available_options("task"))


def test_cb_has_three_labels_and_samples_k_per_class(tokenizer):
    cfg = compose_config([*FAST, "task=superglue/cb", "data.k_shot=2"])
    data = build_task(cfg, tokenizer).load()
    assert cfg.task.num_labels == 3 and len(data.train) == 6 and len(data.select.dataset) == 6
    assert len(data.tests[0].dataset) == 9


def test_wsc_pairs_the_text_with_a_query_written_from_the_spans(tokenizer):
    cfg = compose_config([*FAST, "task=superglue/wsc"])
    task = build_task(cfg, tokenizer)
    rows = task._read("validation")
    assert rows["query"] == [f"{r['span2_text']} refers to {r['span1_text']}." for r in rows]
    first = task.load().tests[0].dataset[0]
    decoded = tokenizer.decode(first["input_ids"])
    assert f"{rows[0]['span2_text']} refers to {rows[0]['span1_text']}".lower() in decoded


def test_wsc_without_a_span_column_is_one_clear_error(tmp_path, tokenizer):
    folder = tmp_path / "superglue" / "wsc"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(json.dumps({"text": "She left.", "span2_text": "She", "label": 0}) + "\n")
    cfg = compose_config([*FAST, "task=superglue/wsc", f"data.dir={tmp_path}"])
    with pytest.raises(SiftError, match=r"missing column\(s\) span1_text used by task.query_template"):
        build_task(cfg, tokenizer).load()


@pytest.mark.parametrize("task", ["superglue/cb", "superglue/wsc"])
def test_each_task_trains_a_few_steps(tmp_path, task):
    job = make_job(tmp_path, [*FAST, f"task={task}", "data.k_shot=2"])
    assert 0 <= job.fit()["accuracy"] <= 1


def test_wsc_trains_with_lora(tmp_path):
    job = make_job(tmp_path, [*FAST, "task=superglue/wsc", "data.k_shot=2", "method=lora"])
    job.method.fit(job.trainer.loop)
