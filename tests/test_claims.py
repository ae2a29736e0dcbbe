"""`sift-table --claims`: each claim of a paper tested on the runs and on the published numbers, by hand."""

import json

import pytest

from sift_cli.errors import SiftError
from sift_cli.papers import available_papers, claims
from sift_cli.papers.claims import check, load_claims
from sift_cli.table import load_results, main
from tests.results_helpers import write_run
from tests.test_papers import HEADER, toy_paper  # noqa: F401 (a fixture)

TOY = [
    "toy,Table 1,full data,roberta-base,cola,sam,,SAM,matthews_correlation,60.0,,Table 1,high,",
    "toy,Table 1,full data,roberta-base,mrpc,sam,,SAM,accuracy,90.0,,Table 1,high,",
    "toy,Table 1,full data,roberta-base,cola,full_ft,,Full,matthews_correlation,58.0,,Table 1,high,",
    "toy,Table 1,full data,roberta-base,mrpc,full_ft,,Full,accuracy,91.0,,Table 1,high,",
    "toy,Table 1,full data,roberta-base,cola,lora,,LoRA,matthews_correlation,61.0,,Table 1,high,",
]


def arm_run(root, arm, task, seed, metrics, main_metric="accuracy"):
    run = write_run(root / arm, "full_ft", task, seed, metrics, main_metric=main_metric)
    record = json.loads((run / "results.json").read_text())
    record["config"]["arm"] = arm
    (run / "results.json").write_text(json.dumps(record))


@pytest.fixture
def toy(tmp_path, toy_paper, monkeypatch):  # noqa: F811
    """Runs of three arms (x, y, z) and the toy paper's claims about them."""
    toy_paper(*TOY)
    root = tmp_path / "runs"
    for seed, (x, y) in enumerate([(0.50, 0.40), (0.52, 0.44)], start=1):
        arm_run(root, "x", "cola", seed, {"matthews_correlation": x}, "matthews_correlation")
        arm_run(root, "y", "cola", seed, {"matthews_correlation": y}, "matthews_correlation")
        arm_run(root, "x", "mrpc", seed, {"accuracy": 0.70})
        arm_run(root, "y", "mrpc", seed, {"accuracy": 0.72})
    arm_run(root, "z", "cola", 1, {"matthews_correlation": 0.45}, "matthews_correlation")
    for seed, (accuracy, fine) in enumerate([(0.56, 0.60), (0.60, 0.60)], start=1):
        arm_run(root, "x", "sst2", seed, {"accuracy": accuracy, "fine": fine, "gain": None})
    common = "  source: Table 1\n  group_by: config.arm\n  paper_methods: {x: sam, y: full_ft, z: lora}\n"
    text = ("toy:\n"
            "- claim: x beats y on every task\n" + common + "  a: x\n  b: y\n  over: each\n  margin: 0\n"
            "- claim: x beats y and z on average\n" + common + "  a: x\n  b: [y, z]\n  margin: 0\n"
            "- claim: x keeps 95% of its fine score\n" + common
            + "  a: x\n  b: x\n  b_metric: fine\n  ratio: 0.95\n"
            "- claim: x gains\n" + common + "  a: x\n  a_metric: gain\n  b: x\n  b_metric: fine\n  margin: 0\n"
            "  missing: no gain was recorded\n")
    path = tmp_path / "claims.yaml"
    path.write_text(text)
    monkeypatch.setattr(claims, "CLAIMS_FILE", path)
    return root


def test_each_claim_is_tested_on_means_over_seeds_with_the_standard_error_of_the_difference(toy):
    each, average, ratio, missing = check(load_results([toy]), "toy")
    # cola: x 51 ± 1.41 (2 runs), y 42 ± 2.83: +9.0, se sqrt(2/2 + 8/2) = 2.24; mrpc: 70 - 72 exactly
    assert each.ours == "cola +9.0 ± 2.2; mrpc -2.0 ± 0.0 (n ≥ 2)"
    assert each.verdict == "does not hold"
    # the paper: SAM - Full on cola 60 - 58, mrpc 90 - 91
    assert each.paper == "cola +2.0; mrpc -1.0 (roberta-base): does not hold"
    # x (51 + 70) / 2 against y (42 + 72) / 2, se sqrt(5) / 2; against z on cola alone, one run, no se
    assert average.ours == "vs y: +3.5 ± 1.1 over cola, mrpc (n ≥ 2); vs z: +6.0 over cola (n ≥ 1)"
    assert average.verdict == "holds"
    assert average.paper == ("vs y: +0.5 over cola, mrpc; vs z: -1.0 over cola (roberta-base): does not hold")


def test_a_ratio_of_two_metrics_of_the_same_runs_uses_their_paired_differences(toy):
    ratio = check(load_results([toy]), "toy")[2]
    # 58 / 60 = 96.7%; per run 56 - 57 = -1 and 60 - 57 = 3: sd 2.83, se 2.0 (3.3% of 60) > 58 - 57
    assert ratio.ours == "97% ± 3% over sst2 (n ≥ 2)"
    assert ratio.verdict == "holds (within one standard error)"
    assert ratio.claim.test == "x (main score) ≥ 0.95 × x (fine)"
    assert ratio.paper == "stated in Table 1; no published numbers for it recorded"


def test_a_side_without_numbers_is_not_testable_and_says_why(toy):
    missing = check(load_results([toy]), "toy")[3]
    assert missing.ours == "–"
    assert missing.verdict == "not testable: no run recorded x (gain) (no gain was recorded)"


