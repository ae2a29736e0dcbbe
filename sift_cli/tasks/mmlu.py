"""MMLU (Hendrycks et al., ICLR 2021): 57 subjects of four-choice questions, answered by comparing the
log-likelihoods the model gives the possible answers after a prompt, in one of two forms.

`letter` (the default, the published number) shows the question, its choices "A. ..." and "Answer:"; the
model's answer is the letter whose continuation " X" is most likely. `cloze` (lm-evaluation-harness's
`mmlu_continuation`) shows no choices: "Question: ...\nAnswer:" is followed by each choice's own text, and
the answer is the choice with the highest log-likelihood per character of the choice (lm-eval's acc_norm,
which divides by len(choice), the space before it not counted). Models too small to have learnt the letter
format answer it with one letter whatever the question; the cloze form still tells them apart. A few-shot
prompt (the first k dev examples) longer than `max_length` tokens drops examples from the end until it fits,
as the original does.

The prompt's whitespace follows one of two references (`prompt_style`): `hendrycks`, the original harness
(github.com/hendrycks/test, evaluate.py), quirks included: the question as written, and two spaces after
"about" in the header; `lm_eval`, lm-evaluation-harness's templates: the question stripped, one space.
Not reproduced: the original reads the CSVs with pandas, which turns a choice written "None" into "nan"
(10 of the 14,042 test questions); here every field is the file's text.

Accuracy is reported as both references report it, over all questions (the headline `NAME`; hendrycks'
"Average accuracy", lm-eval's group score with weight_by_size), and per category (the original's four:
STEM, humanities, social sciences, other) over the category's questions; also per subject and as the mean
over subjects (`NAME_macro`).
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F

from sift_cli.batching import token_batches
from sift_cli.errors import SiftError

LETTERS = ("A", "B", "C", "D")
FORMS = ("letter", "cloze")
PROMPT_STYLES = ("hendrycks", "lm_eval")
HUB_SPLITS = {"dev": "dev", "val": "validation", "test": "test"}
CATEGORIES = ("stem", "humanities", "social_sciences", "other")

# Each subject's category, from the original's subcategories and categories (categories.py).
SUBJECT_CATEGORY = {
    "abstract_algebra": "stem", "anatomy": "other", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}


@dataclass(frozen=True)
class Question:
    subject: str
    text: str
    choices: tuple[str, ...]  # the four choices, A to D
    answer: int  # index into LETTERS


@dataclass(frozen=True)
class EncodedQuestion:
    """A question as token ids: the prompt, and the continuation of each possible answer."""

    subject: str
    answer: int
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    shots: int  # solved examples the prompt kept
    lengths: tuple[int, ...] = (1, 1, 1, 1)  # what each answer's log-likelihood is divided by before comparing


# ---- reading ---------------------------------------------------------------------------------------
def check_subject(subject: str, where: str) -> None:
    if subject not in SUBJECT_CATEGORY:
        close = difflib.get_close_matches(subject, SUBJECT_CATEGORY, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; the 57 subjects are listed in sift_cli/tasks/mmlu.py"
        raise SiftError(f"{where}: unknown MMLU subject '{subject}'{hint}")


def read_csv(path: Path, subject: str) -> list[Question]:
    """One subject's questions in the original layout: no header; question, A, B, C, D, answer letter."""
    questions = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) != 6:
                    raise SiftError(f"{where}: expected 6 fields (question, A, B, C, D, answer letter), got {len(row)}")
                if row[5].strip() not in LETTERS:
                    raise SiftError(f"{where}: the answer must be one of A, B, C, D, got {row[5]!r}")
                questions.append(Question(subject, row[0], tuple(row[1:5]), LETTERS.index(row[5].strip())))
    except FileNotFoundError:
        raise SiftError(f"missing MMLU file: {path}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise SiftError(f"{path}: not a readable CSV file ({err})") from None
    if not questions:
        raise SiftError(f"{path}: the file has no questions")
    return questions


def local_subjects(folder: Path, split: str) -> list[str]:
    """Every subject with a SUBJECT_SPLIT.csv in the folder."""
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise SiftError(f"no MMLU files in {folder} (expected SUBJECT_{split}.csv)")
    subjects = [f.name[: -len(f"_{split}.csv")] for f in files]
    for subject, file in zip(subjects, files):
        check_subject(subject, str(file))
    return subjects


def read_hub(hub_id: str, subject: str, split: str) -> list[Question]:
    source = f"{hub_id}/{subject}:{HUB_SPLITS[split]}"
    try:
        rows = datasets.load_dataset(hub_id, subject, split=HUB_SPLITS[split])
    except Exception as err:  # datasets raises many types for an unreachable hub
        raise SiftError(f"cannot load {source} from the hub ({type(err).__name__}); set data.dir to a local data "
                        f"root holding mmlu/{split}/SUBJECT_{split}.csv") from None
    questions = []
    for i, row in enumerate(rows):
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) != 4 \
                or answer not in range(4):
            raise SiftError(f"{source} row {i}: expected question, four choices and an answer index 0-3")
        questions.append(Question(subject, row["question"], tuple(choices), int(answer)))
    return questions


