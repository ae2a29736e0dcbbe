"""Instruction tuning: Alpaca prompts, response-only loss, packing, data errors, selection and end-to-end runs."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sift_cli.errors import SiftError
from sift_cli.models import load_tokenizer
from sift_cli.run import Job
from sift_cli.table import main as sift_table
from sift_cli.tasks import build_task
from sift_cli.tasks.instruct import (IGNORE, CausalCollator, PromptTemplates, encode_examples, pack,
                                     response_loss_sums)
from tests.conftest import accelerate_launch, compose_config, make_job
from tests.tasks.instruct_helpers import ROWS, instruct_overrides, make_data_root

STANFORD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:"
)
STANFORD_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSay hello.\n\n### Response:"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config(["model=tiny-llama"]).model)


@pytest.fixture
def data_root(tmp_path):
    return make_data_root(tmp_path / "data")


def make_task(tokenizer, root, *overrides):
    return build_task(compose_config([*instruct_overrides(root), *overrides]), tokenizer)


def templates():
    t = compose_config(["task=instruct/alpaca"]).task.templates
    return PromptTemplates(t.with_input, t.without_input)


def test_the_templates_are_stanford_alpacas_with_and_without_input():
    assert templates().render("Add the numbers.", "2 and 3") == STANFORD_WITH_INPUT
    assert templates().render("Say hello.") == STANFORD_WITHOUT_INPUT
    assert templates().render("Say {hello}.", "") == STANFORD_WITHOUT_INPUT.replace("Say hello", "Say {hello}")


@pytest.mark.parametrize("with_input, without_input, message", [
    ("{instruction}", "{instruction}", "with_input must use exactly"),
    ("{instruction} {input}", "{instruction} {input}", "without_input must use exactly"),
    ("{instruction} {input} {extra}", "{instruction}", "with_input must use exactly"),
    ("{instruction} {input", "{instruction}", "literal brace"),
])
def test_a_template_with_other_fields_is_refused(with_input, without_input, message):
    with pytest.raises(SiftError, match=message):
        PromptTemplates(with_input, without_input)


def test_only_response_tokens_carry_loss(tokenizer, data_root):
    data = make_task(tokenizer, data_root, "data.heldout_size=2").load()
    by_prompt = {templates().render(r["instruction"], r["input"]): r["output"] for r in ROWS}
    assert len(data.train) == len(ROWS) - 2 and len(data.select.dataset) == 2
    for row in data.train:
        ids, labels = row["input_ids"], row["labels"]
        start = next(i for i, label in enumerate(labels) if label != IGNORE)
        assert all(label == IGNORE for label in labels[:start])
        assert labels[start:] == ids[start:]  # every response token, EOS included, is its own target
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        prompt = tokenizer.decode(ids[1:start])
        assert by_prompt[prompt] == tokenizer.decode(ids[start:-1])
    batch = data.collator([data.train[0], data.train[1]])
    short = int(batch["attention_mask"].sum(1).argmin())
    padding = batch["attention_mask"][short] == 0
    assert padding.any() and (batch["labels"][short][padding] == IGNORE).all()
    assert (batch["input_ids"][short][padding] == tokenizer.pad_token_id).all()


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A LLaMA-like tokenizer trained here: BPE with byte fallback over Metaspace words ("▁" marks a word start,
    added before the text's first word too), BOS added, EOS "</s>"."""
    corpus = [row[key] for row in ROWS for key in ("instruction", "input", "output")] + [STANFORD_WITH_INPUT]
    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    spm.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400,
                                                        special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    spm.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", spm.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def stanford_alpaca_preprocess(tokenizer, sources, targets, max_length):
    """stanford_alpaca train.py's preprocess and _tokenize_fn, step for step (the targets end with the EOS text)."""
    def tokenize(strings):
        tokenized = [tokenizer(text, return_tensors="pt", padding="longest", max_length=max_length, truncation=True)
                     for text in strings]
        return ([t.input_ids[0] for t in tokenized],
                [t.input_ids.ne(tokenizer.pad_token_id).sum().item() for t in tokenized])

    input_ids, _ = tokenize([s + t for s, t in zip(sources, targets)])
    _, source_lens = tokenize(sources)
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, source_lens):
        label[:source_len] = IGNORE
    return [ids.tolist() for ids in input_ids], [label.tolist() for label in labels]


