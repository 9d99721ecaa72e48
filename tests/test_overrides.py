"""`NAME=VALUE` overrides: typed by the field, booleans parsed as words, clear errors."""

from dataclasses import dataclass

import pytest

from models.overrides import parse_assignments, with_overrides


@dataclass
class _Config:
    flag: bool = True
    width: int = 8
    rate: float = 0.5
    dims: tuple[int, ...] = (4, 2)
    name: str = "a"


def test_booleans_are_parsed_as_words_not_by_truthiness() -> None:
    assert parse_assignments(_Config(), ["flag=false"]) == {"flag": False}
    assert parse_assignments(_Config(flag=False), ["flag=on"]) == {"flag": True}
    with pytest.raises(ValueError, match="not true or false"):
        parse_assignments(_Config(), ["flag=maybe"])


def test_values_take_the_type_of_the_field() -> None:
    config = with_overrides(_Config(), ["width=16", "rate = 0.25", "dims=8,4,2", "name=b"])
    assert config == _Config(flag=True, width=16, rate=0.25, dims=(8, 4, 2), name="b")


def test_dashes_in_names_are_accepted() -> None:
    @dataclass
    class Dashed:
        some_knob: int = 1

    assert with_overrides(Dashed(), ["some-knob=3"]).some_knob == 3


def test_unknown_names_and_bad_values_say_what_exists() -> None:
    with pytest.raises(ValueError, match="one of: dims, flag, name, rate, width"):
        parse_assignments(_Config(), ["depth=3"])
    with pytest.raises(ValueError, match="width: 'wide' is not a valid int"):
        parse_assignments(_Config(), ["width=wide"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_assignments(_Config(), ["width"])