def test_sift_table_prints_the_claims_as_a_markdown_table(toy, capsys):
    main([str(toy), "--paper", "toy", "--claims"])
    out = capsys.readouterr().out
    assert "| claim | test | paper | ours | at this scale |" in out
    assert "| x beats y on every task | x ≥ y | cola +2.0; mrpc -1.0 (roberta-base): does not hold | " \
           "cola +9.0 ± 2.2; mrpc -2.0 ± 0.0 (n ≥ 2) | **does not hold** |" in out
    with pytest.raises(SystemExit):
        main([str(toy), "--claims"])
    assert "--claims needs --paper" in capsys.readouterr().err


@pytest.mark.parametrize("claim, message", [
    ("- claim: c\n  source: s\n  a: sam\n  b: full_ft\n", "give one of margin and ratio"),
    ("- claim: c\n  source: s\n  a: sam\n  b: full_ft\n  margin: 0\n  ratio: 1\n", "give one of margin and ratio"),
    ("- claim: c\n  a: sam\n  b: full_ft\n  margin: 0\n", "needs claim, source"),
    ("- claim: c\n  source: s\n  a: sam\n  b: bitfit\n  margin: 0\n", "'bitfit' is no row of papers/toy.csv"),
    ("- claim: c\n  source: s\n  a: sam\n  b: lora\n  margin: 0\n  over: some\n", "over must be average or each"),
    ("- claim: c\n  source: s\n  a: sam\n  b: lora\n  margin: 0\n  marign: 1\n", "unknown key"),
])
def test_a_bad_claim_is_refused_naming_it(tmp_path, toy_paper, monkeypatch, claim, message):  # noqa: F811
    toy_paper(*TOY)
    path = tmp_path / "claims.yaml"
    path.write_text("toy:\n" + claim)
    monkeypatch.setattr(claims, "CLAIMS_FILE", path)
    with pytest.raises(SiftError, match=f"toy claim 1: .*{message}"):
        load_claims("toy")


def test_the_shipped_claims_load_for_every_reproduced_paper():
    for paper in ("sift", "sam", "pac", "graft"):
        assert paper in available_papers() and load_claims(paper)


def test_the_graft_claims_read_the_sweep_s_row_of_sparsity_1e_4():
    from tests.conftest import compose_config

    rows = {c.a_metric.split(".")[2] for c in load_claims("graft") if "sparsity_sweep" in (c.a_metric or "")}
    for experiment in ("graft_lmbff", "graft_lmbff_table_cpu"):
        sweep = list(compose_config([f"experiment={experiment}"]).method.sparsity_sweep)
        assert rows == {"3"} and sweep[3] == 1e-4


def test_sift_s_claims_on_the_shipped_table_against_runs_by_hand(tmp_path):
    root = tmp_path / "runs"
    for seed, (sift, full) in enumerate([(0.30, 0.60), (0.34, 0.64)], start=1):
        write_run(root, "sift", "cola", seed, {"matthews_correlation": sift}, "matthews_correlation")
        write_run(root, "full_ft", "cola", seed, {"matthews_correlation": full}, "matthews_correlation")
    for seed, (sift, full) in enumerate([(0.90, 0.91), (0.92, 0.93)], start=1):
        write_run(root, "sift", "sst2", seed, {"accuracy": sift})
        write_run(root, "full_ft", "sst2", seed, {"accuracy": full})
    matches_full = check(load_results([root]), "sift")[0]
    # (32 + 91) / 2 - (62 + 92) / 2; se sqrt(8/2 + 8/2 + 2/2 + 2/2) / 2
    assert matches_full.ours == "-15.5 ± 1.6 over cola, sst2 (n ≥ 2)"
    assert matches_full.verdict == "does not hold"
    # Table 2: SIFT 68.5 and 96.2, FULL 68.0 and 96.4, margin -1
    assert matches_full.paper.endswith("over cola, sst2 (roberta-large): holds")
    assert check(load_results([root]), "sift")[1].verdict.startswith("not testable: no run recorded lora")
    write_run(root, "full_ft", "mrpc", 1, {"accuracy": 0.7})  # a task SIFT did not run: in neither comparison
    again = check(load_results([root]), "sift")[0]
    assert again.ours.endswith("over cola, sst2 (n ≥ 2)") and "over cola, sst2 (roberta-large)" in again.paper


def test_the_graft_keeps_95_percent_claim_compares_like_metrics_by_hand(tmp_path):
    """On CoLA the grafted model's MCC is held against the fine-tuned model's MCC, not its accuracy."""
    root = tmp_path / "runs"
    for seed, grafted in enumerate([0.20, 0.24], start=1):
        run = write_run(root, "graft", "cola", seed, {"matthews_correlation": grafted}, "matthews_correlation")
        record = json.loads((run / "results.json").read_text())
        record["config"]["method"] = {"head": "probe"}
        record["method_info"] = {"models": {"fine_tuned": {"matthews_correlation": 0.20, "accuracy": 0.70}}}
        (run / "results.json").write_text(json.dumps(record))
    keeps = next(c for c in check(load_results([root]), "graft") if "95%" in c.claim.text and "probe" in c.claim.text)
    # 22 / 20; per run 20 - 19 and 24 - 19: std 2.83 over 2 runs, se 2.0, 10% of 20
    assert keeps.ours == "110% ± 10% over cola (n ≥ 2)"
