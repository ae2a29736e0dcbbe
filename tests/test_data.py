"""Reading split files (and naming what is wrong with them) and the LM-BFF few-shot sampler, checked against
LM-BFF's tools/generate_k_shot_data.py re-derived here step for step on TSV lines made from the fixtures."""

import json

import numpy as np
import pandas as pd
import pytest

from sift_cli.data import (BUNDLED_DATA, find_local_split, read_local, sample_k_shot, seeds_before, split_off,
                           whole_sentences)
from sift_cli.errors import SiftError
from sift_cli.models import load_tokenizer
from sift_cli.tasks import build_task
from tests.conftest import FIXTURES, compose_config

LMBFF_SEEDS = [100, 13, 21, 42, 87]  # the script's default --seed, in its order

# Each task's rows as lines of its GLUE train.tsv (header, line), the label in the column the script reads.
TSV = {
    "SST-2": ("sentence\tlabel\n", lambda r: f"{r['sentence']}\t{r['label']}\n"),
    "CoLA": (None, lambda r: f"gj04\t{r['label']}\t\t{r['sentence']}\n"),
    "MRPC": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n",
             lambda r: f"{r['label']}\t{r['idx']}\t{r['idx'] + 1}\t{r['sentence1']}\t{r['sentence2']}\n"),
    "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n",
              lambda r: f"{r['idx']}\tmain-news\tMSRvid\t2012test\t{r['idx']}\tnone\tnone\t{r['sentence1']}\t"
                        f"{r['sentence2']}\t{r['label']:.3f}\n"),
    "MNLI": ("index\tpremise\thypothesis\tgold_label\n",
             lambda r: f"{r['idx']}\t{r['premise']}\t{r['hypothesis']}\t"
                       f"{['entailment', 'neutral', 'contradiction'][r['label']]}\n"),
}
OURS = {"SST-2": "sst2", "CoLA": "cola", "MRPC": "mrpc", "STS-B": "stsb", "MNLI": "mnli"}


def lmbff_label(task, line):
    """get_label of the script: the column each GLUE task keeps its label in; STS-B split at 2.5."""
    fields = line.strip().split("\t")
    if task == "CoLA":
        return fields[1]
    if task == "MRPC":
        return fields[0]
    if task == "STS-B":
        return 0 if float(fields[-1]) < 2.5 else 1
    return fields[-1]


def lmbff_script(task, lines, k, seeds=LMBFF_SEEDS):
    """{seed: (train lines, dev lines)} as the script's main loop makes them, global numpy seeding included."""
    state = np.random.get_state()
    try:
        splits = {}
        for seed in seeds:
            np.random.seed(seed)
            # split_header: CoLA's file has no header and the dataset's own list is shuffled (in place, so the
            # next seed starts from this order); elsewhere lines[1:] is a fresh copy of the file's order
            train_lines = lines if task == "CoLA" else lines[1:]
            np.random.shuffle(train_lines)
            label_list = {}
            for line in train_lines:
                label_list.setdefault(lmbff_label(task, line), []).append(line)
            splits[seed] = ([line for group in label_list.values() for line in group[:k]],
                            [line for group in label_list.values() for line in group[k:2 * k]])
        return splits
    finally:
        np.random.set_state(state)


def fixture_rows(task):
    return [json.loads(line) for line in (FIXTURES / "glue" / OURS[task] / "train.jsonl").read_text().splitlines()]


def tsv_lines(task, rows):
    header, line = TSV[task]
    return ([header] if header else []) + [line(r) for r in rows]


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


@pytest.mark.parametrize("task", list(TSV))
def test_k_shot_rows_and_order_are_lm_bffs(task):
    rows = fixture_rows(task)
    lines = [TSV[task][1](r) for r in rows]
    labels = np.array([r["label"] for r in rows])
    classes = (labels >= 2.5).astype(int) if task == "STS-B" else labels
    chain = LMBFF_SEEDS if task == "CoLA" else []
    expected = lmbff_script(task, tsv_lines(task, rows), k=3)
    class_orders = set()
    for seed in LMBFF_SEEDS:
        train, dev = sample_k_shot(classes, 3, seed, seeds_before(chain, seed))
        assert ([lines[i] for i in train], [lines[i] for i in dev]) == expected[seed]
        class_orders.add(tuple(dict.fromkeys(classes[train])))
    assert len(class_orders) > 1  # some seed puts another class first: sorting the classes would fail here


def test_cola_seeds_follow_the_chained_shuffle():
    rows = fixture_rows("CoLA")
    lines, classes = tsv_lines("CoLA", rows), np.array([r["label"] for r in rows])
    chained = lmbff_script("CoLA", list(lines), k=3)
    for seed in LMBFF_SEEDS:
        alone = lmbff_script("CoLA", tsv_lines("CoLA", rows), k=3, seeds=[seed])[seed]
        train, dev = sample_k_shot(classes, 3, seed)
        assert ([lines[i] for i in train], [lines[i] for i in dev]) == alone
        if seed != LMBFF_SEEDS[0]:
            assert alone != chained[seed]  # the chain changes the sample
    assert seeds_before(LMBFF_SEEDS, 42) == [100, 13, 21]
    assert seeds_before(LMBFF_SEEDS, 100) == [] and seeds_before(LMBFF_SEEDS, 7) == [] and seeds_before(None, 42) == []


