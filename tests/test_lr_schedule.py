import numpy as np
import pytest

from sdjax import optim


@pytest.mark.parametrize("decay,end", [("constant", 1e-3), ("linear", 1e-5), ("cosine", 1e-5)])
def test_lr_schedule_warmup_and_decay_endpoints(tiny_config, decay, end):
    tiny_config.optimizer.learning_rate = 1e-3
    tiny_config.optimizer.end_learning_rate = 1e-5
    tiny_config.optimizer.warmup_steps = 10
    tiny_config.optimizer.decay = decay
    tiny_config.train.steps = 100
    schedule = optim.make_lr_schedule(tiny_config)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), end, rtol=1e-5)
    if decay != "constant":
        assert float(schedule(10)) > float(schedule(55)) > float(schedule(100))


def test_no_warmup_starts_at_peak(tiny_config):
    tiny_config.optimizer.warmup_steps = 0
    tiny_config.optimizer.decay = "constant"
    np.testing.assert_allclose(float(optim.make_lr_schedule(tiny_config)(0)), tiny_config.optimizer.learning_rate)
