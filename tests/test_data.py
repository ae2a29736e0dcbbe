"""Reading split files (and naming what is wrong with them) and the LM-BFF few-shot sampler."""

import json

import numpy as np
import pandas as pd
import pytest

from sift_cli.data import BUNDLED_DATA, find_local_split, read_local, sample_k_shot, split_off
from sift_cli.errors import SiftError


def test_jsonl_parquet_and_csv_give_the_same_rows(fixture_data, tmp_path):
    source = fixture_data / "glue" / "mrpc" / "train.jsonl"
    frame = pd.read_json(source, lines=True)
    folder = tmp_path / "glue" / "mrpc"
    folder.mkdir(parents=True)
    frame.to_parquet(folder / "train.parquet")
    frame.to_csv(folder / "validation.csv", index=False)
    rows = read_local(source).to_pandas()
    for split in ("train", "validation"):
        other = read_local(find_local_split(tmp_path, "glue/mrpc", split)).to_pandas()
        pd.testing.assert_frame_equal(rows[other.columns], other, check_dtype=False)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_the_bundled_sst2_holds_the_rows_of_the_data_root(real_data, split):
    bundled = read_local(find_local_split(BUNDLED_DATA, "glue/sst2", split))
    original = read_local(real_data / "glue" / "sst2" / f"{split}.jsonl")
    assert bundled.features == original.features
    assert bundled.to_dict() == original.to_dict()


def test_missing_split_names_the_file(tmp_path):
    with pytest.raises(SiftError, match=r"glue/qnli/train\.jsonl"):
        find_local_split(tmp_path, "glue/qnli", "train")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"sentence": "fine", "label": 1}) + "\n{broken\n")
    with pytest.raises(SiftError, match=r"train\.jsonl:2: not valid JSON"):
        read_local(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("")
    with pytest.raises(SiftError, match="empty"):
        read_local(path)


def test_k_shot_sampler_takes_k_per_class_with_a_disjoint_dev_set():
    classes = np.array([0] * 30 + [1] * 20 + [2] * 12)
    train, dev = sample_k_shot(classes, k=4, seed=13)
    assert len(set(train) & set(dev)) == 0
    for label in (0, 1, 2):
        assert (classes[train] == label).sum() == 4
        assert (classes[dev] == label).sum() == 4


def test_k_shot_sampler_is_deterministic_per_seed():
    classes = np.array([0, 1] * 50)
    a, b = sample_k_shot(classes, 8, seed=21), sample_k_shot(classes, 8, seed=21)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other = sample_k_shot(classes, 8, seed=42)
    assert not np.array_equal(np.sort(a[0]), np.sort(other[0]))


def test_k_larger_than_a_class_is_refused():
    classes = np.array([0] * 10 + [1] * 5)
    with pytest.raises(SiftError, match="k_shot=3 needs 6 rows of class 1.*only 5"):
        sample_k_shot(classes, 3, seed=1)


def test_split_off_is_disjoint_and_complete():
    kept, held = split_off(20, 5, seed=0)
    assert len(held) == 5 and sorted(np.concatenate([kept, held]).tolist()) == list(range(20))
    with pytest.raises(SiftError):
        split_off(20, 20, seed=0)
