"""Sparse transfer (Iofinova et al., CVPR 2022): --init-from, the class subset, and the transfer method."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.errors import CheckpointError, ConfigError, DataError
from sparsetrain.train import checkpoint, loop
from sparsetrain.train.config import resolve
from sparsetrain.train.data import load_dataset, parse_classes


def _config(tmp_path, name: str, **overrides) -> dict:
    settings = dict(dataset="digits", model="mlp", sparsity=0.9, epochs=2, batch_size=64, threads=1,
                    progress=False, plots=False, out=str(tmp_path / name))  # fmt: skip
    return resolve(None, {**settings, **overrides})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """GMP at 90% on digits 0-4: the sparse pretrained model."""
    tmp = tmp_path_factory.mktemp("upstream")
    loop.Run(_config(tmp, "gmp", method="gmp", classes="0-4")).run()
    return tmp / "gmp" / "sparse_final.pt"


# ---------------------------------------------------------------------------------------------------- classes
def test_parse_classes_forms_and_mistakes():
    assert parse_classes("5-9") == [5, 6, 7, 8, 9]
    assert (
        parse_classes("0,2,4") == [0, 2, 4] and parse_classes([7, 3]) == [7, 3] and parse_classes("1-2,8") == [1, 2, 8]
    )
    for bad in ("9-5", "a-b", "1,1", "-1", ""):
        with pytest.raises(ValueError, match="classes"):
            parse_classes(bad)


def test_class_subset_is_relabelled_in_every_split():
    full = load_dataset("digits", seed=0)
    part = load_dataset("digits", seed=0, classes="5-9")
    assert part.num_classes == 5
    for split in (part.train, part.val, part.test):
        assert set(split.tensors[1].tolist()) == {0, 1, 2, 3, 4}
    test_labels = full.test.tensors[1]
    assert len(part.test) == int((test_labels >= 5).sum())
    # relabelled in order: class 5 is 0 now, class 9 is 4
    counts = [int((part.test.tensors[1] == k).sum()) for k in range(5)]
    assert counts == [int((test_labels == c).sum()) for c in range(5, 10)]


def test_class_subset_mistakes_are_clear():
    with pytest.raises(ConfigError, match="classes must be a range"):
        resolve(None, {"classes": "nine"})
    with pytest.raises(DataError, match="digits has classes 0-9; classes '8-12' names \\[10, 11, 12\\]"):
        load_dataset("digits", classes="8-12")


# ---------------------------------------------------------------------------------------------------- the method
def _mlp_with_zeros() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0  # half of the first layer
        model[2].weight[0] = 0
    return model


def _train(model, sparsifier, steps=5, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sparsifier.attach(optimizer)
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_the_loaded_zeros_are_the_fixed_mask():
    model = _mlp_with_zeros()
    zeros = {n: (p == 0).clone() for n, p in model.named_parameters() if p.dim() >= 2}
    sparsifier = sparsetrain.create("transfer", model, sparsity=0.5, total_steps=5)
    expected = sum(int(z.sum()) for z in zeros.values()) / sum(z.numel() for z in zeros.values())
    assert sparsifier.final_sparsity == pytest.approx(expected)  # measured, not the 0.5 given
    _train(model, sparsifier)
    for name, zero in zeros.items():
        assert torch.equal(sparsifier.masks[name], ~zero)
        assert torch.equal(sparsifier.params[name] == 0, zero)  # the kept weights trained and stayed nonzero
    assert sparsifier.mask_version == 1  # set once at step 0, never again


def test_linear_probing_trains_only_the_head():
    model = _mlp_with_zeros()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsifier = sparsetrain.create("transfer", model, sparsity=0.0, total_steps=5, freeze="backbone")
    assert sparsifier.head_names == ["2.weight", "2.bias"]
    _train(model, sparsifier)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name in ("0.weight", "0.bias")), name


def test_a_dense_model_is_pruned_by_magnitude_and_options_are_checked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sparsifier = sparsetrain.create("transfer", model, sparsity=0.75, total_steps=5)
    assert sparsifier.sparsity().overall == pytest.approx(0.75, abs=1e-3)
    with pytest.raises(ValueError, match="freeze must be one of none, backbone; got 'all'"):
        sparsetrain.create("transfer", model, sparsity=0.5, freeze="all")
    with pytest.raises(ValueError, match="head='fc.\\*' matches no parameter"):
        sparsetrain.create("transfer", model, sparsity=0.5, head="fc.*")


# ---------------------------------------------------------------------------------------------------- --init-from
def test_transfer_keeps_the_upstream_pattern_and_replaces_the_head(tmp_path, upstream):
    source = checkpoint.load(upstream)
    run = loop.Run(_config(tmp_path, "down", method="transfer", classes="5-7", init_from=str(upstream)))
    summary = run.run()
    final = run.model.state_dict()
    head = {"5.weight", "5.bias"}  # LeNet-300-100's last layer: 3 classes now, freshly initialised
    assert final["5.weight"].shape == (3, 100)
    for name, tensor in source["model"].items():
        if name in head:
            continue
        assert not torch.equal(final[name], tensor), name  # fine-tuned
        if name.endswith("weight"):
            assert torch.equal(final[name] == 0, tensor == 0), name  # the same zeros, exactly
    assert summary["sparse_model"]["sparsity"] > 0.85  # the upstream's 90% minus the dense new head


def test_linear_probe_from_a_checkpoint_changes_only_the_head(tmp_path, upstream):
    source = checkpoint.load(upstream)["model"]
    run = loop.Run(_config(tmp_path, "probe", method="transfer", classes="5-9", init_from=str(upstream),
                           method_options={"freeze": "backbone"}))  # fmt: skip
    run.run()
    final = run.model.state_dict()
    for name, tensor in source.items():
        assert torch.equal(final[name], tensor) == (not name.startswith("5.")), name


def test_init_from_refuses_another_architecture(tmp_path, upstream):
    model = nn.Linear(3, 3)
    with pytest.raises(CheckpointError, match="holds a model with name 'mlp', this run builds 'lenet5'"):
        checkpoint.init_from(model, {"name": "lenet5", "input_shape": [1, 8, 8], "num_classes": 5}, upstream)


def test_cli_init_from_mistakes_are_one_error_line(tmp_path, upstream):
    bad = tmp_path / "bad.pt"
    torch.save({"format": "sparsetrain-checkpoint", "model": {}, "model_spec": {}}, bad)
    for init, expected in ((tmp_path / "missing.pt", "does not exist"), (bad, "holds a model with name None")):
        result = subprocess.run(
            [sys.executable, "-m", "sparsetrain", "train", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
             "--method", "transfer", "--init-from", str(init), "--out", str(tmp_path / "x"), "--no-progress"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and "error: " in result.stderr and expected in result.stderr
