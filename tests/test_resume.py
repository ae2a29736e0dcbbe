"""A run killed mid-training continues from its checkpoint to the same result as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, FIXTURES

ARGS = ["model=tiny-bert", f"data.dir={FIXTURES}", "data.k_shot=4", "trainer.max_steps=40",
        "trainer.checkpoint_every=4", "trainer.eval_every=8", "trainer.lr=1e-3", "logger.mode=disabled"]


def command(*extra):
    return [sys.executable, "-m", "sift_cli.run", *ARGS, *extra]


def run(cwd: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(command(*extra), cwd=cwd, capture_output=True, text=True, timeout=600)


def final(cwd: Path) -> tuple[dict, list]:
    [path] = list((cwd / "runs").rglob("results.json"))
    results = json.loads(path.read_text())
    curve = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    return results, curve


def start_and_stop(cwd: Path, stop, *extra) -> subprocess.Popen:
    """Start a run, wait for its first checkpoint, then stop it with `stop(process)`."""
    process = subprocess.Popen(command(*extra), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((cwd / "runs").rglob("checkpoint/state.pt")):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    stop(process)
    process.wait(timeout=120)
    return process


def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir(), killed.mkdir()
    assert run(reference).returncode == 0

    process = start_and_stop(killed, lambda p: p.send_signal(signal.SIGKILL))
    assert process.returncode == -signal.SIGKILL
    assert not list((killed / "runs").rglob("results.json"))
    again = run(killed)
    assert again.returncode == 0, again.stderr
    assert "resumed" in (again.stdout + again.stderr)

    expected, expected_curve = final(reference)
    got, got_curve = final(killed)
    assert got["metrics"] == expected["metrics"] and got["steps"] == 40
    assert [r for r in got_curve if "loss" in r and (r.pop("time_s") or True)] == \
        [r for r in expected_curve if "loss" in r and (r.pop("time_s") or True)]
    assert len(list((killed / "runs").glob("*/*"))) == 1  # continued in place, no second directory
    assert not list((killed / "runs").rglob("checkpoint"))  # removed once the run completed


def test_sigterm_stops_gracefully_and_resume_finishes(tmp_path):
    long = "trainer.max_steps=400"  # still training when the signal arrives
    process = start_and_stop(tmp_path, lambda p: p.send_signal(signal.SIGTERM), long)
    assert process.returncode == 130
    [path] = list((tmp_path / "runs").rglob("results.json"))
    interrupted = json.loads(path.read_text())
    assert interrupted["status"] == "interrupted" and "SIGTERM" in interrupted["error"]
    assert (path.parent / "checkpoint" / "state.pt").exists()
    again = run(tmp_path, long, f"resume={path.parent}")
    assert again.returncode == 0, again.stderr
    assert json.loads(path.read_text())["status"] == "completed"


def test_resume_refuses_a_run_of_another_config(tmp_path):
    process = start_and_stop(tmp_path, lambda p: p.send_signal(signal.SIGTERM), "trainer.max_steps=400")
    assert process.returncode == 130
    [path] = list((tmp_path / "runs").rglob("results.json"))
    other = run(tmp_path, "trainer.max_steps=400", f"resume={path.parent}", "seed=7")
    assert other.returncode == 2 and "different config" in other.stderr


def test_skip_completed_skips_a_finished_job(tmp_path):
    first = run(tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=null")
    assert first.returncode == 0, first.stderr
    second = run(tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=null", "skip_completed=true")
    assert second.returncode == 0 and "skipped" in second.stdout
    assert len(list((tmp_path / "runs").rglob("results.json"))) == 1
    assert os.stat(next((tmp_path / "runs").rglob("results.json"))).st_mode & 0o044  # readable by others


# ---- sweeps run again into the same directory, and signals whenever they come -------------------------
def sift_run_in(cwd: Path, *args: str, driver: str | None = None) -> subprocess.CompletedProcess:
    """`sift-run ARGS` in cwd; with `driver`, Python code run first in the same process (it then calls main)."""
    start = ["-c", driver + "\nfrom sift_cli.run import main\nmain()"] if driver else ["-m", "sift_cli.run"]
    return subprocess.run([sys.executable, *start, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})


def sweep_args(sweep_dir: Path, *extra: str) -> list[str]:
    return ["-m", *FAST, "method=full_ft,bitfit", "skip_completed=true", f"hydra.sweep.dir={sweep_dir}", *extra]


def results_in(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))}


def test_a_sweep_run_again_into_its_directory_skips_what_completed_and_refuses_another_config(tmp_path):
    sweep_dir = tmp_path / "sweep"
    first = sift_run_in(tmp_path, *sweep_args(sweep_dir))
    assert first.returncode == 0, first.stderr
    written = {p: p.read_bytes() for p in sweep_dir.glob("*/results.json")}
    assert [r["status"] for r in results_in(sweep_dir).values()] == ["completed", "completed"]

    again = sift_run_in(tmp_path, *sweep_args(sweep_dir))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("; skipped") == 2
    assert {p: p.read_bytes() for p in sweep_dir.glob("*/results.json")} == written
    assert len(list(sweep_dir.glob("*/"))) == 2

    other = sift_run_in(tmp_path, *sweep_args(sweep_dir, "trainer.lr=5e-4"))  # same job directories
    assert other.returncode == 2 and "holds the results of another run" in other.stderr
    assert {p: p.read_bytes() for p in sweep_dir.glob("*/results.json")} == written


def test_sigterm_ends_a_sweep_and_running_it_again_continues_in_place(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # still training when the signal comes, after the first checkpoint
    args = sweep_args(sweep_dir, "trainer.max_steps=200", "trainer.checkpoint_every=50", "trainer.eval_every=50")
    process = subprocess.Popen([sys.executable, "-m", "sift_cli.run", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.time() + 300
    while not list(sweep_dir.rglob("checkpoint/state.pt")):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "#1 :" not in out + err  # Hydra's loop did not start the next job
    [(name, interrupted)] = results_in(sweep_dir).items()
    assert name.startswith("0_full_ft") and interrupted["status"] == "interrupted"
    assert "SIGTERM" in interrupted["error"] and (sweep_dir / name / "checkpoint" / "state.pt").exists()

    again = sift_run_in(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert f"resumed {sweep_dir / name} at step {interrupted['steps']}" in again.stdout + again.stderr
    finished = results_in(sweep_dir)
    assert list(finished) == [name, "1_bitfit_sst2_tiny-bert_s42"]
    assert all(r["status"] == "completed" and r["steps"] == 200 for r in finished.values())


# Patches a point of the job to send the process a real signal there (once), as a pre-emption would.
SIGNAL_AT = """
import functools, importlib, os, signal
module, owner, name, when = {point!r}
owner = getattr(importlib.import_module(module), owner)
original, sent = getattr(owner, name), []
def send():
    if not sent:
        sent.append(os.kill(os.getpid(), signal.SIGTERM))
