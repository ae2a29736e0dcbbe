"""Published numbers load with their sources, and `sift-table --paper` sets ours beside them with the difference."""

import json
import math

import pytest
from omegaconf import OmegaConf

from sift_cli import papers
from sift_cli.errors import SiftError
from sift_cli.papers import COLUMNS, PRETRAINED, available_papers, citation, load_paper
from sift_cli.papers.compare import compare
from sift_cli.tasks import mmlu
from sift_cli.table import load_results, main
from tests.conftest import compose_config
from tests.results_helpers import write_run
from tests.test_experiments import sweep_params

HEADER = ",".join(COLUMNS)
SOURCES = "toy:\n  authors: A. Author\n  title: A Toy Paper\n  venue: Nowhere 2024\n  arxiv: '0000.00000'\n"


def test_every_paper_has_data_and_a_citation():
    assert set(available_papers()) == {"sift", "sam", "design_spaces", "pac", "graft"}
    for name in available_papers():
        rows = load_paper(name)
        assert rows and all(r.paper == name and r.table and r.setting and r.model for r in rows)
        assert "arXiv:" in citation(name)


def test_a_number_names_its_source_and_says_why_when_it_is_not_certain():
    for name in available_papers():
        for row in load_paper(name):
            assert not math.isnan(row.value) or row.confidence == "unchecked"
            assert math.isnan(row.value) or row.source
            assert row.confidence == "high" or row.note


def test_sift_and_sam_are_filled_in():
    """Every cell of their tables holds a checked number; SAM's each with its std over the 10 seeds."""
    for name in ("sift", "sam"):
        rows = load_paper(name)
        assert all(not math.isnan(r.value) and r.confidence in ("high", "medium") for r in rows)
    sam = load_paper("sam")
    assert len(sam) == 10 * 7 and all(not math.isnan(r.std) for r in sam)
    sift = load_paper("sift")
    assert {r.table for r in sift} == {"GLUE", "Instruction tuning", "Memory"}
    instruction = {r.metric for r in sift if r.table == "Instruction tuning"}
    assert instruction == {"mmlu_0shot", "humaneval_pass@1", "humaneval_pass@10"}  # no 5-shot column


def _task_option(task: str) -> str:
    from sift_cli.config import available_options

    return next(o for o in available_options("task") if o.split("/")[-1] == task)


@pytest.mark.parametrize("name", ["sift", "sam"])
def test_each_published_metric_is_one_our_runs_record(name):
    for row in load_paper(name):
        if row.table == "Memory":  # sift-memory's figures, not a run's metric
            continue
        task = compose_config([f"task={_task_option(row.task)}"]).task
        suffixes = list(task.eval_splits.values()) if task.get("eval_splits") else [""]
        recorded = {metric + suffix for metric in task.metrics for suffix in suffixes}
        if task.kind == "instruct":  # MMLU's breakdowns, as the evaluation names them
            recorded |= set(mmlu.accuracy_metrics("mmlu_0shot", ["anatomy"], [True]))
        assert set(row.metric_parts) <= recorded, (row.task, row.metric)


@pytest.fixture
def toy_paper(tmp_path, monkeypatch):
    """papers/toy.csv in a temporary papers folder; returns a function writing its rows."""
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "sources.yaml").write_text(SOURCES)
    monkeypatch.setattr(papers, "PAPERS_DIR", folder)

    def write(*rows):
        (folder / "toy.csv").write_text("# a comment line\n" + "\n".join([HEADER, *rows]) + "\n")

    return write


TOY = [
    "toy,Table 1,full data,roberta-base,cola,sam,,SAM,matthews_correlation,60.0,,Table 1 p. 5,high,",
    "toy,Table 1,full data,roberta-base,mrpc,sam,,SAM,f1,90.0,,Table 1 p. 5,high,",
    "toy,Table 1,full data,roberta-base,cola,full_ft,,FullTuning,matthews_correlation,,,,unchecked,not in our PDF",
    "toy,Table 1,full data,roberta-base,mrpc,full_ft,,FullTuning,f1,88.0,,Figure 2,medium,read off a bar chart",
    "toy,Table 2,instruction tuning,llama-7b,alpaca,sam,,SAM,mmlu_0shot,40.0,,Table 2,high,",
]