@pytest.mark.parametrize("max_length", [512, 30])
def test_examples_are_tokenised_as_stanford_alpaca_does(sentencepiece_tokenizer, max_length):
    tok = sentencepiece_tokenizer
    prompts = [templates().render(r["instruction"], r["input"]) for r in ROWS]
    outputs = [r["output"] for r in ROWS]
    ids, labels = stanford_alpaca_preprocess(tok, prompts, [o + tok.eos_token for o in outputs], max_length)
    ours = encode_examples(tok, prompts, outputs, max_length)
    for example, expected_ids, expected_labels in zip(ours, ids, labels):
        if all(label == IGNORE for label in expected_labels):  # no response token fits: we drop the example
            assert example is None
        else:
            assert example == {"input_ids": expected_ids, "labels": expected_labels}
    kept = sum(example is not None for example in ours)
    assert kept == len(ROWS) if max_length == 512 else 0 < kept < len(ROWS)  # 30: some cut, some dropped
    if max_length == 512:
        # tokenised apart, every response would start with a word-start piece that the reference never sees
        for example, output in zip(ours, outputs):
            first = next(i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE)
            alone = tok(output, add_special_tokens=False).input_ids[0]
            assert first != alone and tok.convert_ids_to_tokens(alone).startswith("▁")


def test_long_examples_lose_their_response_end_or_are_dropped(tokenizer):
    prompts, responses = ["a" * 10, "b" * 30], ["xyz", "w"]
    first, second = encode_examples(tokenizer, prompts, responses, max_length=13)
    assert first["labels"] == [IGNORE] * 11 + [ord("x"), ord("y")]  # BOS + 10 prompt bytes, then 2 of 4 targets
    assert second is None  # no response token fits


def test_packing_keeps_the_response_only_mask(tokenizer, data_root):
    plain = make_task(tokenizer, data_root).load()
    packed = make_task(tokenizer, data_root, "task.packing=true").load()
    block = 320  # task.max_length of instruct_overrides
    stream = [(i, label) for row in plain.train for i, label in zip(row["input_ids"], row["labels"])]
    cuts = [stream[start:start + block] for start in range(0, len(stream), block)]
    got = [list(zip(row["input_ids"], row["labels"])) for row in packed.train]
    assert got == [cut for cut in cuts if any(label != IGNORE for _, label in cut[1:])]
    assert packed.info["train_blocks"] == len(got) < len(plain.train)
    assert any(row[0][0] != tokenizer.bos_token_id for row in got)  # a block starts inside an example


def test_a_block_without_targets_is_dropped():
    examples = [{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, IGNORE, IGNORE, IGNORE]},
                {"input_ids": [5, 6], "labels": [IGNORE, 6]}]
    assert pack(examples, 2) == [{"input_ids": [5, 6], "labels": [IGNORE, 6]}]


