"""`sift-table`: numbers aggregated by hand-checkable rules, failed and missing cells never shown as numbers."""

import io
import json

import pandas as pd
import pytest

from sift_cli.table import main
from tests.results_helpers import write_run


def write(root, name, method, task, seed, score, status="completed", pct=1.0, k_shot=16, ece=0.1,
          main_metric="accuracy", versions=None):
    run = root / name
    run.mkdir(parents=True)
    metrics = {} if status != "completed" else {main_metric: score, "ece": ece}
    run.joinpath("results.json").write_text(json.dumps({
        "status": status, "task": task, "method": method, "model": "minilm-l6", "seed": seed,
        "metrics": metrics, "main_metric": main_metric, "main_score": score if status == "completed" else None,
        "trainable_params": int(pct * 1000), "total_params": 100000, "trainable_pct": pct, "train_time_s": 1.0,
        "selection": {"on": "dev"}, "config": {"data": {"k_shot": k_shot}, "method": {"name": method}},
        "error": None if status == "completed" else "boom",
        "versions": versions or {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}}))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write(root, "a1", "lora", "sst2", 1, 0.80, pct=0.5)
    write(root, "a2", "lora", "sst2", 2, 0.90, pct=0.5)
    write(root, "a3", "lora", "cola", 1, 0.40, pct=0.5)
    write(root, "b1", "full_ft", "sst2", 1, 0.70, pct=100.0, ece=0.05)
    write(root, "b2", "full_ft", "cola", 1, 0.0, status="failed", pct=100.0)
    write(root, "c1", "bitfit", "sst2", 1, 0.60, pct=0.1)
    write(root, "c2", "bitfit", "cola", 1, 0.30, pct=0.1)
    write(root, "c3", "bitfit", "cola", 2, 0.0, status="failed", pct=0.1)
    return root


def table(capsys, *args):
    main([*map(str, args)])
    return capsys.readouterr().out


def row(text, method):
    return next(line for line in text.splitlines() if line.startswith(f"| {method}"))


def test_mean_and_std_over_seeds_and_the_best_in_bold(runs, capsys):
    out = table(capsys, runs)
    assert "**85.0 ± 7.1**" in row(out, "lora")  # mean 85.0, sample std 7.07 of 80 and 90
    assert "70.0" in row(out, "full_ft") and "**70.0" not in row(out, "full_ft")


def test_failed_cells_are_never_numbers(runs, capsys):
    out = table(capsys, runs)
    assert "failed" in row(out, "full_ft")  # its only cola run failed
    assert "30.0" in row(out, "bitfit") and "1 failed" in row(out, "bitfit")


def test_average_only_over_complete_rows(runs, capsys):
    out = table(capsys, runs)
    assert "62.5" in row(out, "lora")  # (85 + 40) / 2
    assert "62.5" not in row(out, "full_ft")


def test_median_and_another_metric(runs, capsys):
    assert "85.0" in row(table(capsys, runs, "--stat", "median"), "lora")
    ece = table(capsys, runs, "--metric", "ece")
    assert "**5.0" in row(ece, "full_ft")  # lower is better for ece


def test_csv_and_latex(runs, capsys):
    frame = pd.read_csv(io.StringIO(table(capsys, runs, "--format", "csv")))
    assert not frame.empty and any(pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns)
    latex = table(capsys, runs, "--format", "latex")
    assert "\\toprule" in latex and "\\textbf" in latex and "full\\_ft" in latex


def test_data_seeds_are_replicates_and_true_repeats_are_flagged(tmp_path, capsys):
    for data_seed, accuracy in ((13, 0.6), (21, 0.7)):
        write_run(tmp_path / "runs", "graft", "sst2", 42, {"accuracy": accuracy}, data_seed=data_seed)
    main([str(tmp_path / "runs")])
    captured = capsys.readouterr()
    assert "65.0 ± 7.1" in row(captured.out, "graft") and "repeat" not in captured.err
    write_run(tmp_path / "again", "graft", "sst2", 42, {"accuracy": 0.8}, data_seed=13)
    main([str(tmp_path / "runs"), str(tmp_path / "again")])
    assert "1 run(s) repeat a (row, task, seed, data seed)" in capsys.readouterr().err


def test_any_recorded_number_can_be_the_metric(tmp_path, capsys):
    run = write_run(tmp_path, "graft", "sst2", 1, {"accuracy": 0.5})
    record = json.loads((run / "results.json").read_text())
    record["method_info"] = {"models": {"fine_tuned": {"accuracy": 0.9}}}
    (run / "results.json").write_text(json.dumps(record))
    assert "90.0" in row(table(capsys, tmp_path, "--metric", "method_info.models.fine_tuned.accuracy"), "graft")
    assert "50.0" in row(table(capsys, tmp_path), "graft")


def test_main_in_a_key_reads_each_runs_own_main_metric(tmp_path, capsys):
    """A CoLA run's fine-tuned model is read by its MCC, an SST-2 run's by its accuracy, in one column each."""
    for task, main_metric, fine_tuned in (("cola", "matthews_correlation", {"matthews_correlation": 0.2,
                                                                           "accuracy": 0.7}),
                                          ("sst2", "accuracy", {"accuracy": 0.9})):
        run = write_run(tmp_path, "graft", task, 1, {main_metric: 0.5}, main_metric=main_metric)
        record = json.loads((run / "results.json").read_text())
        record["method_info"] = {"models": {"fine_tuned": fine_tuned}}
        (run / "results.json").write_text(json.dumps(record))
    cells = row(table(capsys, tmp_path, "--metric", "method_info.models.fine_tuned.{main}"), "graft")
    assert "20.0" in cells and "90.0" in cells and "70.0" not in cells