@pytest.mark.parametrize("row, message", [
    ("toy,T,s,m,cola,nosuch,,X,accuracy,1,,src,high,", "unknown method 'nosuch'"),
    ("toy,T,s,m,nosuch,sam,,X,accuracy,1,,src,high,", "unknown task 'nosuch'"),
    ("toy,T,s,m,cola,sam,,X,accuracy,high,,src,high,", "value must be a number or empty"),
    ("toy,T,s,m,cola,sam,,X,accuracy,1,wide,src,high,", "std must be a number or empty"),
    ("toy,T,s,m,cola,sam,,X,accuracy,,,src,high,", "without a value must be confidence unchecked"),
    ("toy,T,s,m,cola,sam,,X,accuracy,,1.0,src,unchecked,why", "a std without a value"),
    ("toy,T,s,m,cola,sam,,X,accuracy,1,,src,medium,", "a medium number needs a note"),
    ("toy,T,s,m,cola,sam,,X,accuracy,1,,src,maybe,", "confidence must be one of high, medium, unchecked"),
    ("toy,T,s,m,cola,sam,,X,accuracy,1,,,high,", "source is empty"),
    ("toy,T,,m,cola,sam,,X,accuracy,1,,src,high,", "setting is empty"),
    ("toy,T,s,m,cola,sam,r8,X,accuracy,1,,src,high,", "method_config must be key=value pairs"),
    ("toy,T,s,m,cola,sam,,X,accuracy+,1,,src,high,", "has an empty part"),
    ("other,T,s,m,cola,sam,,X,accuracy,1,,src,high,", "paper 'other' in the file of 'toy'"),
])
def test_a_bad_row_is_one_line_naming_the_file_and_line(toy_paper, row, message):
    toy_paper(row)
    with pytest.raises(SiftError, match=rf"toy\.csv:3: .*{message}"):
        load_paper("toy")


def test_a_repeated_number_and_an_unknown_paper_are_refused(toy_paper):
    toy_paper(TOY[0], TOY[0])
    with pytest.raises(SiftError, match="a second number"):
        load_paper("toy")
    with pytest.raises(SiftError, match="unknown paper 'nosuch'; choose from: toy"):
        load_paper("nosuch")


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, (mcc, f1) in enumerate([(0.50, 0.80), (0.60, 0.84)], start=1):
        write_run(root, "sam", "cola", seed, {"matthews_correlation": mcc, "accuracy": 0.7},
                  main_metric="matthews_correlation", trainable_pct=0.5)
        write_run(root, "sam", "mrpc", seed, {"accuracy": 0.75, "f1": f1}, trainable_pct=0.5)
    write_run(root, "full_ft", "mrpc", 1, {"accuracy": 0.7, "f1": 0.86}, trainable_pct=100.0)
    write_run(root, "lora", "cola", 1, {"matthews_correlation": 0.4}, main_metric="matthews_correlation")
    write_run(root, "full_ft", "cola", 1, {}, main_metric="matthews_correlation", status="failed")
    return root


def _cells(comparison):
    return {(row.method, column.task, column.metric): cell for (row, column), cell in comparison.cells.items()}


def test_cells_compare_each_published_metric_over_seeds(toy_paper, runs):
    toy_paper(*TOY)
    comparison = compare(load_results([runs]), "toy")
    assert comparison.table == "Table 1" and [r.method for r in comparison.paper_rows] == ["sam", "full_ft"]
    cells = {(m, t): cell for (m, t, _), cell in _cells(comparison).items()}
    assert cells[("sam", "cola")].ours == pytest.approx(55.0) and cells[("sam", "cola")].n == 2
    assert cells[("sam", "cola")].diff == pytest.approx(-5.0)
    assert cells[("sam", "mrpc")].ours == pytest.approx(82.0)  # the paper's F1, not our main metric (accuracy)
    assert cells[("full_ft", "mrpc")].diff == pytest.approx(-2.0) and cells[("full_ft", "mrpc")].uncertain
    assert math.isnan(cells[("full_ft", "cola")].ours)  # the failed run gives no number
    assert comparison.unmatched == {"lora": 1}  # a method the paper's table does not have is not a row


