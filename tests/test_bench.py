"""`sift-bench` measures a step of each method as `sift-run` builds it: what the optimizer holds, how many
entries train, and the ratios to full fine-tuning; a causal LM is measured on instruction-tuning batches.
With `--peers` it measures plain loops beside ours and sets each of ours against its peer."""

import json

import pytest
from hydra.core.global_hydra import GlobalHydra

from sift_cli.bench import (add_peer_ratios, add_ratios, eval_markdown, jobs, main, markdown, measure,
                             measure_evaluation, merge_rounds)
from tests.conftest import FIXTURES
from tests.tasks.instruct_helpers import make_data_root

TINY = [f"data.dir={FIXTURES}", "data.k_shot=4"]


def measure_here(*args, **kwargs) -> dict:
    """`measure` runs in a process of its own under sift-bench; here it shares one with other tests."""
    GlobalHydra.instance().clear()
    return measure(*args, **kwargs)


@pytest.fixture(scope="module")
def rows():
    rows = [measure_here("tiny-bert", method, batch=4, seq=32, steps=2, warmup=1, overrides=TINY)
            for method in ("full_ft", "sift", "lora")]
    add_ratios(rows)
    return {row["method"]: row for row in rows}


def test_adamw_holds_two_fp32_values_per_trainable_entry(rows):
    full = rows["full_ft"]
    assert full["trainable_params"] == full["total_params"]
    assert full["optimizer_bytes"] == 2 * 4 * full["trainable_params"]
    assert full["grad_bytes"] == full["param_bytes"]


def test_sift_optimizer_state_covers_only_its_entries_and_the_head(rows):
    sift = rows["sift"]
    assert sift["trainable_params"] < 0.1 * rows["full_ft"]["trainable_params"]
    # m and v per selected entry or head parameter, plus (per tensor) nothing dense
    assert sift["optimizer_bytes"] == 2 * 4 * sift["trainable_params"]
    assert sift["optimizer_bytes_ratio"] == pytest.approx(sift["optimizer_bytes"] / rows["full_ft"]["optimizer_bytes"])


def test_every_row_is_a_ratio_to_full_fine_tuning_and_the_table_says_so(rows):
    assert rows["full_ft"]["step_s_ratio"] == 1.0
    assert all(row["step_s"] > 0 and row["peak_memory_bytes"] > 0 for row in rows.values())
    table = markdown(list(rows.values()), peak_flops=1e10, command="sift-bench --models tiny-bert")
    assert "| tiny-bert | 32 | sift |" in table and "of that peak" in table


def test_pac_counts_its_noise_scales_their_gradients_and_their_adam_state(rows):
    pac = measure_here("tiny-bert", "pac", batch=4, seq=32, steps=2, warmup=1, overrides=TINY)
    theta = pac["trainable_params"]  # every non-embedding tensor, each with a noise scale of its shape
    full = rows["full_ft"]
    priors = pac["param_bytes"] - full["param_bytes"] - 4 * theta  # one prior scale per noisy tensor
    assert 0 < priors < 4 * 1000
    assert pac["grad_bytes"] == 2 * 4 * theta + priors  # θ and p (and b) all have gradients
    assert pac["optimizer_bytes"] == 2 * 4 * theta + 2 * (4 * theta + priors)  # AdamW over θ, Adam over p and b


def test_a_causal_lm_is_measured_on_instruction_batches(tmp_path):
    root = make_data_root(tmp_path / "data")
    row = measure_here("tiny-llama", "full_ft", batch=2, seq=16, steps=1, warmup=1,
                  overrides=[f"data.dir={root}", "data.heldout_size=4", "task.eval.mmlu.enabled=false"])
    assert row["trainable_params"] == row["total_params"] and row["train_flops"] > 0


def test_adamw_state_is_the_same_fused_or_not(rows):
    """The fused kernel keeps m and v as torch's per-tensor AdamW does (its step counters are scalars)."""
    plain = measure_here("tiny-bert", "full_ft", batch=4, seq=32, steps=1, warmup=1,
                         overrides=[*TINY, "trainer.fused_optimizer=false"])
    assert plain["optimizer_bytes"] == rows["full_ft"]["optimizer_bytes"]


