"""The library's guarantees when it is used wrongly or fed bad numbers: exact zeros whatever the values, clear
errors for a forgotten optimizer or ``wrap_optimizer``, tied weights known by every name, a state without masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsetrain


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def pruned(model: nn.Module, optimizer_factory=None, attach: bool = True):
    """A model whose weights are at 50% sparsity from step 0 (one-shot magnitude pruning at step 0)."""
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.5, total_steps=10, unit="steps", at=0)
    optimizer = (optimizer_factory or (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)))(model.parameters())
    if attach:
        sparsifier.attach(optimizer)
    return sparsifier, optimizer


def assert_masked_exactly_plus_zero(sparsifier) -> None:
    for name, param in sparsifier.params.items():
        masked = param.detach()[~sparsifier.masks[name]]
        assert masked.numel() > 0
        assert torch.all(masked == 0), f"{name}: {masked[masked != 0][:4].tolist()} at masked positions"
        assert not torch.signbit(masked).any(), f"{name}: -0.0 at masked positions"


# ------------------------------------------------------------------------------------ NaN and inf at masked positions
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradients_at_masked_positions_leave_exact_zeros(optimizer, bad):
    model = mlp()
    factory = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
        "adam": lambda p: torch.optim.Adam(p, lr=0.1),
    }[optimizer]
    sparsifier, opt = pruned(model, factory)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        for name, param in sparsifier.params.items():
            param.grad[~sparsifier.masks[name]] = bad  # only where the mask is 0
        opt.step()
        assert_masked_exactly_plus_zero(sparsifier)
        for name, param in sparsifier.params.items():
            grad = param.grad[~sparsifier.masks[name]]
            assert torch.all(grad == 0) and not torch.signbit(grad).any(), "masked gradients must be exactly 0"
    for param in model.parameters():  # the kept weights trained normally
        assert torch.isfinite(param).all()


def test_non_finite_weights_at_masked_positions_become_exact_zeros_unattached():
    """Called by hand after an unmasked step: whatever the step wrote at masked positions becomes +0.0."""
    model = mlp()
    sparsifier, opt = pruned(model, attach=False)
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    for name, param in sparsifier.params.items():
        param.grad[~sparsifier.masks[name]] = float("nan")
    opt.step()
    assert any(torch.isnan(p).any() for p in sparsifier.params.values())
    sparsifier.step(opt)
    assert_masked_exactly_plus_zero(sparsifier)
    for name, param in sparsifier.params.items():  # kept weights are bit for bit what the step wrote
        assert torch.isfinite(param[sparsifier.masks[name]]).all()


def test_kept_weights_are_untouched_bit_for_bit():
    model = mlp()
    sparsifier, opt = pruned(model)
    with torch.no_grad():
        model[0].weight[sparsifier.masks["0.weight"]] = -0.0  # a kept weight may be -0.0: it must stay -0.0
    before = {n: p.detach().clone() for n, p in sparsifier.params.items()}
    sparsifier._apply_masks()
    for name, param in sparsifier.params.items():
        kept = sparsifier.masks[name]
        assert torch.equal(param[kept].view(torch.int32), before[name][kept].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_exact_zeros_in_other_dtypes(dtype):
    model = mlp().to(dtype)
    sparsifier, opt = pruned(model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    opt.zero_grad()
    model(torch.randn(4, 8, dtype=dtype)).sum().backward()
    for name, param in sparsifier.params.items():
        param.grad[~sparsifier.masks[name]] = float("nan")
    opt.step()
    assert_masked_exactly_plus_zero(sparsifier)


# ------------------------------------------------------------------------------------ step() without the optimizer
def test_step_by_hand_needs_the_optimizer():
    model = mlp()
    sparsifier, opt = pruned(model, attach=False)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"sparsifier\.step\(optimizer\)"):
        sparsifier.step()
    assert sparsifier.count == 0  # refused before anything happened
    sparsifier.step(opt)
    assert sparsifier.count == 1
    # The optimizer given once is remembered; its momentum at masked positions is cleared every time.
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    sparsifier.step()
    for name, param in sparsifier.params.items():
        momentum = opt.state[param]["momentum_buffer"]
        assert torch.all(momentum[~sparsifier.masks[name]] == 0)


# ------------------------------------------------------------------------------------ cram / rda without wrap_optimizer
@pytest.mark.parametrize("method", ["cram", "rda"])
def test_optimizer_methods_refuse_a_plain_optimizer(method):
    model = mlp()
    sparsifier = sparsetrain.create(method, model, sparsity=0.5, total_steps=10)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"wrap_optimizer\(optimizer\)") as info:
        sparsifier.attach(plain)
    assert "SGD" in str(info.value) and method in str(info.value)
    assert not plain._optimizer_step_pre_hooks  # nothing was hooked
    sparsifier.attach(sparsifier.wrap_optimizer(plain))  # the fix in the message works


# ------------------------------------------------------------------------------------ tied weights
class TiedLM(nn.Module):
    """An embedding and an output layer sharing one weight (as in GPT-2): two names, one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Linear(16, 16)
        self.out = nn.Linear(16, 32, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.body(self.embed(tokens))))