def test_sift_table_prints_ours_paper_and_diff(toy_paper, runs, capsys):
    toy_paper(*TOY)
    main([str(runs), "--paper", "toy"])
    out = capsys.readouterr().out
    assert 'A. Author, "A Toy Paper"' in out and "Table 1" in out and "ours minilm-l6" in out
    assert "55.0 ± 7.1 / 60.0 / -5.0" in out
    assert "86.0 / 88.0* / -2.0" in out
    assert "– / –* / –" in out
    assert "* 1 cell(s), medium: read off a bar chart" in out and "* 1 cell(s), unchecked: not in our PDF" in out
    assert "Source of 2 number(s): Table 1 p. 5" in out and "Source of 1 number(s): Figure 2" in out
    assert "Runs no row of the paper's table describes (not shown): lora (1)." in out


def test_median_latex_and_csv(toy_paper, runs, capsys):
    toy_paper(*TOY)
    main([str(runs), "--paper", "toy", "--stat", "median", "--format", "latex"])
    latex = capsys.readouterr().out
    assert r"\toprule" in latex and r"\bottomrule" in latex and "55.0 / 60.0 / -5.0" in latex
    main([str(runs), "--paper", "toy", "--format", "csv"])
    csv_text = capsys.readouterr().out
    assert "cola_ours,cola_ours_std,cola_n,cola_paper,cola_diff,cola_uncertain" in csv_text.splitlines()[0]


def test_the_table_is_picked_by_what_the_runs_recorded(toy_paper, runs, tmp_path, capsys):
    toy_paper(*TOY)
    write_run(runs, "sam", "alpaca", 1, {"mmlu_0shot": 0.45, "heldout_loss": 1.2}, main_metric="heldout_loss")
    with pytest.raises(SystemExit):
        main([str(runs), "--paper", "toy"])
    assert "several tables" in capsys.readouterr().err
    main([str(runs), "--paper", "toy", "--paper-table", "Table 2"])
    assert "45.0 / 40.0 / +5.0" in capsys.readouterr().out
    for args, message in [(["--paper-table", "Table 9"], "has no table 'Table 9'"),
                          (["--group-by", "method,seed"], "--paper compares methods"),
                          (["--paper", "nosuch"], "unknown paper")]:
        with pytest.raises(SystemExit):
            main([str(runs), "--paper", "toy", *args] if args[0] != "--paper" else [str(runs), *args])
        assert message in capsys.readouterr().err


def _set(run_dir, **fields):
    """Change top-level fields of a written results.json (config.method, start_metrics)."""
    path = run_dir / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_a_combined_metric_is_the_mean_of_its_parts_and_config_picks_the_row(toy_paper, tmp_path):
    toy_paper("toy,T,s,roberta-large,mnli,sift,,SIFT,accuracy+accuracy_mm,90.0,,src,high,",
              "toy,T,s,roberta-large,mnli,adapter,placement=pfeiffer;reduction_factor=16,P,accuracy,80.0,,src,high,",
              "toy,T,s,roberta-large,mnli,adapter,placement=houlsby;reduction_factor=16,H,accuracy,70.0,,src,high,")
    root = tmp_path / "runs"
    write_run(root, "sift", "mnli", 1, {"accuracy": 0.80, "accuracy_mm": 0.90})
    for seed, (placement, reduction, accuracy) in enumerate([("pfeiffer", 16.0, 0.6), ("houlsby", "16", 0.5),
                                                             ("houlsby", 64, 0.1)], start=1):
        _set(write_run(root, "adapter", "mnli", seed, {"accuracy": accuracy}),
             config={"method": {"placement": placement, "reduction_factor": reduction}})
    comparison = compare(load_results([root]), "toy")
    assert _cells(comparison)[("sift", "mnli", "accuracy+accuracy_mm")].ours == pytest.approx(85.0)
    by_label = {row.label: cell for (row, _), cell in comparison.cells.items()}
    assert by_label["P"].ours == pytest.approx(60.0) and by_label["P"].n == 1  # reduction_factor 16.0 is 16
    assert by_label["H"].ours == pytest.approx(50.0) and by_label["H"].n == 1
    assert comparison.unmatched == {"adapter": 1}  # houlsby at 64: no row of the paper


def test_the_pretrained_row_reads_the_evaluation_before_training(toy_paper, tmp_path):
    toy_paper(f"toy,T,s,llama-7b,alpaca,{PRETRAINED},,Vanilla,mmlu_0shot,30.0,,src,high,",
              "toy,T,s,llama-7b,alpaca,sift,,SIFT,mmlu_0shot,40.0,,src,high,")
    root = tmp_path / "runs"
    for seed in (1, 2):
        _set(write_run(root, "sift", "alpaca", seed, {"mmlu_0shot": 0.41}), start_metrics={"mmlu_0shot": 0.26})
    cells = _cells(compare(load_results([root]), "toy"))
    assert cells[(PRETRAINED, "alpaca", "mmlu_0shot")].ours == pytest.approx(26.0)
    assert cells[("sift", "alpaca", "mmlu_0shot")].diff == pytest.approx(1.0)