def test_the_collator_pads_on_the_right():
    batch = CausalCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                                            {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_files_may_be_json_lines_and_globs(tokenizer, data_root, tmp_path):
    extra = tmp_path / "more.jsonl"
    extra.write_text("\n".join(json.dumps(r) for r in ROWS[:5]) + "\n\n")
    data = make_task(tokenizer, data_root, f"task.data_files={extra}").load()
    assert data.info["rows"] == 5
    both = make_task(tokenizer, data_root, f"task.data_files={tmp_path}/*/alpaca/*.json").load()
    assert both.info["rows"] == len(ROWS)


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"bad.json row 1: 'output' must be text"),
    ('[{"instruction": "a", "output": "b"},\n oops]', r"bad.json:2: not valid JSON"),
    ('[{"instruction": "a", "input": 3, "output": "b"}]', r"bad.json row 0: 'input' must be text"),
    ('{"instruction": "a", "output": "b"}', r"bad.json: expected a JSON array"),
    ('["text"]', r"bad.json row 0: a row must be an object"),
])
def test_bad_rows_name_the_file_and_row(tokenizer, tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(SiftError, match=message):
        make_task(tokenizer, tmp_path, f"task.data_files={tmp_path / 'bad.json'}").load()


def test_a_bad_json_line_is_named(tokenizer, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(SiftError, match=r"bad.jsonl:2: not valid JSON"):
        make_task(tokenizer, tmp_path, f"task.data_files={tmp_path / 'bad.jsonl'}").load()


def test_a_missing_file_is_one_clear_error(tokenizer, tmp_path):
    with pytest.raises(SiftError, match=r"missing data file: no file matches .*alpaca/\*\.json"):
        make_task(tokenizer, tmp_path).load()


def test_selection_is_last_by_default_and_heldout_scores_the_loss(tokenizer, data_root):
    task = make_task(tokenizer, data_root)
    assert task.select_on == "last" and task.main_metric == "heldout_loss" and task.maximize is False
    assert make_task(tokenizer, data_root, "trainer.select_on=heldout").select_on == "heldout"
    mmlu_main = make_task(tokenizer, data_root, "task.main_metric=mmlu_0shot", "trainer.select_on=validation")
    assert mmlu_main.maximize is True
    with pytest.raises(SiftError, match="select_on=heldout scores the held-out loss only"):
        make_task(tokenizer, data_root, "task.main_metric=mmlu_0shot", "trainer.select_on=heldout")
    with pytest.raises(SiftError, match="select_on=dev needs a few-shot dev set"):
        make_task(tokenizer, data_root, "trainer.select_on=dev")
    with pytest.raises(SiftError, match="'mmlu_5shot' is not computed"):
        make_task(tokenizer, data_root, "task.main_metric=mmlu_5shot", "task.eval.mmlu.shots=[0]")


def test_the_evaluation_sets(tokenizer, data_root):
    data = make_task(tokenizer, data_root).load()
    assert [(t.split, t.run) for t in data.tests] == [
        ("heldout", "loss"), ("mmlu_0shot", "mmlu"), ("mmlu_5shot", "mmlu"), ("generations", "generations")]
    assert data.select is data.tests[0]
    assert data.info["mmlu_5shot"] == {"form": "letter", "prompt_style": "hendrycks", "split": "test",
                                       "max_questions_per_subject": None, "subjects": 2, "questions": 4,
                                       "shots_dropped": 0}
    quiet = make_task(tokenizer, data_root, "task.eval.mmlu.enabled=false", "task.eval.generations.prompts=[]").load()
    assert [t.split for t in quiet.tests] == ["heldout"]


def test_heldout_loss_is_the_mean_over_response_tokens(tmp_path, data_root):
    job = make_job(tmp_path, [*instruct_overrides(data_root), "method=full_ft"])
    trainer, heldout = job.trainer, job.data.select
    metrics = job.task.evaluate(trainer.context, heldout)
    batch = job.data.collator([heldout.dataset[i] for i in range(len(heldout.dataset))])
    with torch.no_grad():
        expected = job.model(**batch).loss.item()  # Hugging Face's mean over the shifted, unmasked labels
    assert metrics["heldout_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["heldout_perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)


def sift_run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "sift_cli.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_lora_and_sift_runs_write_mmlu_and_loss_results(tmp_path, data_root, capsys):
    out = sift_run(tmp_path, "-m", *instruct_overrides(data_root), "method=lora,sift")
    assert out.returncode == 0, out.stderr
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").rglob("results.json"))]
    assert sorted(r["method"] for r in results) == ["lora", "sift"]
    for result in results:
        metrics = result["metrics"]
        assert result["status"] == "completed" and result["task"] == "alpaca" and result["model"] == "tiny-llama"
        assert result["main_metric"] == "heldout_loss" and result["main_score"] == metrics["heldout_loss"] > 0
        assert {"heldout_perplexity", "mmlu_0shot", "mmlu_5shot", "mmlu_0shot_stem", "mmlu_0shot_humanities",
                "mmlu_0shot/abstract_algebra", "mmlu_0shot/philosophy", "mmlu_0shot_macro", "mmlu_5shot_macro"
                } <= set(metrics)
        algebra, philosophy = metrics["mmlu_0shot/abstract_algebra"], metrics["mmlu_0shot/philosophy"]
        assert metrics["mmlu_0shot"] == pytest.approx((3 * algebra + philosophy) / 4)  # per question: 3 and 1
        assert metrics["mmlu_0shot_macro"] == pytest.approx((algebra + philosophy) / 2)
        assert result["data"]["mmlu_0shot"]["prompt_style"] == "hendrycks"
        assert result["selection"]["on"] == "last" and 0 < result["trainable_params"] < result["total_params"]
        generations = (Path(result["run_dir"]) / "generations.jsonl").read_text().splitlines()
        assert len(generations) == 3 and json.loads(generations[0])["step"] == 2
    sift_table([str(tmp_path / "runs"), "--metric", "mmlu_0shot"])
    table = capsys.readouterr().out
    assert "lora" in table and "sift" in table and "alpaca" in table


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path, data_root):
    """Held-out loss (even batches, gathered) and MMLU (sharded questions, gathered) as on one process."""
    args = [*instruct_overrides(data_root), "method=lora", "method.dropout=0", "data.heldout_size=5",
            "trainer.eval_batch_size=2", "task.eval.mmlu.shots=[0]", "task.eval.generations.prompts=[]"]
    results = {}
    for processes in (1, 2):
        cwd = tmp_path / str(processes)
        cwd.mkdir()
        out = subprocess.run([*accelerate_launch(processes), "-m", "sift_cli.run", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
        assert out.returncode == 0, out.stderr[-3000:]
        [path] = list((cwd / "runs").rglob("results.json"))
        results[processes] = json.loads(path.read_text())["metrics"]
    assert results[2] == pytest.approx(results[1], rel=1e-4)
    assert "mmlu_0shot" in results[2] and "heldout_loss" in results[2]


@pytest.mark.parametrize("args, message", [
    (["model=tiny-bert"], "model 'tiny-bert' has model.kind=encoder; instruction tuning needs a causal"),
    (["task.eval.humaneval.enabled=true"], "allow_code_execution=true as well"),
    (["task.eval.mmlu.subjects=[abstract_algebr]"], "unknown MMLU subject 'abstract_algebr'; did you mean"),
])
def test_bad_set_ups_stop_with_one_line(tmp_path, data_root, args, message):
    with pytest.raises(SiftError, match=message) as raised:
        Job(compose_config([*instruct_overrides(data_root), *args]), tmp_path, None).setup()
    assert "\n" not in str(raised.value)


def test_generations_are_saved_and_logged_as_a_wandb_table(tmp_path, data_root):
    import wandb

    logged = []
    job = make_job(tmp_path, [*instruct_overrides(data_root), "method=lora", "task.eval.mmlu.enabled=false",
                              "task.eval.generations.prompts=[Say hi.,Count to three.]"])
    job.trainer.recorder.wandb = type("FakeRun", (), {"log": lambda self, data, step: logged.append((data, step))})()
    [generations] = [t for t in job.data.tests if t.run == "generations"]
    assert job.task.evaluate(job.trainer.context, generations) == {}
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [(r["step"], r["instruction"]) for r in rows] == [(0, "Say hi."), (0, "Count to three.")]
    assert all(isinstance(r["response"], str) for r in rows)
    [(data, step)] = logged
    assert step == 0 and isinstance(data["generations"], wandb.Table) and len(data["generations"].data) == 2


def test_heldout_loss_in_token_batches_and_logit_chunks_is_one_plain_pass(tmp_path, data_root):
    """Token-budget batches, the language-model head on response positions only and in chunks: the loss of
    one plain forward pass over the whole set, with LoRA's adapters in the path."""
    job = make_job(tmp_path, [*instruct_overrides(data_root), "method=lora", "data.heldout_size=6",
                              "trainer.eval_tokens=200", "trainer.eval_batch_size=null"])
    model, heldout = job.trainer.unwrapped_model, job.data.select
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    head_rows, shapes = [], []
    hooks = [model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_rows.append(len(args[0]))),
             model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)]
    metrics = job.task.evaluate(job.trainer.context, heldout)
    for hook in hooks:
        hook.remove()
    batch = job.data.collator([heldout.dataset[i] for i in range(len(heldout.dataset))])
    with torch.no_grad():
        expected = model.eval()(**batch).loss.item()  # Hugging Face's mean over the shifted, unmasked labels
    assert metrics["heldout_loss"] == pytest.approx(expected, rel=1e-5)
    assert len(shapes) > 1 and all(rows * width <= 200 or rows == 1 for rows, width in shapes)
    scored = int((batch["labels"][:, 1:] != IGNORE).sum())
    # the model's own head saw one position per row; ours only the positions that predict a response token
    assert sum(head_rows) == sum(rows for rows, _ in shapes) + scored


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_response_loss_sums_do_not_depend_on_the_chunk(tmp_path, data_root, chunk):
    job = make_job(tmp_path, [*instruct_overrides(data_root), "method=full_ft"])
    batch = job.data.collator([job.data.select.dataset[i] for i in range(len(job.data.select.dataset))])
    model = job.trainer.unwrapped_model.eval()
    with torch.no_grad():
        total, count = response_loss_sums(model, batch, chunk).tolist()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                                 reduction="sum")
    assert count == int((targets != IGNORE).sum()) and total == pytest.approx(expected.item(), rel=1e-5)
