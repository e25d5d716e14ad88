"""The job spec refuses non-finite numbers, also when they arrive as strings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.domains.jobs.spec import TrainingSettings


@pytest.mark.parametrize("value", ["Infinity", "inf", "-inf", "nan", float("inf"), float("nan")])
def test_max_grad_norm_must_be_finite(value) -> None:
    with pytest.raises(ValidationError) as caught:
        TrainingSettings.model_validate({"max_grad_norm": value})
    assert caught.value.errors()[0]["loc"] == ("max_grad_norm",)


def test_a_finite_max_grad_norm_given_as_a_string_is_read() -> None:
    assert TrainingSettings.model_validate({"max_grad_norm": "0.5"}).max_grad_norm == 0.5