def test_mixed_protocols_are_flagged(runs, capsys):
    write(runs, "d1", "lora", "mrpc", 1, 0.7, k_shot=None)
    main([str(runs)])
    assert "k_shot" in capsys.readouterr().err


def test_one_version_of_the_libraries_gives_no_warning(runs, capsys):
    main([str(runs)])
    assert "versions" not in capsys.readouterr().err


def test_runs_on_other_library_versions_are_named_one_line_per_library(runs, capsys):
    write(runs, "d1", "lora", "mrpc", 1, 0.7, versions={"torch": "2.13.0", "transformers": "5.0.0", "peft": "0.17.0",
                                                         "datasets": "3.0.0"})
    write(runs, "d2", "lora", "mrpc", 2, 0.6, status="failed", versions={"torch": "2.4.0"})  # no number: not counted
    main([str(runs)])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "versions" in line]
    assert warnings == ["sift-table: warning: the runs used different transformers versions: 5.0.0 (1 run), "
                        "5.24.0 (6 runs)",
                        "sift-table: warning: the runs used different peft versions: 0.17.0 (1 run), 0.21.2 (6 runs)"]


def test_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])


def test_plots_are_written(runs, tmp_path, capsys):
    table(capsys, runs, "--plot", tmp_path / "plots")
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)


def test_one_seed_has_no_std_and_the_failed_marker_is_exact(runs, capsys):
    out = table(capsys, runs)
    assert "| 70.0 " in row(out, "full_ft")  # one seed: no "± std"
    assert "30.0 (1 failed)" in row(out, "bitfit")


def test_interrupted_runs_count_as_failed(runs, capsys):
    write(runs, "a4", "lora", "sst2", 3, 0.0, status="interrupted", pct=0.5)
    out = table(capsys, runs)
    assert "**85.0 ± 7.1** (1 failed)" in row(out, "lora")
    assert "9 runs read, 9 in the table: 6 completed, 3 failed (1 of them interrupted)" in out


def test_a_combination_without_runs_is_missing(runs, capsys):
    write(runs, "a5", "lora", "mrpc", 1, 0.75, pct=0.5)
    out = table(capsys, runs)
    assert row(out, "bitfit").split("|")[3].strip() == "–"  # columns: method, cola, mrpc, sst2, ...
    assert row(out, "lora").split("|")[5].strip() == "**66.7**"  # avg (40 + 75 + 85) / 3


def test_trainable_share_keeps_small_values_readable(runs, capsys):
    write(runs, "e1", "tiny", "sst2", 1, 0.5, pct=0.0123)
    write(runs, "e2", "tiny", "cola", 1, 0.2, pct=0.0123)
    out = table(capsys, runs)
    assert row(out, "tiny").rstrip(" |").endswith("0.0123")
    assert row(out, "full_ft").rstrip(" |").endswith("100.00")


def test_group_by_a_config_path_and_filter(runs, capsys):
    write(runs, "f1", "lora", "sst2", 1, 0.60, pct=0.5, k_shot=64)
    out = table(capsys, runs, "--group-by", "method,config.data.k_shot", "--filter", "method=lora")
    assert "k_shot" not in capsys.readouterr().err  # a row key is not a mix
    lines = [line for line in out.splitlines() if line.startswith("| lora")]
    assert [line.split("|")[2].strip() for line in lines] == ["16", "64"]  # numeric order
    assert "60.0" in lines[1] and "bitfit" not in out
    only_seed_2 = table(capsys, runs, "--filter", "seed=2", "--filter", "method=lora")
    assert "**90.0**" in row(only_seed_2, "lora")


def test_csv_holds_raw_numbers(runs, capsys):
    frame = pd.read_csv(io.StringIO(table(capsys, runs, "--format", "csv"))).set_index("method")
    assert frame.loc["lora", "sst2_mean"] == pytest.approx(0.85)
    assert frame.loc["lora", "sst2_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert frame.loc["bitfit", "cola_failed"] == 1 and frame.loc["lora", "trainable_pct"] == 0.5


def test_output_is_written_to_a_file(runs, tmp_path, capsys):
    target = tmp_path / "table.md"
    assert table(capsys, runs, "--output", target) == ""
    assert "**85.0 ± 7.1**" in row(target.read_text(), "lora")


def test_empty_directory_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "sift-table: error:" in capsys.readouterr().err


def test_invalid_json_is_skipped_with_a_warning(runs, capsys):
    broken = runs / "broken" / "results.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    main([str(runs)])
    captured = capsys.readouterr()
    assert f"warning: skipping {broken}" in captured.err
    assert "8 runs read" in captured.out


def test_main_scores_that_are_losses_are_unscaled_and_lower_is_better(tmp_path, capsys):
    root = tmp_path / "runs"
    write(root, "a", "lora", "alpaca", 1, 1.3, main_metric="heldout_loss")
    write(root, "b", "sift", "alpaca", 1, 1.5, main_metric="heldout_loss")
    out = table(capsys, root)
    assert "**1.3**" in row(out, "lora") and "1.5" in row(out, "sift") and "lower is better" in out
    write(root, "c", "sift", "sst2", 1, 0.8)
    with pytest.raises(SystemExit) as exit_info:
        main([str(root)])
    assert exit_info.value.code == 2 and "choose one with --metric" in capsys.readouterr().err
