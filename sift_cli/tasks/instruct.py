"""Instruction tuning (task kind `instruct`): Alpaca-style supervised fine-tuning of a causal LM, scored by the
held-out response loss, MMLU, HumanEval and a few saved generations.

Data: rows {instruction, input (optional), output} from JSON files (an array, or JSON lines) or the hub. The
prompt is the template with or without input. As in stanford_alpaca's train.py (`preprocess`), prompt and
response are tokenised together as one text (with the tokenizer's special tokens such as BOS), then EOS,
and the first len(tokenize(prompt)) tokens are labelled -100 (as is padding): only the response carries
loss. Tokenised together, a SentencePiece (LLaMA) tokenizer starts the response without the word-start
marker it would give a text of its own, so the tokens are the reference's. `packing` concatenates examples
into blocks of max_length tokens; an example then attends to the earlier ones in its block, but keeps its
own labels.

Evaluations, one EvalSet each, marked by `run`:
- `heldout` (loss): response loss and perplexity on data.heldout_size held-out rows (also the selection set),
  token-weighted over the set; every process sums over its share of the token-budget batches
  (sift_cli/batching.py), with full-vocabulary logits for response positions only, and the sums are gathered.
- `mmlu_Kshot`, `humaneval`: each process scores its share of the questions or problems with the unwrapped
  model (no collective inside a forward pass), and the answers are gathered to every process (gather_object),
  so every process returns the same metrics.
- `generations`: greedy responses to fixed instructions, on the main process only, appended to
  generations.jsonl in the run directory and logged to W&B as a table.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import string
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import GenerationConfig

from sift_cli.batching import eval_tokens, logit_positions
from sift_cli.data import split_off
from sift_cli.errors import SiftError
from sift_cli.models import load_causal_lm
from sift_cli.results import write_bytes_atomic
from sift_cli.tasks import humaneval, mmlu, register_task_kind
from sift_cli.tasks.base import EvalSet, TaskData, resolve_select_on

log = logging.getLogger("sift_cli")

IGNORE = -100  # label of a token that carries no loss
LOSS_METRICS = ("heldout_loss", "heldout_perplexity")  # lower is better


@dataclass
class InstructEvalSet(EvalSet):
    run: str = "loss"  # what InstructTask.evaluate does with it: loss | mmlu | humaneval | generations


# ---- prompts and tokens -----------------------------------------------------------------------------
def _fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


@dataclass(frozen=True)
class PromptTemplates:
    with_input: str
    without_input: str

    def __post_init__(self):
        for key, template, wanted in (("with_input", self.with_input, {"instruction", "input"}),
                                      ("without_input", self.without_input, {"instruction"})):
            try:
                fields = _fields(template)
            except ValueError as err:
                raise SiftError(f"task.templates.{key}: {err} (write a literal brace as {{{{ or }}}})") from None
            if fields != wanted:
                raise SiftError(f"task.templates.{key} must use exactly the fields "
                                f"{', '.join('{' + f + '}' for f in sorted(wanted))}; it uses {sorted(fields)}")

    def render(self, instruction: str, input_text: str = "") -> str:
        if input_text:
            return self.with_input.format(instruction=instruction, input=input_text)
        return self.without_input.format(instruction=instruction)


def encode_examples(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list[dict | None]:
    """input_ids and labels per example as stanford_alpaca makes them: prompt + response tokenised as one text,
    then EOS (the reference appends the EOS string to the text, which the tokenizer reads as that one special
    token), cut to max_length; labels -100 on the first len(tokenize(prompt)) tokens. None when no response
    token fits."""
    prompt_lengths = [len(ids) for ids in tokenizer(prompts).input_ids]
    whole = tokenizer([prompt + response for prompt, response in zip(prompts, responses)]).input_ids
    encoded = []
    for ids, n_prompt in zip(whole, prompt_lengths):
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        labels = [IGNORE] * min(n_prompt, len(ids)) + ids[n_prompt:]
        encoded.append({"input_ids": ids, "labels": labels} if n_prompt < len(ids) else None)
    return encoded


def pack(examples: list[dict], block: int) -> list[dict]:
    """The examples end to end, cut into blocks of `block` tokens; blocks predicting no label are dropped."""
    ids = list(chain.from_iterable(e["input_ids"] for e in examples))
    labels = list(chain.from_iterable(e["labels"] for e in examples))
    blocks = [{"input_ids": ids[i:i + block], "labels": labels[i:i + block]} for i in range(0, len(ids), block)]
    return [b for b in blocks if any(label != IGNORE for label in b["labels"][1:])]


@dataclass
class CausalCollator:
    """Right-pads a batch; padding gets attention 0 and label -100."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(row["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- reading -----------------------------------------------------------------------------------------
