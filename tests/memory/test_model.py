"""The memory model: predicted bytes against real builds, and the SIFT paper's sparse layout."""

import pytest

from sift_cli.memory.measure import measure_step
from sift_cli.memory.model import KNOWN_ARCHITECTURES, Setting, load_architecture, predict
from tests.conftest import FAST, make_job

TINY_STEP = {"batch": 4, "seq": 64}
LLAMA_7B = KNOWN_ARCHITECTURES["llama-7b"]
PAPER = {"batch": 1, "seq": 2048, "precision": "bf16", "attention": "eager"}


@pytest.mark.parametrize("method", ["full_ft", "lora", "sift"])
def test_state_bytes_equal_what_a_tiny_bert_build_holds(tmp_path, method):
    job = make_job(tmp_path, [*FAST, "task=glue/mrpc", f"method={method}"])
    measured = measure_step(job.trainer, **TINY_STEP)
    # fp32 on a CPU, where torch's AdamW keeps m and v in the parameters' dtype
    predicted = predict(load_architecture("tiny-bert"), method, Setting(**TINY_STEP, device="cpu", adam_dtype="weights"))
    assert predicted.weights == measured["param_bytes"]
    assert predicted.buffers == measured["buffer_bytes"]
    assert predicted.gradients == measured["grad_bytes"]
    assert predicted.optimizer == measured["optimizer_bytes"]
    # exact but for the token-type ids and the loss's few scalars (under 1 KB of 1.5 MB)
    assert predicted.activations == pytest.approx(measured["activation_bytes"], rel=1e-3)


def test_sift_s_paper_layout_costs_ten_bytes_per_trained_entry():
    setting = Setting(**PAPER, sparse_layout="paper")
    sift = predict(LLAMA_7B, "sift", setting, {"sparse_rate": 0.05})
    full = predict(LLAMA_7B, "full_ft", setting)
    assert sift.trainable_params == int(0.05 * full.total_params)
    assert sift.gradients + sift.optimizer == 10 * sift.trainable_params
    assert sift.activations == full.activations  # every parameter has trainable entries
