"""Tests of sparsetrain.models: every registered architecture builds, runs, and has the expected size."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sparsetrain.models import (
    MODEL_REGISTRY,
    MODELS,
    build_model,
    list_models,
    model_spec,
    sample_input,
    takes_tokens,
)

# The architectures that ship; a new one is picked up by the tests below from its registration alone.
BUILT_IN = ("mlp", "mlp-wide", "lenet5", "convbase", "resnet20", "resnet32", "resnet56", "wrn-16-4", "wrn-28-10",
            "mobilenet-v1", "gpt", "vit")  # fmt: skip


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_built_in_models_are_registered_with_an_example_input() -> None:
    assert list(MODELS) == list(BUILT_IN)
    assert list_models()[: len(BUILT_IN)] == list(BUILT_IN)
    assert list_models("resnet*") == ["resnet20", "resnet32", "resnet56"]
    for name in list_models():
        shape = MODEL_REGISTRY.entry(name).meta["example_input"]
        assert len(shape) >= 1 and all(s >= 1 for s in shape)
        assert MODEL_REGISTRY.entry(name).help  # shown in the CLI's help


@pytest.mark.parametrize("name", list_models())
def test_forward_shape(name: str) -> None:
    # Every registered model, on the input it declares (the CIFAR nets at 32x32: fewer pixels would be faster
    # but would not exercise the real downsampling path).
    torch.manual_seed(0)
    shape = MODEL_REGISTRY.entry(name).meta["example_input"]
    model = build_model(name, input_shape=shape, num_classes=7).eval()
    with torch.no_grad():
        out = model(sample_input(name, shape, 7))
    # A language model gives one row of logits per position.
    assert out.shape == ((2, *shape, 7) if takes_tokens(name) else (2, 7))
    assert torch.isfinite(out).all()
    assert model_spec(name.upper(), shape, 7) == {"name": name, "input_shape": list(shape), "num_classes": 7}


def test_old_import_path_is_the_same_zoo() -> None:
    from sparsetrain.train import models as old

    assert old.build_model is build_model and old.MODELS is MODELS and old.model_spec is model_spec


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_lenet5_input_sizes(shape: tuple[int, ...]) -> None:
    model = build_model("lenet5", input_shape=shape, num_classes=10)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet-v1"])
def test_image_nets_accept_any_channel_count(name: str) -> None:
    model = build_model(name, input_shape=(1, 16, 16), num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


def test_training_mode_backward() -> None:
    """BatchNorm nets train on a batch of 2 and every parameter receives a gradient."""
    model = build_model("resnet20", input_shape=(3, 16, 16), num_classes=10)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_counts() -> None:
    assert _count(build_model("mlp", input_shape=(1, 28, 28), num_classes=10)) == 266610
    assert _count(build_model("mlp", input_shape=(784,), num_classes=10)) == 266610
    assert 260_000 <= _count(build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)) <= 280_000
    assert _count(build_model("convbase", input_shape=(1, 40), num_classes=10)) == 5210
    assert 2.7e6 <= _count(build_model("wrn-16-4", input_shape=(3, 32, 32), num_classes=10)) <= 2.8e6


def test_resnet_depths_grow() -> None:
    counts = [_count(build_model(n, input_shape=(3, 32, 32), num_classes=10)) for n in ("resnet20", "resnet32")]
    assert counts[0] < counts[1]


def test_init_follows_global_seed() -> None:
    torch.manual_seed(3)
    a = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    torch.manual_seed(3)
    b = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(ValueError) as info:
        build_model("vgg-42", input_shape=(3, 32, 32), num_classes=10)
    msg = str(info.value)
    assert "unknown model 'vgg-42'" in msg
    for name in list_models():
        assert name in msg
    assert "torchvision:NAME" in msg and "timm:NAME" in msg


def test_shape_mismatch_is_value_error() -> None:
    with pytest.raises(ValueError, match="convbase"):
        build_model("convbase", input_shape=(3, 32, 32), num_classes=10)
    with pytest.raises(ValueError, match="resnet20"):
        build_model("resnet20", input_shape=(1, 40), num_classes=10)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_missing_torchvision_is_value_error() -> None:
    with pytest.raises(ValueError, match="install torchvision"):
        build_model("torchvision:resnet18", input_shape=(3, 32, 32), num_classes=10)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_missing_timm_is_value_error() -> None:
    with pytest.raises(ValueError, match="install timm"):
        build_model("timm:resnet18", input_shape=(3, 32, 32), num_classes=10)


def test_model_spec_round_trip() -> None:
    spec = model_spec("ResNet20", (3, 32, 32), 10)
    spec = json.loads(json.dumps(spec))  # must survive JSON
    assert spec == {"name": "resnet20", "input_shape": [3, 32, 32], "num_classes": 10}
    torch.manual_seed(0)
    a = build_model(**spec)
    torch.manual_seed(0)
    b = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    with pytest.raises(ValueError, match="unknown model"):
        model_spec("nope", (1, 28, 28), 10)