def check_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise SiftError(f"{where}: a row must be an object with instruction, input and output")
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise SiftError(f"{where}: '{key}' must be text, got {row.get(key)!r}")
    input_text = row.get("input")
    if input_text is not None and not isinstance(input_text, str):
        raise SiftError(f"{where}: 'input' must be text or absent, got {input_text!r}")
    return {"instruction": row["instruction"], "input": input_text or "", "output": row["output"]}


def read_instruction_file(path: Path) -> list[dict]:
    """An Alpaca-format file: a JSON array of rows, or JSON lines (.jsonl)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SiftError(f"{path}: not UTF-8 text ({err.reason})") from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(check_row(json.loads(line), f"{path}:{number}"))
                except json.JSONDecodeError as err:
                    raise SiftError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SiftError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise SiftError(f"{path}: expected a JSON array of {{instruction, input, output}} objects")
    return [check_row(row, f"{path} row {i}") for i, row in enumerate(data)]


def read_instructions(task, data_dir: str | None) -> tuple[list[dict], str]:
    """Every row of `task.data_files` (relative to data.dir, or absolute), or of the hub's copy."""
    pattern = Path(task.data_files)
    if not pattern.is_absolute() and data_dir:
        pattern = Path(data_dir) / pattern
    if pattern.is_absolute():
        files = sorted(Path(p) for p in glob.glob(str(pattern)))
        if not files:
            raise SiftError(f"missing data file: no file matches {pattern}")
        rows = [row for path in files for row in read_instruction_file(path)]
        source = ", ".join(map(str, files))
    else:
        source = f"{task.hub_id}:{task.hub_split}"
        try:
            hub_rows = datasets.load_dataset(task.hub_id, split=task.hub_split)
        except Exception as err:  # datasets raises many types for an unreachable hub
            raise SiftError(f"cannot load {source} from the hub ({type(err).__name__}); set data.dir or "
                            f"SIFT_DATA_DIR to a local data root holding {task.data_files}") from None
        rows = [check_row(row, f"{source} row {i}") for i, row in enumerate(hub_rows)]
    if not rows:
        raise SiftError(f"{source}: no rows")
    return rows, source


# ---- evaluation ------------------------------------------------------------------------------------------
def response_loss_sums(model, batch: dict, chunk: int) -> torch.Tensor:
    """The summed loss of a batch's response tokens and their count (float64). The language-model head runs
    only on the positions that predict a response token, `chunk` of them at a time, so the full-vocabulary
    logits of prompts, padding and the whole batch are never made at once."""
    captured = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:  # the decoder's last hidden states; the model's own head computes the last position only
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    finally:
        hook.remove()
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    hidden, targets = captured[0][:, :-1][scored], targets[scored]
    head = model.get_output_embeddings()
    total = torch.zeros((), dtype=torch.float64, device=targets.device)
    for start in range(0, len(targets), chunk):
        logits = head(hidden[start:start + chunk]).float()
        total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum").double()
    return torch.stack([total, scored.sum().double()])


# ---- generation ------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_texts(model, tokenizer, prompt: str, max_new_tokens: int, samples: int = 1, temperature: float = 0.0,
                   top_p: float = 1.0, stop: tuple[str, ...] = ()) -> list[str]:
    """Completions of one prompt: greedy at temperature 0, else sampled; generation ends at a stop string."""
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, num_return_sequences=samples, do_sample=sampling,
        temperature=temperature if sampling else None, top_p=top_p if sampling else None, top_k=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        stop_strings=list(stop) or None,
    )
    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), generation_config=config,
                         tokenizer=tokenizer)
    return tokenizer.batch_decode(out[:, prompt_ids.shape[1]:], skip_special_tokens=True)


