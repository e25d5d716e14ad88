"""Base-model names: one safe path component, checked before the name is used for anything."""

from __future__ import annotations

import pytest

from app.domains.base_models import service as base_models
from app.domains.base_models.errors import InvalidModelName


@pytest.mark.parametrize("name", ["tiny-llama", "smollm2-135m-instruct", "Llama-3.2-1B", "q_2.5", "x" * 128])
def test_ordinary_names_are_accepted(name: str) -> None:
    assert base_models.check_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../evil", "a/b", "a\\b", "a..b", ".hidden", "-flag", "a\nb", "ok\n",
                                  "a\x00b", "a:b", "a b", "x" * 129])
def test_unsafe_names_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidModelName) as caught:
        base_models.check_name(name)
    assert caught.value.param == "name" and caught.value.status_code == 400


def test_register_refuses_an_unsafe_name_before_reading_the_directory(tmp_path) -> None:
    # No session is needed: the name is refused before anything is read or written.
    with pytest.raises(InvalidModelName):
        base_models.register(None, name="../evil", path=tmp_path)  # type: ignore[arg-type]
