"""scripts/reproduce_cpu.sh runs every `_cpu` experiment, and scripts/results_report.py turns runs into
docs/results.md with the tools' own tables, plots, commands and wall times."""

import json
import re
import subprocess
import sys
from pathlib import Path

from sift_cli.config import available_options
from tests.results_helpers import write_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce_cpu.sh"


def test_the_script_is_valid_bash_and_runs_every_cpu_experiment():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    listed = re.search(r"ALL=\(([^)]*)\)", SCRIPT.read_text()).group(1).split()
    assert sorted(listed) == sorted(e for e in available_options("experiment") if e.endswith("_cpu"))


def test_the_script_refuses_to_run_without_a_data_root(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "SIFT_DATA_DIR" in out.stderr


def test_overrides_after_a_double_dash_reach_every_run_and_its_recorded_command(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sift-run").write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    (bin_dir / "sift-run").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SIFT_DATA_DIR": str(tmp_path), "CALLS": str(tmp_path / "calls"),
           "REPRODUCE_DIR": str(tmp_path / "out"), "PYTHON": "true"}
    out = subprocess.run(["bash", str(SCRIPT), "pac_glue_table_cpu", "graft_lmbff_table_cpu", "--", "seed=1",
                          "trainer.max_steps=2"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[1] for c in calls] == ["experiment=pac_glue_table_cpu", "experiment=graft_lmbff_table_cpu"]
    assert all(c.endswith("seed=1 trainer.max_steps=2") for c in calls)
    recorded = (tmp_path / "out" / "pac_glue_table_cpu" / "command.txt").read_text()
    assert recorded.split()[:2] == ["sift-run", "-m"] and recorded.strip().endswith("seed=1 trainer.max_steps=2")


def fake_reproduction(root: Path) -> Path:
    runs = root / "reproduce"
    glue = runs / "sift_glue_cpu"
    for seed, offset in ((42, 0.0), (43, 0.04)):
        for method, pct in (("full_ft", 100.0), ("sift", 0.5)):
            write_run(glue / "multirun", method, "cola", seed, {"matthews_correlation": 0.3 + offset},
                      main_metric="matthews_correlation", trainable_pct=pct, wall_time_s=90.0)
    (glue / "command.txt").write_text("sift-run -m experiment=sift_glue_cpu skip_completed=true "
                                      "runs_dir=runs/reproduce/sift_glue_cpu\n")
    (glue / "invocation.json").write_text(json.dumps({"elapsed_s": 400, "exit_code": 0,
                                                      "finished": "2026-01-01T00:00:00Z"}))
    graft = runs / "graft_lmbff_table_cpu"
    run = write_run(graft / "multirun", "graft", "sst2", 42, {"accuracy": 0.5}, data_seed=13)
    record = json.loads((run / "results.json").read_text())
    record["method_info"] = {"models": {"fine_tuned": {"accuracy": 0.64}}}
    (run / "results.json").write_text(json.dumps(record))
    (graft / "command.txt").write_text("sift-run -m experiment=graft_lmbff_table_cpu\n")
    bench = runs / "sift_memory_cpu"
    bench.mkdir(parents=True)
    (bench / "command.txt").write_text("sift-bench --models minilm-l6 --override experiment=sift_memory_cpu\n")
    (bench / "bench.md").write_text("| model | seq | method |\n|---|---|---|\n| minilm-l6 | 128 | sift |\n")
    (bench / "paper.md").write_text("| method | checkpointing | paper |\n|---|---|---|\n| sift | no | 51.41 |\n")
    return runs


def test_the_report_shows_each_experiment_with_the_tools_output(tmp_path):
    runs = fake_reproduction(tmp_path)
    output = tmp_path / "docs" / "results.md"
    findings = tmp_path / "findings"
    findings.mkdir()
    (findings / "sift_glue_cpu.md").write_text("SIFT's learning rate is too low for 120 steps.\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_report.py"), "--runs", str(runs),
                          "--output", str(output), "--findings", str(findings)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    text = output.read_text()
    glue = text[text.index("## sift_glue_cpu"):]
    glue = glue[:glue.index("\n## ")]
    assert "Command: `sift-run -m experiment=sift_glue_cpu skip_completed=true" in glue
    assert "Wall time: 4 of the sweep's 60 jobs (4 completed), 6.0 min of job wall time in all, the longest 1.5 min; " \
           "the last invocation took 6.7 min" in glue
    assert "`sift-table " in glue and "--plot" in glue and "| full_ft" in glue and "trainable %" in glue
    assert "32.0 ± 2.8" in glue  # (30 + 34) / 2, std over the two seeds
    assert "--paper sift" in glue and "/ paper / ours - paper" in glue and "RoBERTa-large" in glue
    for plot in ("budget_curve.png", "task_bars.png"):
        assert (tmp_path / "docs" / "results" / "sift_glue_cpu" / plot).stat().st_size > 0
        assert f"(results/sift_glue_cpu/{plot})" in glue
    claims = glue[glue.index("**The paper's claims at this scale**"):]
    assert "--paper sift --claims`" in claims
    assert "| SIFT matches full fine-tuning on GLUE | sift − full_ft ≥ -1 |" in claims
    assert "(written by hand after reading them: [../findings/sift_glue_cpu.md](../findings/sift_glue_cpu.md))" \
        "\n\nSIFT's learning rate is too low for 120 steps." in glue
    memory = text[text.index("## sift_memory_cpu"):]
    assert "| minilm-l6 | 128 | sift |" in memory and "| sift | no | 51.41 |" in memory
    graft_section = text[text.index("## graft_lmbff_table_cpu"):]
    graft_section = graft_section[:graft_section.index("\n## ")]
    assert "--metric 'method_info.models.fine_tuned.{main}'`" in graft_section
    assert "| graft    | **50.0**" in graft_section and "| graft    | **64.0**" in graft_section
    assert "## pac_glue_table_cpu" in text and "Not run yet." in text.split("## pac_glue_table_cpu")[1]


def test_the_report_shows_pac_tuning_s_five_jobs_as_rows(tmp_path):
    runs = tmp_path / "reproduce"
    folder = runs / "pac_glue_table_cpu"
    for arm, method, score in (("pac_intended", "pac", 0.6), ("full_ft_intended", "full_ft", 0.7)):
        run = write_run(folder / "multirun" / arm, method, "sst2", 42, {"accuracy": score,
                                                                       "predicted_class_share": 0.9}, data_seed=1)
        record = json.loads((run / "results.json").read_text())
        record["config"]["pac_arm"] = arm
        (run / "results.json").write_text(json.dumps(record))
    (folder / "command.txt").write_text("sift-run -m experiment=pac_glue_table_cpu\n")
    output = tmp_path / "results.md"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_report.py"), "--runs", str(runs),
                          "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    section = output.read_text().split("## pac_glue_table_cpu")[1].split("\n## ")[0]
    assert "--group-by config.pac_arm" in section and "--metric predicted_class_share" in section
    assert "| pac_intended " in section and "| full_ft_intended " in section
    assert "--filter config.pac_arm=pac_intended --paper pac" in section
    assert "Remaining differences from the official code: conf/experiment/pac_glue_table_cpu.yaml." in section
