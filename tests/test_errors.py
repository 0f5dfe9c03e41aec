"""Errors are clear and early (docs/contracts.md, contract 9): a ValueError naming the bad value and what is allowed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsetrain


def _model() -> nn.Module:
    # Parameters: 0.weight (16, 8), 0.bias, 2.weight (4, 16), 2.bias.
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _message(excinfo) -> str:
    return str(excinfo.value)


# ----------------------------------------------------------------------------------------------- sparsity
@pytest.mark.parametrize(("bad", "shown"), [(-0.1, "-0.1"), (1.0, "1.0"), (1.5, "1.5"), ("high", "'high'")])
def test_bad_sparsity(bad, shown):
    with pytest.raises(ValueError) as info:
        sparsetrain.create("gmp", _model(), sparsity=bad, total_steps=100)
    message = _message(info)
    assert shown in message
    assert "[0, 1)" in message


@pytest.mark.parametrize("method", ["acdc", "magnitude", "static"])
def test_bad_sparsity_other_methods(method):
    with pytest.raises(ValueError, match=r"\[0, 1\)") as info:
        sparsetrain.create(method, _model(), sparsity=1.5, total_steps=100)
    assert "1.5" in _message(info)


def test_missing_sparsity():
    with pytest.raises(ValueError, match="sparsity="):
        sparsetrain.create("gmp", _model(), total_steps=100)


# ----------------------------------------------------------------------------------------------- N:M
def test_n_greater_than_m():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("acdc", _model(), mask_type="5:4", total_steps=100)
    message = _message(info)
    assert "'5:4'" in message
    assert "N <= M" in message


def test_malformed_mask_type():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("acdc", _model(), sparsity=0.5, mask_type="2of4", total_steps=100)
    message = _message(info)
    assert "'2of4'" in message
    assert "unstructured" in message and "2:4" in message


def test_nm_input_dim_not_multiple_of_m():
    # Linear(6, 8).weight has shape (8, 6): 6 inputs is not a multiple of 4.
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError) as info:
        sparsetrain.create("acdc", model, mask_type="2:4", total_steps=100)
    message = _message(info)
    assert "'0.weight'" in message
    assert "(8, 6)" in message
    assert "multiple of 4" in message
    assert "exclude" in message
    # Excluding that layer makes it valid.
    sparsifier = sparsetrain.create("acdc", model, mask_type="2:4", total_steps=100, exclude="0.weight")
    assert list(sparsifier.params) == ["2.weight"]


def test_nm_sparsity_disagreement():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("acdc", _model(), sparsity=0.9, mask_type="2:4", total_steps=100)
    message = _message(info)
    assert "0.9" in message and "0.5" in message


def test_gmp_rejects_nm():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("gmp", _model(), mask_type="2:4", total_steps=100)
    message = _message(info)
    assert "'gmp'" in message
    assert "'2:4'" in message
    assert "N:M" in message


# ----------------------------------------------------------------------------------------------- selection
def test_include_pattern_matching_nothing():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("magnitude", _model(), sparsity=0.5, include="features.*.weight")
    message = _message(info)
    assert "'features.*.weight'" in message
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert name in message


def test_one_of_several_include_patterns_matching_nothing():
    with pytest.raises(ValueError, match="'nope'"):
        sparsetrain.create("magnitude", _model(), sparsity=0.5, include=["0.weight", "nope"])


def test_nothing_to_sparsify_biases_and_norms_only():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4))
    with pytest.raises(ValueError) as info:
        sparsetrain.create("magnitude", model, sparsity=0.5)
    message = _message(info)
    assert "nothing to sparsify" in message
    assert "0.weight (4,)" in message and "1.bias (4,)" in message


def test_nothing_to_sparsify_everything_excluded():
    with pytest.raises(ValueError, match="nothing to sparsify"):
        sparsetrain.create("magnitude", _model(), sparsity=0.5, exclude="*.weight")


def test_model_not_a_module():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        sparsetrain.create("magnitude", {"w": torch.zeros(3, 3)}, sparsity=0.5)


# ----------------------------------------------------------------------------------------------- methods, options
def test_unknown_method():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("acdcc", _model(), sparsity=0.9, total_steps=100)
    message = _message(info)
    assert "'acdcc'" in message
    for name in ("acdc", "gmp", "magnitude", "static", "dense"):
        assert name in message


def test_unknown_option():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("acdc", _model(), sparsity=0.9, total_steps=100, warmpu=0.1)
    message = _message(info)
    assert "'warmpu'" in message
    assert "warmup" in message.replace("'warmpu'", "")
    for option in ("compressed", "decompressed", "final", "distribution"):
        assert option in message


def test_unknown_option_of_another_method():
    # 'warmup' belongs to AC/DC, not GMP.
    with pytest.raises(ValueError) as info:
        sparsetrain.create("gmp", _model(), sparsity=0.9, total_steps=100, warmup=0.1)
    message = _message(info)
    assert "'warmup'" in message
    assert "start" in message and "end" in message


def test_unknown_distribution_via_create():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("magnitude", _model(), sparsity=0.5, distribution="random")
    message = _message(info)
    assert "'random'" in message
    for name in ("global", "uniform", "erk"):
        assert name in message


# ----------------------------------------------------------------------------------------------- schedules
def test_acdc_phases_do_not_fit():
    with pytest.raises(ValueError) as info:
        sparsetrain.create(
            "acdc",
            _model(),
            sparsity=0.9,
            unit="steps",
            total_steps=100,
            warmup=60,
            compressed=5,
            decompressed=5,
            final=50,
        )
    message = _message(info)
    assert "do not fit" in message
    assert "60" in message and "50" in message and "100" in message


def test_acdc_phases_do_not_fit_with_default_cycle_lengths():
    # Left-out lengths are proportions of the run whatever the unit, never 0.05 read as steps.
    with pytest.raises(ValueError) as info:
        sparsetrain.create("acdc", _model(), sparsity=0.9, unit="steps", total_steps=100, warmup=60, final=50)
    message = _message(info)
    assert "do not fit" in message
    assert "60" in message and "50" in message and "100" in message


def test_acdc_without_total_steps():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("acdc", _model(), sparsity=0.9)
    message = _message(info)
    assert "total_steps" in message
    assert "total_epochs" in message and "steps_per_epoch" in message


def test_acdc_epochs_without_steps_per_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        sparsetrain.create("acdc", _model(), sparsity=0.9, total_epochs=100)


def test_acdc_epoch_unit_without_steps_per_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch") as info:
        sparsetrain.create("acdc", _model(), sparsity=0.9, total_steps=1000, unit="epochs")
    assert "warmup" in _message(info)


def test_gmp_end_beyond_total():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("gmp", _model(), sparsity=0.9, total_steps=100, start=0.2, end=1.5)
    message = _message(info)
    assert "end=1.5" in message
    assert "150" in message and "100" in message
    assert "start <= end <= total" in message


def test_gmp_end_beyond_total_in_steps():
    with pytest.raises(ValueError, match="end=120"):
        sparsetrain.create("gmp", _model(), sparsity=0.9, total_steps=100, unit="steps", start=10, end=120)


def test_gmp_start_after_end():
    with pytest.raises(ValueError, match="start=0.8"):
        sparsetrain.create("gmp", _model(), sparsity=0.9, total_steps=100, start=0.8, end=0.5)


def test_gmp_without_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        sparsetrain.create("gmp", _model(), sparsity=0.9)


def test_gmp_initial_sparsity_above_final():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("gmp", _model(), sparsity=0.5, total_steps=100, initial_sparsity=0.7)
    assert "0.7" in _message(info)


def test_bad_unit():
    with pytest.raises(ValueError) as info:
        sparsetrain.create("acdc", _model(), sparsity=0.9, total_steps=100, unit="epoch")
    message = _message(info)
    assert "'epoch'" in message
    assert "fraction" in message and "epochs" in message and "steps" in message


# ----------------------------------------------------------------------------------------------- state, optimizer
def test_load_state_from_another_method():
    model = _model()
    acdc = sparsetrain.create("acdc", model, sparsity=0.9, total_steps=100)
    gmp = sparsetrain.create("gmp", model, sparsity=0.9, total_steps=100)
    with pytest.raises(ValueError) as info:
        gmp.load_state_dict(acdc.state_dict())
    message = _message(info)
    assert "'acdc'" in message and "'gmp'" in message


def test_load_state_from_another_model_with_other_parameters():
    a = sparsetrain.create("magnitude", _model(), sparsity=0.5)
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    b = sparsetrain.create("magnitude", other, sparsity=0.5)
    with pytest.raises(ValueError) as info:
        b.load_state_dict(a.state_dict())
    message = _message(info)
    assert "does not match" in message
    assert "4.weight" in message
    # Nothing was loaded: b's masks keep their own shapes and count.
    assert set(b.masks) == {"0.weight", "2.weight", "4.weight"}


def test_load_state_from_another_model_with_other_shapes():
    a = sparsetrain.create("magnitude", _model(), sparsity=0.5)
    wider = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    b = sparsetrain.create("magnitude", wider, sparsity=0.5)
    with pytest.raises(ValueError) as info:
        b.load_state_dict(a.state_dict())
    message = _message(info)
    assert "'0.weight'" in message
    assert "(16, 8)" in message and "(32, 8)" in message


def test_attach_to_optimizer_without_the_parameters():
    model = _model()
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.5)
    optimizer = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        sparsifier.attach(optimizer)
    message = _message(info)
    assert "0.weight" in message and "2.weight" in message


def test_attach_to_optimizer_missing_one_parameter():
    model = _model()
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.5)
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        sparsifier.attach(optimizer)
    message = _message(info)
    assert "2.weight" in message
    assert "0.weight" not in message
    # Nothing was hooked: a full optimizer still attaches.
    sparsifier.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_attach_twice():
    model = _model()
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.attach(optimizer)
    with pytest.raises(ValueError, match="already attached"):
        sparsifier.attach(optimizer)


def test_left_out_lengths_are_proportions_of_the_run_in_any_unit():
    model = _model()
    in_epochs = sparsetrain.create("acdc", model, sparsity=0.9, total_epochs=100, steps_per_epoch=100, unit="epochs")
    assert [(p.start, p.end) for p in in_epochs.timeline()][:3] == [(0, 1000), (1000, 1500), (1500, 2000)]
    gmp = sparsetrain.create("gmp", _model(), sparsity=0.9, unit="steps", total_steps=100)
    assert (gmp.start_step, gmp.end_step) == (20, 80)