def test_peers_run_first_and_just_before_our_method_of_the_same_name():
    assert jobs(["m"], [64], ["sift", "lora", "full_ft"], peers=True) == [
        ("m", 64, "plain", "full_ft"), ("m", 64, "ours", "full_ft"), ("m", 64, "plain", "lora"),
        ("m", 64, "ours", "lora"), ("m", 64, "ours", "sift")]
    assert jobs(["m"], [64, 128], ["sift"], peers=False) == [
        ("m", 64, "ours", "full_ft"), ("m", 64, "ours", "sift"), ("m", 128, "ours", "full_ft"), ("m", 128, "ours", "sift")]


def _row(loop, method, step, cpu=1.0, memory=100, **extra):
    return {"model": "m", "seq": 64, "batch": 4, "loop": loop, "method": method, "step_s": step, "cpu_s": cpu,
            "peak_memory_bytes": memory, "grad_bytes": 8, "optimizer_bytes": 16, "trainable_params": 2, **extra}


def test_rounds_are_merged_into_medians_and_a_failure_in_any_round_fails_the_job():
    rounds = [[_row("ours", "full_ft", 3.0), _row("ours", "lora", 1.0)],
              [_row("ours", "full_ft", 1.0), {**_row("ours", "lora", 1.0), "error": "boom"}],
              [_row("ours", "full_ft", 2.0, cpu=5.0), _row("ours", "lora", 1.0)]]
    full, lora = merge_rounds(rounds)
    assert full["step_s"] == 2.0 and full["step_s_rounds"] == [3.0, 1.0, 2.0] and full["cpu_s"] == 1.0
    assert lora["error"] == "boom"


def test_each_method_is_set_against_its_plain_peer():
    rows = [_row("plain", "full_ft", 0.5, memory=200), _row("ours", "full_ft", 0.55, memory=220),
            _row("plain", "lora", 0.4), _row("ours", "lora", 0.42), _row("ours", "sift", 0.36, memory=50)]
    add_peer_ratios(rows)
    add_ratios(rows)
    _, full, plain_lora, lora, sift = rows
    assert full["peer"] == "full_ft" and full["step_s_vs_peer"] == pytest.approx(1.1)
    assert full["peak_memory_bytes_vs_peer"] == pytest.approx(1.1)
    assert lora["peer"] == "lora" and lora["step_s_vs_peer"] == pytest.approx(1.05)
    assert sift["peer"] == "lora" and sift["step_s_vs_peer"] == pytest.approx(0.9)
    assert sift["peak_memory_bytes_vs_peer"] == pytest.approx(0.5)
    assert "peer" not in plain_lora and "step_s_ratio" not in plain_lora  # plain rows are the references
    assert sift["step_s_ratio"] == pytest.approx(0.36 / 0.55)  # against our full fine-tuning, not the peer's


def test_sift_bench_peers_measures_both_loops_in_one_invocation(tmp_path, capsys):
    main(["--models", "tiny-bert", "--methods", "full_ft", "lora", "--seqs", "16", "--batch", "2", "--steps", "1",
          "--warmup", "0", "--peers", *[f"--override={o}" for o in TINY], "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(row["loop"], row["method"]) for row in rows] == [
        ("plain", "full_ft"), ("ours", "full_ft"), ("plain", "lora"), ("ours", "lora")]
    assert not [row for row in rows if "error" in row]
    ours_full, ours_lora = rows[1], rows[3]
    assert ours_full["trainable_params"] == rows[0]["trainable_params"]
    assert ours_lora["trainable_params"] == rows[2]["trainable_params"] < ours_full["trainable_params"]
    assert ours_lora["step_s_vs_peer"] == pytest.approx(ours_lora["step_s"] / rows[2]["step_s"])
    table = (tmp_path / "bench.md").read_text()
    assert "| tiny-bert | 16 | plain peft loop, lora |" in table and "| plain lora |" in table


def test_evaluation_is_measured_per_test_set(tmp_path):
    root = make_data_root(tmp_path / "data")
    GlobalHydra.instance().clear()
    rows = measure_evaluation("tiny-llama", "lora", [f"data.dir={root}", "data.heldout_size=4",
                                                     "task.eval.generations.prompts=[]", "trainer.eval_tokens=256"])
    assert [row["eval_set"] for row in rows] == ["heldout", "mmlu_0shot", "mmlu_5shot"]
    assert all(row["eval_peak_memory_bytes"] > 0 and row["eval_s"] > 0 and row["eval_tokens"] == 256 for row in rows)
    assert "| tiny-llama | lora | mmlu_5shot | 4 | 256 | - |" in eval_markdown(rows)
