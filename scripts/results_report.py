"""Write docs/results.md from the runs of scripts/reproduce_cpu.sh: per experiment, what it reproduces, the
command that ran it, its wall time, and the tables and plots `sift-table` makes of its runs (beside the
paper's numbers, and its claims marked holds / does not hold), each under the exact command that made it, then
what the runs show, from docs/findings/EXPERIMENT.md where someone has written it.

    python scripts/results_report.py --runs runs/reproduce --output docs/results.md

Every number shown comes from the tools' own output; an experiment that has not run yet is listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sift_cli.config import CONFIG_DIR, available_options, sweep_size  # noqa: E402
from sift_cli.errors import SiftError  # noqa: E402
from sift_cli.results import write_bytes_atomic  # noqa: E402

PAPERS = {"sift": "sift", "sam": "sam", "design": "design_spaces", "pac": "pac", "graft": "graft"}
BENCH = "sift_memory_cpu"  # measured by sift-bench, not trained by sift-run
# Tables besides the runs' own scores: a graft run's score is its grafted model's; its fine-tuned model is
# what the paper compares it with, and the pre-trained model and a random graft of the same size are the
# floor; the gain kept is null unless fine-tuning gained more than two standard errors. A PAC-tuning run's
# jobs are told apart by their pac_arm, and the share of the most predicted class shows a collapse.
EXTRA_METRICS = {"graft": ["method_info.models.fine_tuned.{main}", "method_info.models.pretrained.{main}",
                           "method_info.models.random_graft.{main}", "method_info.gain_kept.grafted",
                           "method_info.gain_kept.random_graft"],
                 "pac": ["predicted_class_share"]}
GROUP_BY = {"pac": ["--group-by", "config.pac_arm"], "graft": ["--group-by", "method,config.method.head"]}
# The paper's tables compare methods: PAC-tuning as its code means it; grafts of a probe-fitted head.
PAPER_FILTER = {"pac": ["--filter", "config.pac_arm=pac_intended"], "graft": ["--filter", "config.method.head=probe"]}


def experiments(runs: Path) -> list[str]:
    """The `_cpu` experiments, those with a folder under `runs` first, in reproduce_cpu.sh's order of running."""
    known = [e for e in available_options("experiment") if e.endswith("_cpu")]
    ran = sorted((d for d in runs.iterdir() if d.name in known), key=lambda d: (d / "command.txt").stat().st_mtime
                 if (d / "command.txt").exists() else 0) if runs.is_dir() else []
    return [d.name for d in ran] + [e for e in known if e not in {d.name for d in ran}]