def load_questions(mcfg, data_dir: str | None, split: str, subjects: list[str] | None = None
                   ) -> dict[str, list[Question]]:
    """Questions per subject (`subjects`, else task.eval.mmlu.subjects, else all), from
    data.dir/<local_dir>/SPLIT/SUBJECT_SPLIT.csv or the hub."""
    if split not in HUB_SPLITS:
        raise SiftError(f"MMLU split must be one of {', '.join(HUB_SPLITS)}, got {split!r}")
    wanted = subjects or (list(mcfg.subjects) if mcfg.subjects is not None else None)
    for subject in wanted or []:
        check_subject(subject, "task.eval.mmlu.subjects")
    if data_dir:
        folder = Path(data_dir) / mcfg.local_dir / split
        subjects = wanted or local_subjects(folder, split)
        return {s: read_csv(folder / f"{s}_{split}.csv", s) for s in subjects}
    return {s: read_hub(mcfg.hub_id, s, split) for s in wanted or SUBJECT_CATEGORY}


# ---- prompts ---------------------------------------------------------------------------------------
def question_text(question: Question, style: str) -> str:
    return question.text.strip() if style == "lm_eval" else question.text


def format_question(question: Question, with_answer: bool, style: str = "hendrycks") -> str:
    text = question_text(question, style)
    text += "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices))
    text += "\nAnswer:"
    return text + f" {LETTERS[question.answer]}\n\n" if with_answer else text


def format_cloze(question: Question, with_answer: bool, style: str = "hendrycks") -> str:
    text = f"Question: {question_text(question, style)}\nAnswer:"
    return text + f" {question.choices[question.answer]}\n\n" if with_answer else text


def build_prompt(question: Question, shots: list[Question], form: str = "letter", style: str = "hendrycks") -> str:
    subject = " ".join(question.subject.split("_"))
    if form == "cloze":
        header, example = f"The following are questions (with answers) about {subject}.\n\n", format_cloze
    else:
        # The original joins " " + each word of the subject after "about ", hence its double space.
        about = f" {subject}" if style == "hendrycks" else subject
        header = f"The following are multiple choice questions (with answers) about {about}.\n\n"
        example = format_question
    return header + "".join(example(shot, True, style) for shot in shots) + example(question, False, style)


def answer_continuations(tokenizer, answers) -> tuple[tuple[int, ...], ...]:
    """The tokens of each " ANSWER" as it follows "Answer:" (tokenised together, as in the prompt)."""
    base = tokenizer("Answer:", add_special_tokens=False).input_ids
    continuations = []
    for answer in answers:
        whole = tokenizer(f"Answer: {answer}", add_special_tokens=False).input_ids
        if whole[: len(base)] != base or len(whole) == len(base):
            raise SiftError(f"MMLU scoring: the tokenizer does not keep 'Answer:' apart from the answer {answer!r}")
        continuations.append(tuple(whole[len(base):]))
    return tuple(continuations)


def letter_continuations(tokenizer) -> tuple[tuple[int, ...], ...]:
    """The tokens of " A" ... " D" after "Answer:"."""
    return answer_continuations(tokenizer, LETTERS)