# ---- the task kind ---------------------------------------------------------------------------------------
def _positive_int(value, key: str, allow_null: bool = False) -> None:
    if value is None and allow_null:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SiftError(f"{key} must be a positive integer{' or null' if allow_null else ''}, got {value!r}")


@register_task_kind("instruct")
class InstructTask:
    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.task = cfg.task
        self.tokenizer = tokenizer
        self.eval_cfg = self.task.eval
        _positive_int(self.task.max_length, "task.max_length")
        _positive_int(self.eval_cfg.mmlu.max_length, "task.eval.mmlu.max_length")
        _positive_int(self.eval_cfg.mmlu.max_questions_per_subject, "task.eval.mmlu.max_questions_per_subject",
                      allow_null=True)
        _positive_int(self.eval_cfg.humaneval.max_problems, "task.eval.humaneval.max_problems", allow_null=True)
        self.templates = PromptTemplates(self.task.templates.with_input, self.task.templates.without_input)
        self.shots = list(self.eval_cfg.mmlu.shots) if self.eval_cfg.mmlu.enabled else []
        if not all(isinstance(k, int) and 0 <= k for k in self.shots):
            raise SiftError(f"task.eval.mmlu.shots must be non-negative integers, got {self.shots}")
        if self.eval_cfg.mmlu.form not in mmlu.FORMS:
            raise SiftError(f"task.eval.mmlu.form must be one of {', '.join(mmlu.FORMS)}, "
                            f"got {self.eval_cfg.mmlu.form!r}")
        if self.eval_cfg.mmlu.prompt_style not in mmlu.PROMPT_STYLES:
            raise SiftError(f"task.eval.mmlu.prompt_style must be one of {', '.join(mmlu.PROMPT_STYLES)}, "
                            f"got {self.eval_cfg.mmlu.prompt_style!r}")
        self.run_humaneval = humaneval.execution_allowed(self.eval_cfg.humaneval)
        self.collator = CausalCollator(tokenizer.pad_token_id)
        # `auto` is `last`: instruction tuning trains a fixed number of steps, as the SIFT paper does.
        self.select_on = resolve_select_on(
            cfg, "last", ("validation", "heldout", "last"),
            "needs a few-shot dev set; instruction tuning selects on heldout (the held-out response loss), "
            "validation (every test evaluation) or last")
        self._check_main_metric()

    def _check_main_metric(self) -> None:
        produced = set(LOSS_METRICS) | {f"mmlu_{k}shot" for k in self.shots}
        if self.run_humaneval:
            produced |= {f"humaneval_pass@{k}" for k in self.eval_cfg.humaneval.k}
        main = self.main_metric
        if main not in self.task.metrics:
            raise SiftError(f"task.main_metric '{main}' is not among task.metrics")
        if main not in produced:
            raise SiftError(f"task.main_metric '{main}' is not computed with this task.eval; "
                            f"choose from {', '.join(sorted(produced))}")
        if self.select_on == "heldout" and main not in LOSS_METRICS:
            raise SiftError(f"trainer.select_on=heldout scores the held-out loss only; task.main_metric '{main}' "
                            f"needs select_on=validation (every test evaluation) or last")

    @property
    def main_metric(self) -> str:
        return self.task.main_metric

    @property
    def maximize(self) -> bool:
        return self.main_metric not in LOSS_METRICS

    # ---- data -------------------------------------------------------------------------------------------
    def _encode(self, rows: list[dict]) -> tuple[list[dict], int]:
        """Token rows of the examples that keep a response token, and how many did not."""
        prompts = [self.templates.render(r["instruction"], r["input"]) for r in rows]
        encoded = encode_examples(self.tokenizer, prompts, [r["output"] for r in rows], int(self.task.max_length))
        kept = [e for e in encoded if e is not None]
        return kept, len(encoded) - len(kept)

    def load(self) -> TaskData:
        data = self.cfg.data
        rows, source = read_instructions(self.task, data.dir)
        kept, held = split_off(len(rows), int(data.heldout_size), int(data.seed))
        if data.max_train_samples is not None and data.max_train_samples < len(kept):
            kept = np.sort(np.random.RandomState(int(data.seed)).permutation(kept)[: data.max_train_samples])
        train, dropped = self._encode([rows[i] for i in kept])
        heldout, heldout_dropped = self._encode([rows[i] for i in held])
        if not train or not heldout:
            raise SiftError(f"{source}: no example keeps a response token within "
                            f"task.max_length={self.task.max_length}")
        info = {"source": source, "rows": len(rows), "n_train": len(train), "n_select": len(heldout),
                "dropped_too_long": dropped + heldout_dropped, "packing": bool(self.task.packing),
                "select_on": self.select_on, "k_shot": None, "data_seed": data.seed,
                "train_tokens": sum(len(e["input_ids"]) for e in train),
                "train_response_tokens": sum(sum(label != IGNORE for label in e["labels"]) for e in train)}
        if self.task.packing:
            train = pack(train, int(self.task.max_length))
            info["train_blocks"] = len(train)
        heldout_set = InstructEvalSet("heldout", "", self._dataset(heldout), run="loss")
        tests = [heldout_set, *self._mmlu_sets(info)]
        if self.run_humaneval:
            problems = humaneval.read_problems(self.eval_cfg.humaneval.max_problems)
            tests.append(InstructEvalSet("humaneval", "", problems, run="humaneval"))
            info["humaneval_problems"] = len(problems)
        if self.eval_cfg.generations.prompts:
            tests.append(InstructEvalSet("generations", "", list(self.eval_cfg.generations.prompts), run="generations"))
        return TaskData(train=self._dataset(train), select=heldout_set, tests=tests, collator=self.collator, info=info)

    @staticmethod
    def _dataset(examples: list[dict]) -> Dataset:
        return Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples],
                                  "labels": [e["labels"] for e in examples]})

    def _mmlu_sets(self, info: dict) -> list[InstructEvalSet]:
        if not self.shots:
            return []
        mcfg = self.eval_cfg.mmlu
        questions = mmlu.load_questions(mcfg, self.cfg.data.dir, mcfg.split)
        if mcfg.max_questions_per_subject is not None:
            questions = {s: q[: mcfg.max_questions_per_subject] for s, q in questions.items()}
        dev = mmlu.load_questions(mcfg, self.cfg.data.dir, "dev", list(questions)) if max(self.shots) > 0 else {}
        letters = mmlu.letter_continuations(self.tokenizer)
        sets = []
        for k in self.shots:
            encoded = []
            for subject, subject_questions in questions.items():
                shots = dev.get(subject, [])[:k]
                if len(shots) < k:
                    raise SiftError(f"MMLU {k}-shot needs {k} dev examples of {subject}, found {len(shots)}")
                encoded += [mmlu.encode_question(self.tokenizer, q, shots, int(mcfg.max_length), letters, mcfg.form,
                                                 mcfg.prompt_style)
                            for q in subject_questions]
            sets.append(InstructEvalSet(f"mmlu_{k}shot", "", encoded, run="mmlu"))
            info[f"mmlu_{k}shot"] = {"form": mcfg.form, "prompt_style": mcfg.prompt_style, "split": mcfg.split,
                                     "max_questions_per_subject": mcfg.max_questions_per_subject,
                                     "subjects": len(questions), "questions": len(encoded),
                                     "shots_dropped": sum(k - q.shots for q in encoded)}
        return sets

    def load_model(self, mcfg, seed: int):
        return load_causal_lm(mcfg, self.tokenizer, seed)

    # ---- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, run, eval_set: InstructEvalSet) -> dict[str, float]:
        runs = {"loss": self._heldout_loss, "mmlu": self._mmlu, "humaneval": self._humaneval,
                "generations": self._generations}
        model = run.model
        was_training = model.training
        model.eval()
        try:
            return runs[eval_set.run](run, eval_set)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def _heldout_loss(self, run, eval_set: InstructEvalSet) -> dict[str, float]:
        """Mean response-token loss over the whole set (not over batches) and its exponential."""
        model = run.unwrapped_model
        chunk = logit_positions(model.config.vocab_size)
        totals = torch.zeros(2, dtype=torch.float64)
        with run.accelerator.autocast():
            for indices, batch in run.eval_batches(eval_set.dataset, f"eval {eval_set.split}", self.collator):
                if indices:  # not a batch that only evens the processes' counts
                    totals += response_loss_sums(model, batch, chunk).cpu()
        totals = sum(gather_object([totals]))
        loss = float(totals[0] / totals[1])
        return {"heldout_loss": loss, "heldout_perplexity": math.exp(min(loss, 700.0))}

    def _shard(self, run, items: list) -> list[tuple[int, object]]:
        """This process's share of `items`, with their positions."""
        accelerator = run.accelerator
        return list(enumerate(items))[accelerator.process_index::accelerator.num_processes]

    def _mmlu(self, run, eval_set: InstructEvalSet) -> dict[str, float]:
        accelerator = run.accelerator
        shard = self._shard(run, eval_set.dataset)

        def progress(batches):
            return tqdm(batches, desc=f"eval {eval_set.split}", leave=False, disable=not run.show_progress)

        model = run.unwrapped_model
        with accelerator.autocast():
            likelihoods = mmlu.answer_loglikelihoods(
                model, [q for _, q in shard], eval_tokens(run.tcfg, accelerator.device.type), accelerator.device,
                self.tokenizer.pad_token_id, progress, max_rows=run.tcfg.eval_batch_size,
                max_scored=logit_positions(model.config.vocab_size))
        answers = dict(gather_object([(i, mmlu.best_answer(row, q.lengths))
                                      for (i, q), row in zip(shard, likelihoods)]))
        questions = eval_set.dataset
        metrics = mmlu.accuracy_metrics(eval_set.split, [q.subject for q in questions],
                                        [answers[i] == q.answer for i, q in enumerate(questions)])
        log.info("%s: %.4f (over %d questions), %.4f (mean over %d subjects)", eval_set.split,
                 metrics[eval_set.split], len(questions), metrics[f"{eval_set.split}_macro"],
                 len({q.subject for q in questions}))
        return metrics

    def _humaneval(self, run, eval_set: InstructEvalSet) -> dict[str, float]:
        hcfg = self.eval_cfg.humaneval
        model = run.unwrapped_model
        records = []
        with torch.random.fork_rng(), run.accelerator.autocast():
            torch.manual_seed(int(self.cfg.seed) + run.accelerator.process_index)
            for _, problem in tqdm(self._shard(run, eval_set.dataset), desc="eval humaneval", leave=False,
                                   disable=not run.show_progress):
                texts = generate_texts(model, self.tokenizer, problem["prompt"], int(hcfg.max_new_tokens),
                                       int(hcfg.n_samples), float(hcfg.temperature), float(hcfg.top_p),
                                       humaneval.STOP_SEQUENCES)
                completions = [humaneval.truncate(text) for text in texts]
                records += [{"task_id": problem["task_id"], "completion": completion,
                             "passed": humaneval.run_tests(problem, completion, float(hcfg.timeout_s))}
                            for completion in completions]
        records = gather_object(records)
        self._save(run, "humaneval_samples.jsonl", [{"step": run.step, **r} for r in records])
        return humaneval.pass_at_k_metrics(records, list(hcfg.k))

    def _generations(self, run, eval_set: InstructEvalSet) -> dict[str, float]:
        """Greedy responses, for reading; they give no metric."""
        if not run.accelerator.is_main_process:
            return {}
        gcfg = self.eval_cfg.generations
        with run.accelerator.autocast():
            rows = [{"step": run.step, "instruction": instruction,
                     "response": generate_texts(run.unwrapped_model, self.tokenizer,
                                                self.templates.render(instruction), int(gcfg.max_new_tokens))[0]}
                    for instruction in eval_set.dataset]
        self._save(run, "generations.jsonl", rows)
        run.log_table("generations", ["step", "instruction", "response"],
                      [[r["step"], r["instruction"], r["response"]] for r in rows])
        return {}

    @staticmethod
    def _save(run, name: str, records: list[dict]) -> None:
        """Append records to a JSON-lines file in the run directory."""
        if run.run_dir is None or not run.accelerator.is_main_process:
            return
        path = run.run_dir / name
        earlier = path.read_bytes() if path.exists() else b""
        lines = "".join(json.dumps(record) + "\n" for record in records)
        write_bytes_atomic(path, earlier + lines.encode())