def test_exclude_matches_every_name_of_a_tied_weight(caplog):
    with caplog.at_level("WARNING", logger="sparsetrain"):
        sparsifier = sparsetrain.create("magnitude", TiedLM(), sparsity=0.5, exclude=["out.weight"])
    assert list(sparsifier.params) == ["body.weight"]  # the tied weight is excluded by its second name
    assert "matches no parameter" not in caplog.text


def test_include_matches_every_name_of_a_tied_weight():
    model = TiedLM()
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.5, include=["out.*"])
    assert list(sparsifier.params) == ["embed.weight"]  # keyed by its first name
    assert sparsifier.params["embed.weight"] is model.out.weight
    with pytest.raises(ValueError, match="out.weight"):  # the names listed include the second name
        sparsetrain.create("magnitude", model, sparsity=0.5, include=["nothing.*"])


# ------------------------------------------------------------------------------------ a state without masks
@pytest.mark.parametrize(
    "state", [{"method": "magnitude", "count": 3}, {"method": "magnitude", "masks": {}}, {"method": "magnitude"}]
)
def test_state_without_masks_is_a_clear_error(state):
    sparsifier = sparsetrain.create("magnitude", mlp(), sparsity=0.5)
    with pytest.raises(ValueError, match="Sparsifier.state_dict") as info:
        sparsifier.load_state_dict(state)
    assert "has no" in str(info.value)


def test_state_that_is_not_a_dict_is_a_clear_error():
    sparsifier = sparsetrain.create("magnitude", mlp(), sparsity=0.5)
    with pytest.raises(ValueError, match="got list"):
        sparsifier.load_state_dict([1, 2])


# ------------------------------------------------------------------------------------ parameters the model replaced
def replaced_by_assign(model: nn.Module) -> None:
    """``load_state_dict(assign=True)`` puts new Parameter objects into the model, with values at masked positions."""
    model.load_state_dict({k: v.detach().clone() + 1 for k, v in model.state_dict().items()}, assign=True)


def test_the_sparsifier_follows_parameters_replaced_by_load_state_dict_assign():
    model = mlp()
    sparsifier, old_optimizer = pruned(model, attach=False)
    masks = {n: m.clone() for n, m in sparsifier.masks.items()}
    replaced_by_assign(model)
    assert all(sparsifier.params[n] is model.get_parameter(n) for n in sparsifier.params)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        sparsifier.step(optimizer)  # by hand: the model's current weights are the ones masked
        assert_masked_exactly_plus_zero(sparsifier)
    assert all(torch.equal(sparsifier.masks[n], masks[n]) for n in masks)


def test_a_new_optimizer_attaches_after_load_state_dict_assign():
    model = mlp()
    sparsifier, old_optimizer = pruned(model)
    replaced_by_assign(model)
    sparsifier.detach()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sparsifier.attach(optimizer)
    optimizer.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    assert_masked_exactly_plus_zero(sparsifier)


def test_stepping_the_optimizer_of_the_replaced_parameters_is_a_clear_error():
    model = mlp()
    sparsifier, old_optimizer = pruned(model)
    replaced_by_assign(model)
    model(torch.randn(4, 8)).sum().backward()
    with pytest.raises(RuntimeError, match=r"load_state_dict\(assign=True\).*0\.weight.*attach"):
        old_optimizer.step()


def test_a_replacement_of_another_shape_is_a_clear_error():
    model = mlp()
    sparsifier, _ = pruned(model)
    sparsifier.detach()
    model[0].weight = nn.Parameter(torch.ones(16, 9))  # replaced by assignment: found when an optimizer attaches
    with pytest.raises(ValueError, match=r"0\.weight.*\(16, 9\).*\(16, 8\)"):
        sparsifier.attach(torch.optim.SGD(model.parameters(), lr=0.1))
