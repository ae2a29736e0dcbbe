"""`sift-memory`: the SIFT paper's table, the printed breakdown, one-line errors."""

import json

import pytest

from sift_cli.memory.cli import main, paper_rows


def test_the_paper_s_llama_7b_table_within_a_quarter_percent():
    """The paper counts weights, gradients, fp32 AdamW state and the activations held at the end of the forward,
    in GiB. Its numbers are rounded to 0.01 GiB (0.03% of 16.50); what is left (at most 0.04 GiB, about one
    2048 x 4096 fp32 tensor) is below what any single tensor left out of the model would add; 0.25% allows
    that and no more: counting GB (1e9) instead of GiB, or one more bf16 weight copy, would miss by 7% or more."""
    for row in paper_rows():
        assert row["after_forward_gib"] == pytest.approx(row["paper_gib"], rel=2.5e-3), row
        if row["grad_checkpointing"]:  # the block rebuilt in the backward comes on top (about 1.1 GiB)
            assert 1.0 < row["peak_gib"] - row["after_forward_gib"] < 1.2
        else:
            assert row["peak_gib"] == row["after_forward_gib"]


def test_the_command_prints_a_breakdown_and_json(capsys):
    main(["--model", "llama-7b", "--precision", "bf16", "--seq", "2048", "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    parts = ("weights", "buffers", "gradients", "master_weights", "optimizer", "activations", "recompute")
    assert out["total"] == sum(out[part] for part in parts)
    main(["--paper", "sift-llama7b"])
    assert "| full_ft | no | 111.03 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "tiny-bert", "--method", "s4"], "method=s4 is not modelled"),
    (["--model", "llama-7b", "--method", "adapter"], "supports BERT/RoBERTa encoders only"),
    (["--model", "tiny-bert", "--batch", "0"], "the batch must be at least 1"),
    (["--model", "tiny-bert", "--precision", "fp8"], "argument --precision: invalid choice"),
    ([], "give --model"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sift-memory: error: ") and message in err and err.count("\n") == 1


def test_a_gpu_row_sets_its_peak_against_the_fp32_and_bf16_predictions(capsys):
    """A sift-bench row measured on a GPU under bf16 autocast: its peak allocated memory is set against the
    whole step predicted in fp32 and in bf16 (as `sift-memory --device cuda` predicts it), a CPU row's is not."""
    from sift_cli.memory.cli import compare, validation_markdown

    row = {"model": "tiny-bert", "method": "full_ft", "batch": 2, "seq": 16, "param_bytes": 4045704,
           "grad_bytes": 4045704, "optimizer_bytes": 8091408, "device": "cuda", "peak_memory_bytes": 20 * 2**20}
    predicted = {}
    for precision in ("fp32", "bf16"):
        main(["--model", "tiny-bert", "--method", "full_ft", "--batch", "2", "--seq", "16", "--precision", precision,
              "--device", "cuda", "--adam-dtype", "fp32", "--format", "json"])
        predicted[precision] = json.loads(capsys.readouterr().out)["total"]
    compared = compare(row, 2, {})
    assert compared["peak_fp32"] == (predicted["fp32"], row["peak_memory_bytes"])
    assert compared["peak_bf16"] == (predicted["bf16"], row["peak_memory_bytes"])
    assert predicted["bf16"] < predicted["fp32"]
    assert "peak_bf16" in validation_markdown([compared], "sift-memory --validate")
    cpu = compare({**row, "device": "cpu"}, 2, {})
    assert "peak_fp32" not in cpu and "peak_bf16" not in validation_markdown([cpu], "sift-memory --validate")
