"""Earlier runs of the same config: an unfinished one to resume, or a completed one to skip.

Two runs are "the same" when their resolved configs agree on everything that can change the result; the
fingerprint leaves out where results go, logging, and the resume and skip switches themselves. A job whose
own directory already holds a run (a sweep run again into the same `hydra.sweep.dir`) continues or skips
that run when it is of the same config, and never overwrites one of another config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sift_cli.errors import SiftError

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
FINGERPRINT_FILE = "fingerprint"
_NOT_IN_FINGERPRINT = ("logger", "resume", "skip_completed", "runs_dir")
# How evaluation and training batches are cut for memory: the same gradients and scores (up to the order of
# float sums and, for training with dropout, which masks are drawn)
_TRAINER_NOT_IN_FINGERPRINT = ("progress_bar", "checkpoint_every", "eval_batch_size", "eval_tokens", "train_tokens",
                               "memory_check")


# How k-shot rows are drawn, which a run without data.k_shot never uses
_TASK_K_SHOT_ONLY = ("k_shot_buckets", "k_shot_seed_chain", "k_shot_pool")


def fingerprint(cfg: DictConfig) -> str:
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in _NOT_IN_FINGERPRINT:
        config.pop(key, None)
    for key in _TRAINER_NOT_IN_FINGERPRINT:
        config.get("trainer", {}).pop(key, None)
    config.get("data", {}).pop("num_workers", None)
    if isinstance(config.get("task"), dict) and config.get("data", {}).get("k_shot") is None:
        for key in _TASK_K_SHOT_ONLY:
            config["task"].pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def completed_run(root: Path, print_: str) -> Path | None:
    """A run directory under `root` whose results.json is completed for this fingerprint: the one it recorded,
    or the one its recorded config has today (a rule that now leaves out a new key such as trainer.train_tokens
    still knows the run; a sweep picks its config files up at each job, its code at the start)."""
    for path in sorted(Path(root).rglob("results.json")):
        results = _read(path)
        if not (results and results.get("status") == "completed"):
            continue
        if results.get("fingerprint") == print_ or _recorded_config_print(results) == print_:
            return path.parent
    return None


def _recorded_config_print(results: dict) -> str | None:
    config = results.get("config")
    return fingerprint(OmegaConf.create(config)) if isinstance(config, dict) else None


def _checkpoint_of(run_dir: Path) -> str | None:
    marker = run_dir / CHECKPOINT_DIR / FINGERPRINT_FILE
    if not (marker.is_file() and (run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()):
        return None
    results = _read(run_dir / "results.json")
    if results is not None and results.get("status") in ("completed", "failed"):
        return None
    return marker.read_text().strip()


def unfinished_run(root: Path, print_: str, exclude: Path) -> Path | None:
    """The newest run directory under `root` with a checkpoint of this fingerprint and no final results."""
    found = [marker.parent.parent for marker in Path(root).rglob(f"{CHECKPOINT_DIR}/{FINGERPRINT_FILE}")]
    found = [d for d in found if d.resolve() != exclude.resolve() and _checkpoint_of(d) == print_]
    return max(found, key=lambda d: (d / CHECKPOINT_DIR / CHECKPOINT_FILE).stat().st_mtime) if found else None


def resumable(run_dir: Path, print_: str) -> Path:
    """`resume=RUN_DIR`: the directory must hold a checkpoint of the same config."""
    run_dir = Path(run_dir)
    found = _checkpoint_of(run_dir)
    if found is None:
        raise SiftError(f"resume={run_dir}: no unfinished run with a checkpoint there")
    if found != print_:
        raise SiftError(f"resume={run_dir}: that run has a different config; rerun it with its own overrides")
    return run_dir


def held_in(run_dir: Path, print_: str) -> str | None:
    """What a job's own directory already holds of this config, before the job starts there.

    None: nothing (start there); "completed": a finished run (skip it); "unfinished": a run with a
    checkpoint (continue it); "restart": a run stopped before its first checkpoint (start it again).
    A run of another config, a failed run or an unreadable results.json is refused: never overwritten.
    """
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    results = _read(results_path)
    if results is None and results_path.exists():
        raise SiftError(f"{results_path} is unreadable; a run directory is never overwritten")
    marker = run_dir / CHECKPOINT_DIR / FINGERPRINT_FILE
    checkpoint = marker.read_text().strip() if marker.is_file() and (marker.parent / CHECKPOINT_FILE).is_file() \
        else None
    if results is None and checkpoint is None:
        return None
    if (results or {}).get("fingerprint", checkpoint) != print_:
        raise SiftError(f"{run_dir} already holds the results of another run (another config); "
                        "it is never overwritten")
    status = results.get("status") if results else None
    if status == "completed":
        return "completed"
    if status == "failed":
        raise SiftError(f"{run_dir} holds a failed run of this config (see its results.json); it is never "
                        "overwritten: remove that directory to run the job again")
    return "unfinished" if checkpoint == print_ else "restart"
