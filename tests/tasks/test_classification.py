"""GLUE tasks load from a local data root in the hub schema: splits, few-shot protocol, row checks."""

import json

import pytest

from sift_cli.config import available_options
from sift_cli.errors import SiftError
from sift_cli.models import load_tokenizer
from sift_cli.tasks import build_task
from tests.conftest import compose_config

GLUE = [t for t in available_options("task") if t.startswith("glue/")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config(["model=tiny-bert"]).model)


def load(tokenizer, overrides):
    cfg = compose_config(overrides)
    return build_task(cfg, tokenizer).load()


@pytest.mark.parametrize("task", GLUE)
def test_each_task_loads_from_fixtures(task, fixture_data, tokenizer):
    cfg = compose_config([f"task={task}", f"data.dir={fixture_data}", "data.k_shot=2"])
    data = build_task(cfg, tokenizer).load()
    classes = 2 if cfg.task.num_labels == 1 else cfg.task.num_labels  # STS-B: scores below 2.5 and the rest
    assert len(data.train) == 2 * classes and len(data.select.dataset) == 2 * classes
    assert [t.split for t in data.tests] == list(cfg.task.eval_splits)
    row = data.train[0]
    assert {"input_ids", "attention_mask", "labels"} <= set(row)
    if cfg.task.num_labels == 1:
        assert row["labels"].dtype.is_floating_point


def test_full_training_set_without_k_shot(fixture_data, tokenizer):
    data = load(tokenizer, ["task=glue/sst2", f"data.dir={fixture_data}", "data.k_shot=null"])
    assert len(data.train) == 20 and data.select is None  # validation selection: no separate split
    held = load(tokenizer, ["task=glue/sst2", f"data.dir={fixture_data}", "data.k_shot=null",
                            "trainer.select_on=heldout", "data.heldout_size=6"])
    assert len(held.train) == 14 and len(held.select.dataset) == 6


def test_max_samples_cap_the_splits(fixture_data, tokenizer):
    data = load(tokenizer, ["task=glue/sst2", f"data.dir={fixture_data}", "data.k_shot=null",
                            "data.max_train_samples=5", "data.max_eval_samples=3"])
    assert len(data.train) == 5 and len(data.tests[0].dataset) == 3


def test_mnli_metrics_carry_the_mismatched_suffix(fixture_data, tokenizer):
    data = load(tokenizer, ["task=glue/mnli", f"data.dir={fixture_data}", "data.k_shot=2"])
    assert [(t.split, t.suffix) for t in data.tests] == [("validation_matched", ""),
                                                         ("validation_mismatched", "_mm")]


def test_missing_train_split_is_one_clear_error(tmp_path, tokenizer):
    (tmp_path / "glue" / "qnli").mkdir(parents=True)
    with pytest.raises(SiftError, match=r"missing data file: .*glue/qnli/train\.jsonl"):
        load(tokenizer, ["task=glue/qnli", f"data.dir={tmp_path}"])


def write_rows(folder, split, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_label_out_of_range_names_the_line(tmp_path, tokenizer):
    rows = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(8)]
    rows[5]["label"] = 7
    write_rows(tmp_path / "glue" / "sst2", "train", rows)
    with pytest.raises(SiftError, match=r"train\.jsonl:6: label 7 out of range"):
        load(tokenizer, ["task=glue/sst2", f"data.dir={tmp_path}"])


def test_missing_text_column_is_named(tmp_path, tokenizer):
    write_rows(tmp_path / "glue" / "mrpc", "train", [{"sentence1": "a", "label": 0}])
    with pytest.raises(SiftError, match="missing column.*sentence2"):
        load(tokenizer, ["task=glue/mrpc", f"data.dir={tmp_path}"])


def test_k_larger_than_a_class_fails_before_any_work(fixture_data, tokenizer):
    with pytest.raises(SiftError, match="k_shot=6 needs 12 rows"):
        load(tokenizer, ["task=glue/sst2", f"data.dir={fixture_data}", "data.k_shot=6"])


def test_real_data_loads_as_the_hub_schema(real_data, tokenizer):
    data = load(tokenizer, ["task=glue/sst2", f"data.dir={real_data}", "data.k_shot=16"])
    assert len(data.train) == 32 and len(data.select.dataset) == 32
    assert data.info["n_eval"] == {"validation": 872}
    stsb = load(tokenizer, ["task=glue/stsb", f"data.dir={real_data}", "data.k_shot=16"])
    assert len(stsb.train) == 32 and len(stsb.select.dataset) == 32  # LM-BFF's two classes, split at 2.5


def test_real_data_without_a_train_split_fails_clearly(real_data, tokenizer):
    with pytest.raises(SiftError, match="glue/mnli/train"):
        load(tokenizer, ["task=glue/mnli", f"data.dir={real_data}"])
