"""Reading task data from a local data root or the Hugging Face hub, and the few-shot sampler.

A local data root holds `glue/TASK/SPLIT.{jsonl,parquet,csv}` in the schema of the hub's `nyu-mll/glue`,
so the same rows come back either way. The package ships SST-2 in that layout (sift_cli/assets/data, made
by scripts/bundle_sst2.py), so that the default job runs with neither a data root nor the hub; it is read
only when both are missing.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset

from sift_cli.errors import SiftError

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()

log = logging.getLogger("sift_cli")

LOCAL_FORMATS = {".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
BUNDLED_DATA = Path(str(files("sift_cli"))) / "assets" / "data"  # a data root of what the package ships


def find_local_split(data_dir: str | Path, sub_dir: str, split: str) -> Path:
    folder = Path(data_dir) / sub_dir
    for suffix in LOCAL_FORMATS:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise SiftError(f"missing data file: {folder / split}.jsonl (or .parquet / .csv) for split '{split}'")


def _locate_bad_json_line(path: Path) -> str:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{number}: not valid JSON ({err.msg})"
            if not isinstance(row, dict):
                return f"{path}:{number}: a row must be a JSON object"
    return f"{path}: unreadable"


def read_local(path: Path) -> Dataset:
    """Read one split file; a malformed or empty file fails naming the file (and the line, for JSON lines)."""
    if path.stat().st_size == 0:
        raise SiftError(f"{path}: the file is empty")
    try:
        ds = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several types
        if path.suffix == ".jsonl":
            raise SiftError(_locate_bad_json_line(path)) from None
        raise SiftError(f"{path}: cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if len(ds) == 0:
        raise SiftError(f"{path}: the file has no rows")
    return ds


def load_split(task, split: str, data_dir: str | None) -> tuple[Dataset, str]:
    """One split of a task and where it came from (a file, for error messages, or the hub id).

    From the local data root when one is set, else from the hub, else from the copy bundled with the
    package (the default job's SST-2 only); a log line says which.
    """
    if data_dir:
        path = find_local_split(data_dir, task.local_dir, split)
        log.info("data: %s %s from the local data root (%s)", task.name, split, path)
        return read_local(path), str(path)
    try:
        ds = datasets.load_dataset(task.hub_id, task.hub_subset, split=split)
    except Exception as err:
        bundled = BUNDLED_DATA / task.local_dir / f"{split}.parquet"
        if not bundled.is_file():
            raise SiftError(
                f"cannot load split '{split}' of {task.hub_id}/{task.hub_subset} from the hub "
                f"({type(err).__name__}); set data.dir or SIFT_DATA_DIR to a local data root"
            ) from None
        log.info("data: %s %s from the copy bundled with sift-run (%s); no data root, and the hub is "
                 "unavailable (%s)", task.name, split, bundled, type(err).__name__)
        return read_local(bundled), str(bundled)
    log.info("data: %s %s from the hub (%s/%s)", task.name, split, task.hub_id, task.hub_subset)
    return ds, f"{task.hub_id}/{task.hub_subset}:{split}"


def line_of(source: str, index: int) -> str:
    """Where row `index` of a source stands, for error messages (jsonl: line; csv: line after the header)."""
    if source.endswith(".jsonl"):
        return f"{source}:{index + 1}"
    if source.endswith(".csv"):
        return f"{source}:{index + 2}"
    return f"{source} row {index}"


def sample_k_shot(classes: np.ndarray, k: int, seed: int, earlier_seeds=()) -> tuple[np.ndarray, np.ndarray]:
    """LM-BFF's few-shot split (tools/generate_k_shot_data.py), row for row and in its order.

    The rows are shuffled with numpy's legacy generator seeded with `seed` (the script's
    `np.random.seed(seed); np.random.shuffle(lines)`); then, class by class in the order the classes first
    appear in the shuffled rows, the first k rows of the class train and the next k are the dev set.
    `earlier_seeds` are shuffles applied first, in order: the script shuffles a header-less file (CoLA) in
    place, so there each seed starts from the order the seeds run before it left.

    `classes` holds each row's class (for regression, its bucket). Returns row indices (train, dev), each in
    the script's order.
    """
    if k <= 0:
        raise SiftError(f"data.k_shot must be a positive integer or null, got {k}")
    order = np.arange(len(classes))
    for shuffle_seed in (*earlier_seeds, seed):
        # shuffling a list in place with this generator moves the row at position p[i] to position i
        order = order[np.random.RandomState(int(shuffle_seed)).permutation(len(classes))]
    shuffled = classes[order]
    _, first_seen = np.unique(shuffled, return_index=True)
    train, dev = [], []
    for label in shuffled[np.sort(first_seen)]:
        rows = order[shuffled == label]
        if len(rows) < 2 * k:
            raise SiftError(
                f"data.k_shot={k} needs {2 * k} rows of class {label} (k train + k dev), but the training "
                f"split has only {len(rows)}"
            )
        train.extend(rows[:k])
        dev.extend(rows[k : 2 * k])
    return np.array(train), np.array(dev)


def whole_sentences(texts: list[str]) -> np.ndarray:
    """The rows whose text is no proper run of words of another row's, in their order: from a treebank's
    phrase-level file (GLUE's SST-2 lists every phrase of each sentence's parse tree), its whole sentences.

    Longest first, each row not already known to be inside a longer one marks the rows its shorter runs of
    words are; a row inside a marked row is inside its container too, so only those rows are expanded.
    """
    words = [text.split() for text in texts]
    present = {" ".join(w) for w in words}
    inside: set[str] = set()
    for i in sorted(range(len(words)), key=lambda i: -len(words[i])):
        row = words[i]
        if " ".join(row) in inside:
            continue
        for start in range(len(row)):
            for end in range(start + 1, len(row) + 1 - (start == 0)):
                run = " ".join(row[start:end])
                if run in present:
                    inside.add(run)
    return np.array([i for i, w in enumerate(words) if " ".join(w) not in inside], dtype=int)


def seeds_before(chain, seed: int) -> list[int]:
    """The shuffles LM-BFF's script ran on a header-less file before `seed`: the seeds ahead of it in `chain`
    (the script's --seed list, in order); none when `seed` is not in the chain or there is no chain."""
    chain = [int(s) for s in chain or []]
    return chain[: chain.index(seed)] if seed in chain else []


def split_off(n_rows: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random slice of `size` rows held out of a split: (kept, held_out)."""
    if not 0 < size < n_rows:
        raise SiftError(f"data.heldout_size must be between 1 and {n_rows - 1} for this split, got {size}")
    order = np.random.RandomState(seed).permutation(n_rows)
    return np.sort(order[size:]), np.sort(order[:size])
