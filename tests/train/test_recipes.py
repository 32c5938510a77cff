"""Training recipes: the multistep lr schedule and SGD with Nesterov momentum, and their config checks."""

from __future__ import annotations

import pytest
import torch

from kdfast.config import OptimizerConfig, ScheduleConfig, StageConfig, load_config
from kdfast.errors import ConfigError
from kdfast.train import lr_factor, make_optimizer


def test_multistep_matches_torch_multisteplr_stepped_per_epoch() -> None:
    base, epochs, steps = 0.05, 12, 3
    schedule = ScheduleConfig(name="multistep", milestones=[5, 8, 10], gamma=0.1)
    factor = lr_factor(schedule, epochs, steps, base)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 8, 10], gamma=0.1)
    expected = []
    for _ in range(epochs):
        expected += [optimizer.param_groups[0]["lr"]] * steps
        optimizer.step()
        reference.step()
    assert [base * factor(s) for s in range(epochs * steps)] == pytest.approx(expected, rel=1e-12)
    # the recipe's numbers: 0.05 until epoch 150, then 0.005, 0.0005 from 180, 0.00005 from 210 (0-based)
    recipe = lr_factor(ScheduleConfig(name="multistep", milestones=[150, 180, 210]), 240, 1, base)
    assert [base * recipe(e) for e in (0, 149, 150, 179, 180, 210, 239)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005]
    )


def test_multistep_after_warmup_counts_epochs_from_the_start() -> None:
    factor = lr_factor(
        ScheduleConfig(name="multistep", warmup_epochs=1, milestones=[2], gamma=0.5), 4, 4, 0.1
    )
    assert [factor(s) for s in range(16)] == pytest.approx([0.25, 0.5, 0.75, 1.0] + [1.0] * 4 + [0.5] * 8)


def test_sgd_nesterov_takes_the_nesterov_step() -> None:
    """Sutskever et al. 2013 in PyTorch's form: v <- mu v + g, p <- p - lr (g + mu v), g including weight
    decay wd * p; computed by hand for two steps."""
    stage = StageConfig(
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    )
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = make_optimizer([p], stage, torch.device("cpu"))
    grads = [torch.tensor([0.5, 0.25], dtype=torch.float64), torch.tensor([-1.0, 2.0], dtype=torch.float64)]
    expected, velocity = p.detach().clone(), torch.zeros(2, dtype=torch.float64)
    for grad in grads:
        g = grad + 0.01 * expected
        velocity = 0.9 * velocity + g
        expected = expected - 0.1 * (g + 0.9 * velocity)
        p.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("student.train.schedule.milestones=[180, 150]", "milestones' must list increasing epochs"),
        ("student.train.schedule.milestones=[]", "milestones' must list increasing epochs"),
        ("student.train.optimizer.nesterov=true", "nesterov' needs name: sgd"),
    ],
)
def test_recipe_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(
            None, ["student.train.schedule.name=multistep", "student.train.schedule.milestones=[2]", override]
        )
