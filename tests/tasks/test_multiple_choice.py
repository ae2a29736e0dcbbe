"""Multiple-choice tasks (COPA): every choice is a (context, choice) pair, logits have one column per choice."""

import json

import pytest
import torch

from sift_cli.errors import SiftError
from sift_cli.models import load_tokenizer
from sift_cli.tasks import build_task
from tests.conftest import FAST, compose_config, make_job

COPA = [*FAST, "task=superglue/copa"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config(["model=tiny-bert"]).model)


def copa_task(tokenizer, overrides=()):
    return build_task(compose_config([*COPA, *overrides]), tokenizer)


def test_copa_loads_k_shot_choices_with_the_question_in_the_context(tokenizer):
    task = copa_task(tokenizer, ["data.k_shot=3"])
    data = task.load()
    assert task.num_labels == 2
    assert len(data.train) == 6 and len(data.select.dataset) == 6  # k train and k dev per right-choice position
    assert [t.split for t in data.tests] == ["validation"] and len(data.tests[0].dataset) == 8
    row = data.train[0]
    assert len(row["input_ids"]) == 2 and row["labels"] in (0, 1)
    text = tokenizer.decode(row["input_ids"][0])
    assert "what was the cause of this?" in text or "what happened as a result?" in text


def test_the_collator_pads_every_choice_of_a_batch_to_one_length(tokenizer):
    data = copa_task(tokenizer).load()
    batch = data.collator([data.train[i] for i in range(3)])
    assert batch["input_ids"].shape[:2] == (3, 2)
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (3,)


@pytest.mark.parametrize("method", ["full_ft", "bitfit", "sift", "adapter"])
def test_copa_trains_and_is_scored_by_accuracy(tmp_path, method):
    job = make_job(tmp_path, [*COPA, f"method={method}"])
    logits, labels = job.trainer.predict(job.data.tests[0])
    assert logits.shape == (8, 2) and labels.shape == (8,)
    metrics = job.fit()
    assert set(metrics) == {"accuracy", "ece", "predicted_class_share"} and 0 <= metrics["accuracy"] <= 1


def test_copa_trains_with_lora(tmp_path):
    job = make_job(tmp_path, [*COPA, "method=lora"])
    job.method.fit(job.trainer.loop)


def write_copa(folder, rows):
    folder.mkdir(parents=True)
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def copa_row(**changes):
    row = {"premise": "The glass fell.", "choice1": "It broke.", "choice2": "It sang.", "question": "effect",
           "label": 0, "idx": 0}
    return {**row, **changes}


@pytest.mark.parametrize("bad, message", [
    ({"question": "reason"}, r"copa/train\.jsonl:3: question 'reason' is not one of cause, effect"),
    ({"label": 2}, r"copa/train\.jsonl:3: label 2 out of range"),
    ({"choice2": None}, r"copa/train\.jsonl:3: column 'choice2' must be text"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, tokenizer, bad, message):
    rows = [copa_row(label=i % 2) for i in range(8)]
    rows[2] = copa_row(**bad)
    write_copa(tmp_path / "superglue" / "copa", rows)
    with pytest.raises(SiftError, match=message):
        copa_task(tokenizer, [f"data.dir={tmp_path}"]).load()


def test_a_missing_choice_column_is_named(tmp_path, tokenizer):
    rows = [{k: v for k, v in copa_row(label=i % 2).items() if k != "choice2"} for i in range(8)]
    write_copa(tmp_path / "superglue" / "copa", rows)
    with pytest.raises(SiftError, match="missing column.*choice2"):
        copa_task(tokenizer, [f"data.dir={tmp_path}"]).load()


def test_a_causal_language_model_is_refused(tokenizer):
    task = build_task(compose_config([*COPA, "model=tiny-llama"]), tokenizer)
    with pytest.raises(SiftError, match="needs an encoder model"):
        task.load_model(compose_config(["model=tiny-llama"]).model, 0)