@functools.wraps(original)
def signalled(*args, **kwargs):
    send() if when == "before" else None
    out = original(*args, **kwargs)
    send() if when == "after" else None
    return out
setattr(owner, name, signalled)
"""
ONE_RUN = [*FAST, "trainer.eval_every=1"]


@pytest.mark.parametrize("point, message", [
    (("sift_cli.run", "Job", "final_metrics", "before"), "during the final evaluation"),
    # after the trainer's last look for a signal: before, the job completed and the sweep went on
    (("sift_cli.trainer", "Trainer", "train", "after"), "at the end of training"),
])
def test_a_signal_after_training_ends_the_sweep_with_a_checkpoint_from_which_a_rerun_completes(tmp_path, point,
                                                                                                message):
    (tmp_path / "reference").mkdir()
    reference = sift_run_in(tmp_path / "reference", *ONE_RUN, "method=full_ft")
    assert reference.returncode == 0, reference.stderr
    sweep_dir = tmp_path / "sweep"
    stopped = sift_run_in(tmp_path, *sweep_args(sweep_dir, "trainer.eval_every=1"), driver=SIGNAL_AT.format(point=point))
    assert stopped.returncode == 130, stopped.stderr
    assert message in stopped.stderr and "#1 :" not in stopped.stdout + stopped.stderr
    [(name, interrupted)] = results_in(sweep_dir).items()
    assert interrupted["status"] == "interrupted" and interrupted["steps"] == 3
    assert (sweep_dir / name / "checkpoint" / "state.pt").exists()

    again = sift_run_in(tmp_path, *sweep_args(sweep_dir, "trainer.eval_every=1"))  # the same command
    assert again.returncode == 0, again.stderr
    assert f"resumed {sweep_dir / name} at step 3" in again.stdout + again.stderr
    [expected] = [json.loads(p.read_text()) for p in (tmp_path / "reference" / "runs").rglob("results.json")]
    finished = results_in(sweep_dir)
    assert [r["status"] for r in finished.values()] == ["completed", "completed"]
    assert finished[name]["metrics"] == expected["metrics"] and finished[name]["selection"] == expected["selection"]
    assert not (sweep_dir / name / "checkpoint").exists()


def test_a_signal_in_set_up_leaves_nothing_and_one_while_results_are_written_lets_them_complete(tmp_path):
    (tmp_path / "set-up").mkdir(), (tmp_path / "writing").mkdir()
    early = sift_run_in(tmp_path / "set-up", *ONE_RUN,
                        driver=SIGNAL_AT.format(point=("sift_cli.run", "Job", "setup", "before")))
    assert early.returncode == 130 and "during set-up" in early.stderr
    assert not list((tmp_path / "set-up" / "runs").glob("*/*"))  # no run directory left behind
    late = sift_run_in(tmp_path / "writing", *ONE_RUN,
                       driver=SIGNAL_AT.format(point=("sift_cli.run", "Job", "write", "before")))
    assert late.returncode == 130 and "had completed" in late.stderr
    [path] = list((tmp_path / "writing" / "runs").rglob("results.json"))
    assert json.loads(path.read_text())["status"] == "completed"