@pytest.mark.parametrize("task, seed", [("SST-2", 13), ("STS-B", 87), ("CoLA", 42), ("CoLA", 7), ("MNLI", 21)])
def test_a_k_shot_run_trains_on_lm_bffs_rows_in_their_order(task, seed):
    """Through the task's config (STS-B's 2.5 split, CoLA's seed chain): the training and dev sets' tokens."""
    cfg = compose_config([f"task=glue/{OURS[task]}", f"data.dir={FIXTURES}", "data.k_shot=3", f"data.seed={seed}",
                          "model=tiny-bert"])
    tokenizer = load_tokenizer(cfg.model)
    data = build_task(cfg, tokenizer).load()
    rows = fixture_rows(task)
    by_line = {TSV[task][1](r): r for r in rows}
    # the script run with its default seeds (CoLA: chained); a seed of none of them, run alone
    seeds = LMBFF_SEEDS if seed in LMBFF_SEEDS else [seed]
    train, dev = lmbff_script(task, tsv_lines(task, rows), k=3, seeds=seeds)[seed]
    for got, lines in ((data.train, train), (data.select.dataset, dev)):
        texts = [[by_line[line][c] for line in lines] for c in cfg.task.text_columns]
        expected = tokenizer(*texts, truncation=True, max_length=128)["input_ids"]
        assert [ids.tolist() for ids in got["input_ids"]] == expected
    assert data.info["k_shot_shuffle_seeds"] == seeds_before(cfg.task.k_shot_seed_chain, seed) + [seed]
    assert len(data.train) == 3 * (2 if task == "STS-B" else cfg.task.num_labels)


def test_whole_sentences_are_the_rows_no_other_row_holds_as_a_run_of_words():
    texts = ["the film is good .", "the film", "is good", "a bad film .", "film", "the film is good .", "good .",
             "he film"]
    # "he film" is inside "the film" as characters, not as words; a repeated sentence stays twice
    assert whole_sentences(texts).tolist() == [0, 3, 5, 7]


def test_glue_s_sst2_holds_its_sentences_and_their_phrases(real_data):
    texts = read_local(real_data / "glue" / "sst2" / "train.jsonl")["sentence"]
    validation = read_local(real_data / "glue" / "sst2" / "validation.jsonl")["sentence"]
    sentences = whole_sentences(texts)
    assert len(texts) == 67349 and len(sentences) == 6885  # LM-BFF's SST-2 train: 6,920 sentences

    def mean_words(rows):
        return sum(len(t.split()) for t in rows) / len(rows)

    assert mean_words(texts) < 10 and abs(mean_words([texts[i] for i in sentences]) - mean_words(validation)) < 0.5


def test_sst2_s_k_shot_rows_are_lm_bffs_rows_from_the_sentences_of_a_file_of_phrases_too(tmp_path):
    """GLUE's SST-2 lists each sentence's phrases beside it; the k-shot draw is LM-BFF's script run on the
    sentences alone (its SST-2 train), in their order."""
    sentences = fixture_rows("SST-2")
    rows = []
    for r in sentences:  # each sentence, then two of its phrases with their own labels, as the treebank has
        words = r["sentence"].split()
        rows += [r, {**r, "sentence": " ".join(words[-3:]), "label": 1 - r["label"]},
                 {**r, "sentence": " ".join(words[:2]), "label": r["label"]}]
    folder = tmp_path / "glue" / "sst2"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "validation.jsonl").write_text((FIXTURES / "glue" / "sst2" / "validation.jsonl").read_text())
    overrides = [f"data.dir={tmp_path}", "task=glue/sst2", "data.k_shot=3", "data.seed=13", "model=tiny-bert"]
    cfg = compose_config(overrides)
    tokenizer = load_tokenizer(cfg.model)
    data = build_task(cfg, tokenizer).load()
    by_line = {TSV["SST-2"][1](r): r for r in sentences}
    train, dev = lmbff_script("SST-2", tsv_lines("SST-2", sentences), k=3)[13]
    for got, lines in ((data.train, train), (data.select.dataset, dev)):
        expected = tokenizer([by_line[line]["sentence"] for line in lines], truncation=True, max_length=128)
        assert [ids.tolist() for ids in got["input_ids"]] == expected["input_ids"]
    assert data.info["k_shot_pool"] == "whole_sentences" and data.info["k_shot_pool_rows"] == len(sentences)
    every_row = build_task(compose_config([*overrides, "task.k_shot_pool=all"]), tokenizer).load()
    assert every_row.info["k_shot_pool"] == "all" and "k_shot_pool_rows" not in every_row.info
    assert [ids.tolist() for ids in every_row.train["input_ids"]] != [ids.tolist() for ids in data.train["input_ids"]]
    with pytest.raises(SiftError, match="task.k_shot_pool must be one of all, whole_sentences, got 'some'"):
        build_task(compose_config([*overrides, "task.k_shot_pool=some"]), tokenizer).load()


def test_k_shot_settings_are_in_the_fingerprint_only_of_k_shot_runs():
    from sift_cli.runs import fingerprint

    def print_of(*overrides):
        return fingerprint(compose_config(["task=glue/sst2", *overrides]))

    assert print_of("data.k_shot=null") == print_of("data.k_shot=null", "task.k_shot_pool=all")
    assert print_of("data.k_shot=16") != print_of("data.k_shot=16", "task.k_shot_pool=all")


@pytest.mark.parametrize("chain", ["5", "[13,x]", "[13,true]"])
def test_a_bad_seed_chain_is_one_line(chain):
    cfg = compose_config(["task=glue/cola", f"data.dir={FIXTURES}", "model=tiny-bert",
                          f"task.k_shot_seed_chain={chain}"])
    with pytest.raises(SiftError, match="task.k_shot_seed_chain must be a list of integer seeds or null"):
        build_task(cfg, load_tokenizer(cfg.model)).load()


def test_split_off_is_disjoint_and_complete():
    kept, held = split_off(20, 5, seed=0)
    assert len(held) == 5 and sorted(np.concatenate([kept, held]).tolist()) == list(range(20))
    with pytest.raises(SiftError):
        split_off(20, 20, seed=0)
