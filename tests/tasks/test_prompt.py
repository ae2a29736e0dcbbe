"""Prompt-based fine-tuning: LM-BFF templates tokenised by hand, the masked-LM head read at the mask as class
logits, clear errors for bad prompts, and a short run of full fine-tuning and grafting on a tiny RoBERTa.

No RoBERTa tokenizer ships offline: the tiny random RoBERTa uses MiniLM's BERT tokenizer, which gives the
ids, the mask token and the pad id that RoBERTa's modelling needs (conf/model/tiny-roberta.yaml)."""

import pytest
import torch
from omegaconf import OmegaConf

from sift_cli.errors import SiftError
from sift_cli.models import load_tokenizer
from sift_cli.run import Job
from sift_cli.tasks import build_task
from sift_cli.tasks.prompt import PromptTemplate
from tests.conftest import FAST, compose_config, make_job

SST2_PROMPT = 'task.prompt={template:"*cls**sent_0*_It_was*mask*.*sep+*",verbalizer:{0:terrible,1:great}}'
PROMPTED = [*FAST, "model=tiny-roberta", SST2_PROMPT]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config(["model=tiny-roberta"]).model)


def template(tokenizer, text: str, words: dict, columns=("sentence",), num_labels: int = 2) -> PromptTemplate:
    return PromptTemplate(OmegaConf.create({"template": text, "verbalizer": words}), tokenizer, num_labels,
                          list(columns))


def test_a_template_is_tokenised_part_by_part(tokenizer):
    t = template(tokenizer, "*cls**sent_0*_It_was*mask*.*sep+*", {0: "terrible", 1: "great"})
    ids = t.encode(("A fine film",), 128)
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert ids == [tokenizer.cls_token_id, *enc("A fine film"), *enc(" It was"), tokenizer.mask_token_id,
                   *enc("."), tokenizer.sep_token_id]
    assert t.label_word_ids == [enc(" terrible")[0], enc(" great")[0]]


def test_sentence_edits_of_pair_templates(tokenizer):
    t = template(tokenizer, "*cls**sent-_0*?*mask*,*+sentl_1**sep+*", {0: "Yes", 1: "Maybe", 2: "No"},
                 columns=("premise", "hypothesis"), num_labels=3)
    ids = t.encode(("It rains.", "Streets are wet"), 128)
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert ids == [tokenizer.cls_token_id, *enc("It rains"), *enc("?"), tokenizer.mask_token_id, *enc(","),
                   *enc(" streets are wet"), tokenizer.sep_token_id]


def test_long_examples_lose_sentence_tokens_and_keep_the_mask(tokenizer):
    t = template(tokenizer, "*cls**sent_0*_It_was*mask*.*sep+*", {0: "terrible", 1: "great"})
    ids = t.encode((" ".join(["word"] * 300),), 20)
    assert len(ids) == 20 and ids.count(tokenizer.mask_token_id) == 1 and ids[-1] == tokenizer.sep_token_id


@pytest.mark.parametrize("text, words, message", [
    ("*cls**sent_0*.*sep+*", {0: "bad", 1: "good"}, "exactly one \\*mask\\*"),
    ("*cls**sent_0**mask**mask*", {0: "bad", 1: "good"}, "exactly one \\*mask\\*"),
    ("*cls**sent_1**mask*", {0: "bad", 1: "good"}, "names text column 1"),
    ("*cls**sent_0**mask*", {0: "bad"}, "one word for each label 0..1"),
    ("*cls**sent_0**mask*", {0: "bad", 1: "supercalifragilistic"}, "must be one token"),
    ("*cls**sent_0**mask*", {0: "good", 1: "good"}, "share a label word"),
])
def test_bad_prompts_are_one_clear_error(tokenizer, text, words, message):
    with pytest.raises(SiftError, match=message):
        template(tokenizer, text, words)


def test_regression_tasks_refuse_a_prompt():
    cfg = compose_config(["task=glue/stsb", "model=tiny-roberta", SST2_PROMPT])
    with pytest.raises(SiftError, match="classification tasks only"):
        build_task(cfg, load_tokenizer(cfg.model))


def test_the_logits_are_the_mlm_scores_of_the_label_words_at_the_mask(tmp_path):
    job = make_job(tmp_path, PROMPTED)
    model = job.trainer.unwrapped_model.eval()
    _, batch = next(iter(job.trainer.eval_batches(job.data.tests[0].dataset, "eval")))
    out = model(**batch)
    full = model.mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows, positions = (batch["input_ids"] == job.task.prompt.mask_token_id).nonzero(as_tuple=True)
    assert rows.tolist() == list(range(len(batch["input_ids"])))  # one mask per example
    expected = full[rows, positions][:, job.task.prompt.label_word_ids]
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.isclose(out.loss, torch.nn.functional.cross_entropy(expected, batch["labels"]), atol=1e-5)


def test_the_pretrained_mlm_head_is_kept_and_the_run_trains(tmp_path):
    job = make_job(tmp_path, PROMPTED)
    names = {n for n, _ in job.trainer.unwrapped_model.named_parameters()}
    assert any(n.startswith("mlm.lm_head.") for n in names) and not any("classifier" in n for n in names)
    results = job.run()
    assert results["status"] == "completed" and {"accuracy", "ece"} <= set(results["metrics"])


def test_grafting_a_prompt_fine_tuned_model(tmp_path):
    cfg = compose_config([*PROMPTED, "method=graft", "method.mask_steps=2", "method.sparsity=0.01",
                          "method.freeze=[embeddings,head]"])
    job = Job(cfg, tmp_path, None)
    job.setup()
    info = job.run()["method_info"]
    assert set(info["mask_entries_per_group"]) == {"layer 0", "layer 1"}
    assert info["models"]["pretrained"] != info["models"]["fine_tuned"]
