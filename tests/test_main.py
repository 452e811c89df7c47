"""The README main job runs end to end on real text (small overrides for speed)."""

import math

import pytest

from configs import foundation_demo
from t5x_like import main as main_job


@pytest.mark.slow
def test_main_job_forward_on_real_text(devices):
    config = foundation_demo.get_config()
    config.model.num_layers = 1
    config.data.batch_size = 8
    config.data.length = 128
    config.mesh.data = 2
    config.mesh.fsdp = 2
    config.mesh.tensor = -1
    results = main_job.run(config)
    # An untrained model predicts roughly uniformly over the Llama-2 vocabulary.
    assert abs(results["xla"] - math.log(32000)) < 0.5
    assert abs(results["chunked"] - results["xla"]) < 1e-4
    assert results["diff_chunked"] < 1e-4