def encode_question(tokenizer, question: Question, shots: list[Question], max_length: int,
                    letters: tuple[tuple[int, ...], ...], form: str = "letter",
                    style: str = "hendrycks") -> EncodedQuestion:
    """The prompt with as many of `shots` as fit in `max_length` tokens with the longest continuation: the
    answer letters' (`letters`, from letter_continuations) or, in the cloze form, the question's choices'."""
    if form == "cloze":
        continuations = answer_continuations(tokenizer, question.choices)
        lengths = tuple(len(choice) for choice in question.choices)  # lm-eval's acc_norm: the choice's characters
    else:
        continuations, lengths = letters, (1,) * len(letters)
    room = max_length - max(len(c) for c in continuations)
    if room < 1:
        raise SiftError(f"task.eval.mmlu.max_length={max_length} leaves no room for a {question.subject} "
                        f"question before its longest answer ({max(len(c) for c in continuations)} tokens)")
    kept = len(shots)
    context = tokenizer(build_prompt(question, shots[:kept], form, style)).input_ids
    while len(context) > room and kept > 0:
        kept -= 1
        context = tokenizer(build_prompt(question, shots[:kept], form, style)).input_ids
    return EncodedQuestion(question.subject, question.answer, tuple(context[-room:]), continuations, kept, lengths)


# ---- scoring ---------------------------------------------------------------------------------------
@torch.no_grad()
def answer_loglikelihoods(model, questions: list[EncodedQuestion], max_tokens: int, device, pad_id: int,
                          progress=lambda batches: batches, max_rows: int | None = None,
                          max_scored: int | None = None) -> list[list[float]]:
    """The log-likelihood of each possible answer after the prompt, per question.

    An answer's log-likelihood is the sum over its continuation tokens; the sequence fed to the model is
    the prompt plus all but the last continuation token, so answers sharing that sequence (all four
    letters, usually) share one forward pass. Sequences are padded on the left, so the positions that predict
    the continuations are the last ones of every row and only their logits are computed. Batches hold at most
    `max_tokens` tokens (rows x longest, sift_cli/batching.py), `max_rows` rows, and rows x continuation
    positions within `max_scored` (the full-vocabulary logits made at once).
    """
    requests: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # sequence -> (question, answer) it scores
    for q_index, q in enumerate(questions):
        for choice, cont in enumerate(q.continuations):
            requests.setdefault(q.context + cont[:-1], []).append((q_index, choice))
    likelihoods = [[0.0] * len(q.continuations) for q in questions]
    order = list(requests)
    keeps = [max(len(questions[i].continuations[c]) for i, c in requests[prefix]) for prefix in order]
    if max_scored is not None and order:
        cap = max(1, max_scored // max(keeps))
        max_rows = min(max_rows, cap) if max_rows else cap
    for rows in progress(token_batches([len(prefix) for prefix in order], max_tokens, max_rows)):
        batch = [order[r] for r in rows]
        width = len(batch[0])
        keep = max(keeps[r] for r in rows)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prefix in enumerate(batch):
            input_ids[row, width - len(prefix):] = torch.tensor(prefix)
            attention_mask[row, width - len(prefix):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=position_ids.to(device), logits_to_keep=keep).logits
        scores = F.log_softmax(logits[:, -keep:].float(), dim=-1)
        for row, prefix in enumerate(batch):
            for q_index, choice in requests[prefix]:
                cont = torch.tensor(questions[q_index].continuations[choice], device=scores.device)
                steps = scores[row, keep - len(cont):]
                likelihoods[q_index][choice] = float(steps.gather(-1, cont[:, None]).sum())
    return likelihoods


def best_answer(likelihoods: list[float], lengths: tuple[int, ...]) -> int:
    """The answer: the highest log-likelihood per unit of length (the first, on a tie)."""
    return max(range(len(likelihoods)), key=lambda i: likelihoods[i] / lengths[i])


def accuracy_metrics(name: str, subjects: list[str], correct: list[bool]) -> dict[str, float]:
    """Accuracy over all questions (`NAME`), per category over its questions (`NAME_CATEGORY`), per subject
    (`NAME/SUBJECT`) and the mean over subjects (`NAME_macro`)."""
    per_subject: dict[str, list[bool]] = {}
    for subject, ok in zip(subjects, correct):
        per_subject.setdefault(subject, []).append(ok)
    accuracy = {subject: sum(oks) / len(oks) for subject, oks in sorted(per_subject.items())}
    metrics = {name: sum(correct) / len(correct), f"{name}_macro": sum(accuracy.values()) / len(accuracy)}
    for category in CATEGORIES:
        members = [ok for subject, oks in per_subject.items() if SUBJECT_CATEGORY[subject] == category for ok in oks]
        if members:
            metrics[f"{name}_{category}"] = sum(members) / len(members)
    metrics.update({f"{name}/{subject}": acc for subject, acc in accuracy.items()})
    return metrics