def description(experiment: str) -> str:
    """The first paragraph of the experiment file's header comment after its first line (the command, shown
    separately); the file's other paragraphs (its differences from the official code) are pointed to."""
    lines = (Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").read_text().splitlines()[1:]
    paragraphs = [[]]
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").rstrip()
        if text:
            paragraphs[-1].append(text)
        elif paragraphs[-1]:
            paragraphs.append([])
    paragraphs = [p for p in paragraphs if p]
    more = (f" Remaining differences from the official code: conf/experiment/{experiment}.yaml."
            if len(paragraphs) > 1 else "")
    return " ".join(paragraphs[0]) + more if paragraphs else ""


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def wall_times(folder: Path, planned: int | None = None) -> str:
    """Jobs (of the `planned` the sweep launches), their summed and longest wall time, and the last
    invocation's elapsed time."""
    records = [json.loads(p.read_text()) for p in folder.rglob("results.json")]
    parts = []
    if records:
        times = [r.get("wall_time_s") or 0.0 for r in records]
        done = sum(r.get("status") == "completed" for r in records)
        of = f" of the sweep's {planned}" if planned else ""
        parts.append(f"{len(records)}{of} jobs ({done} completed), {hours(sum(times))} of job wall time in all, "
                     f"the longest {hours(max(times))}")
    invocation = folder / "invocation.json"
    if invocation.exists():
        info = json.loads(invocation.read_text())
        parts.append(f"the last invocation took {hours(info['elapsed_s'])} (exit code {info['exit_code']}, "
                     f"finished {info['finished']})")
    return "; ".join(parts) or "no timing recorded"


def tool(args: list[str]) -> tuple[str, str, list[str]]:
    """Run `sift-table ARGS`; returns the command as shown, its output and its warnings (or its error)."""
    shown = "sift-table " + " ".join(shlex.quote(a) for a in args)
    out = subprocess.run([sys.executable, "-m", "sift_cli.table", *args], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    notes = [line.removeprefix("sift-table: ") for line in out.stderr.splitlines()
             if line.startswith(("sift-table: warning", "sift-table: error", "sift-table: note"))]
    return shown, out.stdout, notes


def recorded(folder: Path, option: list[str]) -> list[str]:
    """`option` (["--group-by", "KEYS"] or ["--filter", "KEY=VALUE"]) when some run under `folder` records every
    key it names (runs from before a key existed are tabled as they were), else nothing."""
    if not option:
        return []
    keys = [k.strip().split("=")[0] for k in option[1].split(",") if k.strip() != "method"]
    for path in folder.rglob("results.json"):
        record = json.loads(path.read_text())
        if all(_dotted(record, key) is not None for key in keys):
            return option
    return []


def _dotted(record: dict, key: str):
    for part in key.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def section_for_runs(experiment: str, folder: Path, output: Path, findings: Path) -> list[str]:
    rel = os.path.relpath(folder, ROOT)
    plots = output.parent / "results" / experiment
    family = experiment.split("_")[0]
    group_by = recorded(folder, GROUP_BY.get(family, []))
    lines = []
    shown, text, notes = tool([rel, *group_by, "--plot", os.path.relpath(plots, ROOT)])
    lines += [f"`{shown}`", "", text.strip(), ""] + [f"> {n}" for n in notes] + ([""] if notes else [])
    for name, title in (("budget_curve.png", "score against trainable-parameter share"),
                        ("task_bars.png", "per-task scores, one dot per seed")):
        if (plots / name).exists():
            lines += [f"![{title}]({os.path.relpath(plots / name, output.parent)})", ""]
    for metric in EXTRA_METRICS.get(family, []):
        shown, text, notes = tool([rel, *group_by, "--metric", metric])
        lines += [f"`{shown}`", "", text.strip(), ""] + [f"> {n}" for n in notes] + ([""] if notes else [])
    paper = PAPERS.get(family)
    if paper:
        shown, text, notes = tool([rel, *recorded(folder, PAPER_FILTER.get(family, [])), "--paper", paper])
        lines += [f"`{shown}`", ""] + ([text.strip(), ""] if text.strip() else []) + [f"> {n}" for n in notes]
        lines.append("")
        shown, text, notes = tool([rel, "--paper", paper, "--claims"])
        lines += ["**The paper's claims at this scale**", "", f"`{shown}`", "", text.strip(), ""]
        lines += [f"> {n}" for n in notes if "error" in n] + [""]
    written = findings / f"{experiment}.md"
    if written.exists():
        link = os.path.relpath(written, output.parent)
        lines += [f"**What the runs show** (written by hand after reading them: [{link}]({link}))", "",
                  written.read_text().strip(), ""]
    return lines


def section_for_bench(folder: Path) -> list[str]:
    lines = []
    for name, title in (("bench.md", "Measured on this machine (sift-bench)"),
                        ("paper.md", "The paper's LLaMA-7B numbers beside sift-memory's prediction "
                                     "(`sift-memory --paper sift-llama7b`)")):
        if (folder / name).exists():
            lines += [f"**{title}**", "", (folder / name).read_text().strip(), ""]
    return lines


def report(runs: Path, output: Path, findings: Path) -> str:
    lines = ["# Results at CPU scale", "",
             "What `scripts/reproduce_cpu.sh` gives on a small machine: every paper table's `_cpu` experiment "
             "(conf/experiment/), the commands that ran it, and the tables and plots `sift-table` makes of the "
             "runs. These are small models on capped data, so the published numbers beside them are what the "
             "full experiments (the same names without `_cpu`) aim at, not what to expect here.", "",
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by "
             f"`python scripts/results_report.py --runs {os.path.relpath(runs, ROOT)} "
             f"--output {os.path.relpath(output, ROOT)}`; {os.cpu_count()} CPU cores.", ""]
    for experiment in experiments(runs):
        folder = runs / experiment
        lines += [f"## {experiment}", "", description(experiment), ""]
        if not (folder / "command.txt").exists():
            lines += ["Not run yet.", ""]
            continue
        lines += [f"Command: `{(folder / 'command.txt').read_text().strip()}`", "",
                  f"Wall time: {wall_times(folder, None if experiment == BENCH else sweep_size(experiment))}.", ""]
        lines += (section_for_bench(folder) if experiment == BENCH
                  else section_for_runs(experiment, folder, output, findings))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--findings", type=Path, default=ROOT / "docs" / "findings",
                        help="per experiment, EXPERIMENT.md: what its runs show, written by hand after reading them")
    args = parser.parse_args(argv)
    try:
        text = report(args.runs.resolve(), args.output.resolve(), args.findings.resolve())
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.output, text.encode())
    except (SiftError, OSError) as err:
        print(f"results_report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"results_report: wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
