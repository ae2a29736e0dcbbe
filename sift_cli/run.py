"""`sift-run`: compose model x task x method x trainer x logger with Hydra, train, evaluate, write results.json.

A run directory is never overwritten: one that already holds a run of another config is refused, while
a run of the same config there is skipped (completed, with skip_completed) or continued (unfinished), so
a sweep run again into the same sweep directory resumes in place. Input errors (config values, data
files, model paths) are one line and a non-zero exit, and leave no run directory behind; a failure once
training has started is recorded as `status: failed` in results.json. In a sweep (`-m`), a failed job is
recorded and the sweep goes on; the exit code says whether any job failed. SIGINT and SIGTERM stop the
whole sweep, whenever they come (`_stop_on_signals`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sift_cli.config import CONFIG_DIR, available_options, validate
from sift_cli.errors import Interrupted, SiftError

log = logging.getLogger("sift_cli")
_FAILED_JOBS: list[str] = []


class RunFailed(SiftError):
    """Training started and then failed; results.json records why."""


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.method.name}-{cfg.task.name}-{cfg.model.name}-s{cfg.seed}"


def check_config(cfg: DictConfig):
    """Every check that needs no data and no weights, before any work: the config's ranges, the method's
    settings and their combinations with the run, and the settings against the model's modules (built from
    its config alone). Returns the method."""
    from sift_cli.methods import build_method
    from sift_cli.models import skeleton

    validate(cfg)
    method = build_method(cfg.method, cfg)
    modules = skeleton(cfg.model)
    if modules is not None:
        method.check_model(modules)
    return method


class Job:
    """One run: set-up (may fail with no trace), then training and evaluation (failures recorded)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, group: str | None, resume_from: Path | None = None):
        from sift_cli.runs import fingerprint

        self.cfg = cfg
        self.run_dir = run_dir
        self.group = group
        self.resume_from = resume_from  # this run's own directory, holding the checkpoint to continue from
        self.fingerprint = fingerprint(cfg)
        self.started_at = datetime.now(timezone.utc)
        self.clock = time.perf_counter()
        self.phase = "set-up"  # then training, evaluation, writing: what a signal does depends on it
        self.stop_signal: str | None = None  # the name of a SIGINT/SIGTERM received during the job
        self.fitted = None  # the method's FitResult, once training is over
        self.after_fit: dict | None = None  # resumed from a checkpoint taken after training: what fit left

    def setup(self) -> None:
        import torch
        from accelerate.utils import set_seed

        from sift_cli.memory.check import check_memory
        from sift_cli.methods import ModelContext
        from sift_cli.models import load_tokenizer
        from sift_cli.tasks import build_task
        from sift_cli.trainer import make_accelerator

        cfg = self.cfg
        self.method = check_config(cfg)
        self.accelerator = make_accelerator(cfg.trainer)
        device, processes = self.accelerator.device, self.accelerator.num_processes
        check_memory(cfg, self.method, device, processes)  # what any run of this config needs, before the data
        set_seed(int(cfg.seed), deterministic=self.accelerator.device.type == "cpu")
        torch.use_deterministic_algorithms(False)
        tokenizer = load_tokenizer(cfg.model)
        self.task = build_task(cfg, tokenizer)
        self.data = self.task.load()
        check_memory(cfg, self.method, device, processes, self.data.train)  # with the longest training row
        loaded = self.task.load_model(cfg.model, int(cfg.seed))
        self.total_params = loaded.total_params
        ctx = ModelContext(new_params=loaded.new_params, task_kind=cfg.task.kind)
        self.new_params = frozenset(loaded.new_params)
        self.model = self.method.prepare(loaded.model, ctx)

    def make_trainer(self, recorder):
        """The loop, once the method has chosen from data what trains (SIFT's, SAM's entries, PAC's K)."""
        from sift_cli.trainer import Trainer

        self.trainer = Trainer(self.cfg, self.model, self.method, self.task, self.data, self.accelerator, recorder,
                               run_dir=self.run_dir, fingerprint=self.fingerprint, new_params=self.new_params)
        self.method.select(self.trainer.context)
        self.trainer.wrap_model()
        self.trainable_params = self.method.count_trainable(self.trainer.unwrapped_model)
        return self.trainer

    def fit(self) -> dict:
        """Train as the method says, and return the test metrics of the model it reports."""
        self.fitted = self.method.fit(self.trainer.loop)
        return self.final_metrics()

    def final_metrics(self) -> dict:
        """Put the model the method's fit reports in place and return its test metrics."""
        if self.fitted.state is not None:
            self.method.load_trainable_state(self.trainer.unwrapped_model, self.fitted.state)
        return self.fitted.metrics if self.fitted.metrics is not None else self.trainer.evaluate_tests()

    def resume(self) -> None:
        """Continue from this run directory's checkpoint; the curve is cut back to the checkpoint's step."""
        import torch

        from sift_cli.results import METRICS_FILE, write_bytes_atomic
        from sift_cli.runs import CHECKPOINT_DIR, CHECKPOINT_FILE

        state = torch.load(self.run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        self.trainer.load_state_dict(state)
        self.after_fit = state.get("after_fit")
        if self.after_fit is not None:
            from sift_cli.context import FitResult

            self.fitted = FitResult(**self.after_fit["fitted"])
        curve = self.run_dir / METRICS_FILE
        if curve.exists() and self.accelerator.is_main_process:
            kept = [line for line in curve.read_text().splitlines(keepends=True)
                    if json.loads(line).get("step", 0) <= self.trainer.step]
            write_bytes_atomic(curve, "".join(kept).encode())
        log.info("resumed %s at step %d", self.run_dir, self.trainer.step)

    def run(self) -> dict:
        from sift_cli.runs import CHECKPOINT_DIR
        from sift_cli.tracking import Recorder

        is_main = self.accelerator.is_main_process
        config = OmegaConf.to_container(self.cfg, resolve=True)
        recorder = Recorder(self.run_dir, self.cfg.logger, run_name(self.cfg), self.group, config, is_main)
        failed = True
        try:
            self.make_trainer(recorder)
            if self.resume_from is not None:
                self.resume()
            elif self.cfg.trainer.eval_on_start:
                self.trainer.evaluate_start()
            log.info("%s: %d of %d parameters train (%.3f%%), %d steps", run_name(self.cfg),
                     self.trainable_params, self.total_params, 100 * self.trainable_params / self.total_params,
                     self.trainer.total_steps)
            self.phase = "training"
            if self.fitted is None:  # not resumed from a checkpoint taken after training
                self.fitted = self.method.fit(self.trainer.loop)
            self.phase = "evaluation"
            if self.stop_signal:  # it came after the trainer last looked for one
                raise Interrupted(f"stopped by {self.stop_signal} at the end of training")
            metrics = self.final_metrics()
            self.phase = "writing"
            results = self.results("completed", metrics=metrics)
            if self.cfg.save.weights and is_main:
                self.save_weights()
            recorder.summary({"main_score": results["main_score"], **metrics})
            failed = False
        except Interrupted as err:
            stopped_in, self.phase = self.phase, "writing"  # a second signal waits for the record below
            message = str(err)
            if stopped_in == "evaluation" and self.trainer.optimizer is not None:
                # training is complete: keep it, with what fit left, so that a rerun only evaluates
                self.trainer.save_checkpoint(after_fit={"fitted": vars(self.fitted), "method_info": self.method_info()})
                message += "; training is complete and checkpointed"
            if is_main:
                self.write(self.results("interrupted", error=message))
            raise Interrupted(message) from None
        except Exception as err:
            self.phase = "writing"
            results = self.results("failed", error=f"{type(err).__name__}: {err}")
            if is_main:
                self.write(results)
            if isinstance(err, SiftError):
                raise RunFailed(f"{err} (recorded in {self.run_dir / 'results.json'})") from None
            raise
        finally:
            recorder.finish(failed)
        if is_main:
            self.write(results)
            if not self.cfg.trainer.keep_checkpoint:
                shutil.rmtree(self.run_dir / CHECKPOINT_DIR, ignore_errors=True)
        return results

    def results(self, status: str, metrics: dict | None = None, error: str | None = None) -> dict:
        from sift_cli.results import versions

        cfg = self.cfg
        trainer = getattr(self, "trainer", None)
        fitted = getattr(self, "fitted", None)
        extra = fitted.extra_time_s if fitted else {}
        metrics = metrics or {}
        main_metric = cfg.task.main_metric
        trainable = getattr(self, "trainable_params", None)
        total = getattr(self, "total_params", None)
        return {
            "status": status,
            "fingerprint": self.fingerprint,
            "task": cfg.task.name,
            "method": cfg.method.name,
            "model": cfg.model.name,
            "seed": cfg.seed,
            "metrics": metrics,
            "main_metric": main_metric,
            "main_score": metrics.get(main_metric),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_pct": 100 * trainable / total if trainable is not None and total else None,
            "train_time_s": trainer.train_time_s + extra.get("train", 0.0) if trainer else None,
            "eval_time_s": trainer.eval_time_s + extra.get("eval", 0.0) if trainer else None,
            "wall_time_s": time.perf_counter() - self.clock,
            "steps": trainer.step if trainer else 0,
            "selection": (fitted.selection if fitted else trainer.selection_info()) if trainer else None,
            "start_metrics": trainer.start_metrics if trainer else None,
            "data": getattr(getattr(self, "data", None), "info", None),
            "method_info": self.method_info(),
            "error": error,
            "run_dir": str(self.run_dir),
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "versions": versions(),
        }

    def method_info(self) -> dict:
        if self.after_fit is not None:
            return self.after_fit["method_info"]
        return self.method.summary() if hasattr(self, "method") else {}

    def write(self, results: dict) -> None:
        from sift_cli.results import RESULTS_FILE, write_json_atomic

        write_json_atomic(self.run_dir / RESULTS_FILE, results)

    def save_weights(self) -> None:
        from safetensors.torch import save

        from sift_cli.results import write_bytes_atomic

        state = self.method.export(self.trainer.unwrapped_model)
        write_bytes_atomic(self.run_dir / "trainable.safetensors", save({k: v.contiguous() for k, v in state.items()}))


_STOPPED = {"set-up": "during set-up", "evaluation": "during the final evaluation"}


@contextmanager
def _stop_on_signals(job: Job | None):
    """SIGINT and SIGTERM stop the job and with it the sweep, whenever they come, leaving a record to resume.

    In training the trainer checkpoints and stops at its next step; in set-up, or in the final evaluation
    (after which `Job.run` checkpoints the trained state), the job stops at once; while results are
    written, it stops once they are. Each ends in `Interrupted`, which is not an `Exception`, so Hydra's
    loop never goes on to the next job. With no job (before, between or after the jobs), it stops at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        name = signal.Signals(signum).name
        if job is None:
            raise Interrupted(f"stopped by {name} outside a job")
        job.stop_signal = job.stop_signal or name
        if job.phase == "training":
            job.trainer.stop_requested = name
        elif job.phase != "writing":
            raise Interrupted(f"stopped by {name} {_STOPPED[job.phase]}")

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _discard_fresh(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but Hydra's own files (set-up failed before any work)."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "run.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def _earlier_run(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, Path | None]:
    """(a completed run to skip, an unfinished run to resume) of the same config, as the config asks."""
    from sift_cli.runs import completed_run, fingerprint, resumable, unfinished_run

    print_ = fingerprint(cfg)
    root = Path(cfg.runs_dir)
    if cfg.skip_completed and root.is_dir():
        done = completed_run(root, print_)
        if done is not None:
            return done, None
    if cfg.resume in (None, "never", False):
        return None, None
    if cfg.resume == "auto":
        return None, unfinished_run(root, print_, exclude=run_dir) if root.is_dir() else None
    return None, resumable(Path(cfg.resume), print_)


def _follow_log_to(run_dir: Path) -> None:
    """Resuming in an earlier directory: the console log continues in that directory's run.log."""
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _shared_run_dir(run_dir: Path) -> Path:
    """Under `accelerate launch` every process composes its own run directory (the time may differ by a
    second): all take the main process's, and only the main process logs below warnings."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    if state.num_processes == 1:
        return run_dir
    shared = Path(broadcast_object_list([str(run_dir)])[0])
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
        if shared != run_dir:
            _discard_fresh(run_dir)
    return shared


def _in_own_dir(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, Path | None]:
    """(a completed run to skip, an unfinished run to resume) in the job's own directory, which a sweep run
    again into the same sweep directory finds taken; (None, None) when the job starts afresh there."""
    from sift_cli.results import METRICS_FILE
    from sift_cli.runs import fingerprint, held_in

    held = held_in(run_dir, fingerprint(cfg))
    if held == "completed":
        if not cfg.skip_completed:
            raise SiftError(f"{run_dir} already holds a completed run of this config; it is never overwritten "
                            "(skip_completed=true skips it)")
        return run_dir, None
    if held == "unfinished":
        if cfg.resume in (None, "never", False):
            raise SiftError(f"{run_dir} holds an unfinished run of this config; resume={cfg.resume} would "
                            "overwrite it")
        return None, run_dir
    if _is_main_process():  # a curve left by a run stopped before its first checkpoint
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    return None, None


def run_job(cfg: DictConfig) -> dict | None:
    from sift_cli.results import RESULTS_FILE, read_results

    hydra_cfg = HydraConfig.get()
    run_dir = _shared_run_dir(Path(hydra_cfg.runtime.output_dir))
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = f"sweep-{Path(hydra_cfg.sweep.dir).name}" if multirun else None
    done, earlier = _in_own_dir(cfg, run_dir)
    if done is None and earlier is None:
        done, earlier = _earlier_run(cfg, run_dir)
    if done is not None:
        _discard_fresh(run_dir)
        results = read_results(done / RESULTS_FILE)
        print(f"{run_name(cfg)}: already completed in {done}; skipped", flush=True)
        return results
    if earlier is not None and earlier != run_dir:
        _discard_fresh(run_dir)
        run_dir = earlier
        _follow_log_to(run_dir)
    job = Job(cfg, run_dir, group, resume_from=earlier)
    with _stop_on_signals(job):
        try:
            job.setup()
        except Interrupted:
            if earlier is None:
                _discard_fresh(run_dir)
            raise
        except SiftError as err:
            if not multirun:
                if earlier is None:
                    _discard_fresh(run_dir)
                raise
            if _is_main_process():
                job.write(job.results("failed", error=str(err)))
            _FAILED_JOBS.append(f"{run_dir.name}: {err}")
            log.error("job failed: %s", err)
            return None
        try:
            results = job.run()
        except Exception as err:
            if not multirun:
                raise
            _FAILED_JOBS.append(f"{run_dir.name}: {err}")
            log.error("job failed: %s", err)
            return None
        if _is_main_process():
            score = results["main_score"]
            print(f"{run_name(cfg)}: {results['main_metric']} = {score:.4f}  (run dir: {run_dir})", flush=True)
        if job.stop_signal:  # it came while the results were written: they are complete, the sweep ends here
            raise Interrupted(f"stopped by {job.stop_signal} once {run_name(cfg)} had completed")
    return results


_PENDING: list[BaseException] = []


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    """Returns the main score, the objective of sweepers such as Optuna (NaN when the job failed)."""
    # Hydra prints a report of its own for an exception that leaves the task; keep ours to one line.
    try:
        results = run_job(cfg)
    except Exception as err:
        _PENDING.append(err)
        return math.nan
    score = results.get("main_score") if results else None
    return math.nan if score is None else float(score)


def one_line(err: BaseException) -> str:
    """Hydra's multi-line composition errors as one line that still lists the valid choices."""
    text = str(err).strip()
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, name = missing.group(1).partition("/")
        options = available_options(group)
        if not options:
            return f"unknown config '{missing.group(1)}'"
        return f"unknown {group} '{name}'; choose from: {', '.join(options)}"
    key = re.search(r"Could not override '([^']+)'", text)
    if key and "To append to your config" in text:
        hint = "to add a new key, prefix it with '+'"
        if {"-m", "--multirun"} & set(sys.argv[1:]):  # Hydra composes a sweep's defaults before its jobs
            hint += ("; in a sweep over groups, Hydra first composes the default choices, so a key that they "
                     "lack needs '++' (set when present, added when not)")
        return f"unknown config key '{key.group(1)}' ({hint})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(err).__name__


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us, to report them in one line
    try:
        with _stop_on_signals(None):  # before, between and after jobs; each job installs its own
            _hydra_main()
        if _PENDING:
            raise _PENDING.pop()
    except RunFailed as err:
        print(f"sift-run: failed: {err}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as err:
        print(f"sift-run: interrupted: {err}; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except SiftError as err:
        print(f"sift-run: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"sift-run: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    if _FAILED_JOBS:
        print(f"sift-run: {len(_FAILED_JOBS)} job(s) failed:", *_FAILED_JOBS, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
