"""Bad input is a one-line UserError that names what is valid."""
from __future__ import annotations

import pytest

from evomerge.optimizers import make, names
from evomerge.records import Objective, UserError

OBJ = [Objective("loss", "min")]
B = [[0.0, 1.0]] * 3


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_unknown_optimizer_lists_the_valid_ones():
    with pytest.raises(UserError) as e:
        make("adam", bounds=B, objectives=OBJ, seed=0)
    assert all(n in one_line(e) for n in names())


def test_inverted_bounds_name_the_dimension():
    with pytest.raises(UserError) as e:
        make("cmaes", bounds=[[0, 1], [2, 1]], objectives=OBJ, seed=0)
    assert "dimension 1" in one_line(e)


@pytest.mark.parametrize("name,option", [("cmaes", "popsize"), ("nsga2", "popsize"), ("m2n2", "archive_size")])
def test_population_below_two(name, option):
    with pytest.raises(UserError) as e:
        make(name, bounds=B, objectives=OBJ, seed=0, **{option: 1})
    assert ">= 2" in one_line(e)


def test_direction_neither_min_nor_max():
    with pytest.raises(UserError) as e:
        Objective("acc", "up")
    assert "min" in one_line(e) and "max" in one_line(e)


def test_unknown_option_lists_the_valid_options():
    with pytest.raises(UserError) as e:
        make("cmaes", bounds=B, objectives=OBJ, seed=0, sigma=0.3)
    assert "sigma0" in one_line(e)


@pytest.mark.parametrize(
    "name,options,needle",
    [("optuna", {"sampler": "grid"}, "tpe"), ("nevergrad", {"optimizer": "Nope"}, "NGOpt"), ("m2n2", {"interpolation": "cubic"}, "slerp")],
)
def test_unknown_back_end_choices(name, options, needle):
    with pytest.raises(UserError) as e:
        make(name, bounds=B, objectives=OBJ, seed=0, **options)
    assert needle in one_line(e)


def test_cli_lists_optimizers_and_spaces_with_their_options(capsys):
    from evomerge import search_spaces
    from evomerge.cli import search_options

    search_options()
    out = capsys.readouterr().out
    for name in names() + search_spaces.names():
        assert f"  {name}:" in out
    assert "archive_size=20" in out and "granularity=1" in out