def test_a_table_published_for_several_models_compares_the_model_of_the_runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "sift", "alpaca", 1, {"mmlu_0shot": 0.50}, model="llama-13b")
    comparison = compare(load_results([root]), "sift")
    assert comparison.table == "Instruction tuning" and comparison.model == "llama-13b"
    assert _cells(comparison)[("sift", "alpaca", "mmlu_0shot")].paper == 46.7  # LLaMA-13B's row, not 7B's 40.7
    small = tmp_path / "small"
    write_run(small, "sift", "alpaca", 1, {"mmlu_0shot": 0.30}, model="smollm2-135m")
    comparison = compare(load_results([small]), "sift")
    assert comparison.model == "llama-7b" and comparison.other_models == ["llama-13b", "llama-33b"]


def test_sift_table_shows_sift_s_published_sst2_and_ours_minus_paper(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, accuracy in [(1, 0.95), (2, 0.97)]:
        write_run(root, "sift", "sst2", seed, {"accuracy": accuracy})
    main([str(root), "--paper", "sift"])
    out = capsys.readouterr().out
    [sift_row] = [line for line in out.splitlines() if line.startswith("| SIFT ")]
    assert "96.0 ± 1.4 / 96.2 / -0.2" in sift_row  # mean 96.0, the paper's 96.2, 96.0 - 96.2


def _runs_of_every_job(root, experiment, tasks, metrics):
    """A completed run per method of the experiment's sweep, seed and task, with the method config it runs."""
    methods = sweep_params(experiment)["method"]
    for method in methods:
        config = OmegaConf.to_container(compose_config([f"experiment={experiment}", f"method={method}"]).method)
        for seed in (1, 2, 3):
            for task in tasks:
                _set(write_run(root, method, task, seed, metrics[task]), config={"method": config})
    return methods


@pytest.mark.parametrize("experiment, paper, tasks, not_in_paper", [
    ("sift_glue", "sift", ["cola", "sst2", "mrpc", "stsb", "mnli", "qnli"], {"bitfit"}),
    ("sam_glue_superglue", "sam", ["cola", "stsb", "mrpc"], set()),
])
def test_no_published_cell_is_empty_for_a_task_we_ran(tmp_path, experiment, paper, tasks, not_in_paper):
    """The tasks the data root has, run by every method of the experiment: each method is a row of the paper's
    table with ours and the paper's number in every task we ran, unless the paper's table lacks the method."""
    metrics = {"cola": {"matthews_correlation": 0.5}, "sst2": {"accuracy": 0.9}, "qnli": {"accuracy": 0.85},
               "mrpc": {"accuracy": 0.8, "f1": 0.85}, "stsb": {"pearson": 0.8, "spearmanr": 0.79},
               "mnli": {"accuracy": 0.7, "accuracy_mm": 0.71}}
    methods = _runs_of_every_job(tmp_path / "runs", experiment, tasks, metrics)
    comparison = compare(load_results([tmp_path / "runs"]), paper)
    ran = [key for key in comparison.cells if key[1].task in tasks]
    assert ran and all(not math.isnan(comparison.cells[key].paper) for key in ran)
    for method in set(methods) - not_in_paper:
        [row] = [row for row in comparison.paper_rows
                 if row.method == method and any(comparison.cells[(row, c)].n for c in comparison.columns)]
        assert all(comparison.cells[(row, c)].n == 3 for c in comparison.columns if c.task in tasks)
    assert set(comparison.unmatched) == not_in_paper


def test_the_shipped_data_frames_a_table_of_our_runs(runs, capsys):
    main([str(runs), "--paper", "sam"])
    out = capsys.readouterr().out
    assert "Main results" in out and "ours minilm-l6" in out and "| SAM " in out
    assert "55.00 ± 7.07 / 60.89 ± 0.96 / -5.89" in out  # CoLA: Matthews, as jiant scores it
    assert "78.50 ± 1.41 / 88.84 ± 0.49* / -10.34" in out  # MRPC: the mean of accuracy and F1, jiant's score
