"""Sparse kernels in training: the CSR path computes the dense path's outputs and masked gradients, keeps the
model's parameters and state_dict, follows the masks and the dense-gradient steps, and chooses by its stated rule.

No speed is asserted (benchmarks/training_speed.py measures it); where a choice is asserted it is the robust one
(``force``, or a layer below ``min_sparsity`` that is never timed).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.inference import time_paired
from sparsetrain.sparse_training import SparseKernels, sparse_linear


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def masked_layer(out_f: int = 48, in_f: int = 64, sparsity: float = 0.8, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    mask = torch.rand(out_f, in_f) >= sparsity
    mask[3] = False  # an empty row and an empty column: the CSR edge cases
    mask[:, 5] = False
    with torch.no_grad():
        layer.weight.mul_(mask)
    return layer, mask


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(64,), (1, 64), (8, 64), (2, 5, 64)])
def test_sparse_linear_matches_dense_outputs_and_gradients(shape, bias):
    layer, mask = masked_layer(bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 48)
    (sparse_linear(x, layer, mask) * upstream).sum().backward()
    got = (x.grad.clone(), layer.weight.grad.clone(), None if not bias else layer.bias.grad.clone())
    x.grad = layer.weight.grad = None
    if bias:
        layer.bias.grad = None
    (layer(x) * upstream).sum().backward()
    close(got[0], x.grad)
    # The weight gradient is the dense one at kept positions and exactly +0.0 at the masked ones.
    close(got[1][mask], layer.weight.grad[mask])
    assert torch.equal(got[1][~mask], torch.zeros(int((~mask).sum())))
    assert not torch.signbit(got[1][~mask]).any()
    if bias:
        close(got[2], layer.bias.grad)


def test_output_takes_in_place_activation():
    layer, mask = masked_layer()
    x = torch.randn(8, 64)
    y = sparse_linear(x, layer, mask)
    torch.relu_(y)  # autograd refuses in-place ops on a custom Function's view outputs: the output is no view
    y.sum().backward()
    close(y, torch.relu(layer(x)))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 64), nn.ReLU(inplace=True), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4))  # fmt: skip


def setup(method: str = "static", sparsity: float = 0.9, make_optimizer=None, **options):
    model = mlp()
    sparsifier = sparsetrain.create(method, model, sparsity=sparsity, total_steps=40, **options)
    if make_optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = make_optimizer(model.parameters())
    sparsifier.attach(optimizer)
    return model, optimizer, sparsifier


def step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_model_keeps_its_modules_parameters_and_state_dict():
    model, optimizer, sparsifier = setup()
    params = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    kernels = SparseKernels(sparsifier, force=True, time_layers=False)
    assert set(kernels.layers) == {"1.weight", "3.weight", "5.weight"}
    assert all(type(m) is nn.Linear for m in kernels.layers.values())
    step(model, optimizer, 0)
    assert kernels.choices() == dict.fromkeys(kernels.layers, "csr")
    assert {n: id(p) for n, p in model.named_parameters()} == params and list(model.state_dict()) == keys
    # A deep copy (the trainer's dense twin) runs the plain dense forward of its own weights.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[1].weight.fill_(1.0)
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert not torch.equal(twin(x), model(x))
        close(twin[1](x), nn.functional.linear(x, twin[1].weight, twin[1].bias))
    # A copy of the copy (a saved best model copied again) computes with its own weights, not the first copy's.
    second = copy.deepcopy(twin)
    with torch.no_grad():
        second[1].weight.fill_(2.0)
        close(second[1](x), nn.functional.linear(x, second[1].weight, second[1].bias))
    kernels.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_csr_values_follow_every_optimizer_step():
    model, optimizer, sparsifier = setup()
    reference, ref_optimizer, _ = setup()
    SparseKernels(sparsifier, force=True, time_layers=False)
    for seed in range(5):
        step(model, optimizer, seed)
        step(reference, ref_optimizer, seed)
        for p, q in zip(model.parameters(), reference.parameters()):
            close(p, q)
    x = torch.randn(4, 32)
    close(model(x), reference(x))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, fused=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    ],
    ids=["sgd-fused", "adamw-fused", "sgd-foreach"],
)
def test_csr_values_follow_steps_of_fused_optimizers(make_optimizer):
    # torch's fused kernels write the weights without moving their version counter: the CSR copy must still be
    # gathered again after every step (it once served the values from before the step, and training diverged).
    model, optimizer, sparsifier = setup(make_optimizer=make_optimizer)
    reference, ref_optimizer, _ = setup(make_optimizer=make_optimizer)
    kernels = SparseKernels(sparsifier, force=True, time_layers=False)
    for seed in range(4):
        step(model, optimizer, seed)
        step(reference, ref_optimizer, seed)
        for p, q in zip(model.parameters(), reference.parameters()):
            close(p, q)
    assert kernels.forwards["3.weight"]["csr"] == 4


def test_evaluation_forwards_run_on_csr_and_match_dense():
    model, optimizer, sparsifier = setup()
    reference, ref_optimizer, _ = setup()
    kernels = SparseKernels(sparsifier, force=True, time_layers=False)
    step(model, optimizer, 0)
    step(reference, ref_optimizer, 0)
    x = torch.randn(5, 32)
    with torch.no_grad():
        got, want = model(x), reference(x)
    close(got, want)
    assert kernels.eval_forwards["3.weight"] == {"csr": 1, "dense": 0}
    assert kernels.forwards["3.weight"] == {"csr": 1, "dense": 0}  # evaluation is not counted as training
    # A 3-d input (a sequence model's tokens) keeps its leading dimensions.
    with torch.no_grad():
        close(model[1](torch.ones(2, 3, 32)), reference[1](torch.ones(2, 3, 32)))
    # The evaluation follows the weights after a step and a mask change like training does.
    step(model, optimizer, 1)
    step(reference, ref_optimizer, 1)
    with torch.no_grad():
        close(model(x), reference(x))
    assert "evaluation forwards on CSR" in str(kernels.report())
    layers = kernels.summary()["layers"]
    assert layers["1.weight"]["eval_forwards_csr"] == 3 and layers["3.weight"]["eval_forwards_csr"] == 2


def test_evaluation_under_inference_mode_then_training_goes_on():
    # A CSR copy gathered under torch.inference_mode() (an inference tensor) is served to the next training
    # forward when no step came between: training must still run and match the dense path.
    model, optimizer, sparsifier = setup()
    reference, ref_optimizer, _ = setup()
    kernels = SparseKernels(sparsifier, force=True, time_layers=False)
    x = torch.randn(6, 32)
    for seed in range(3):
        step(model, optimizer, seed)
        step(reference, ref_optimizer, seed)
        with torch.inference_mode():
            close(model(x), reference(x))
    for p, q in zip(model.parameters(), reference.parameters()):
        close(p, q)
    assert kernels.forwards["3.weight"]["csr"] == 3 and kernels.eval_forwards["3.weight"]["csr"] == 3


def test_evaluation_choice_is_timed_separately_from_training():
    # Below min_sparsity nothing is timed; above it, evaluation and training get decisions of their own.
    model, optimizer, sparsifier = setup(sparsity=0.9)
    kernels = SparseKernels(sparsifier, repeats=1)
    step(model, optimizer, 0)
    with torch.no_grad():
        model(torch.randn(7, 32))
    keys = {key[0]: [] for key in kernels._decisions}
    for key in kernels._decisions:
        keys[key[0]].append(key[1:])
    assert keys["3.weight"] and sorted(k[-1] for k in keys["3.weight"]) == [False, True]
    assert {k[0] for k in keys["3.weight"]} == {16, 7}  # training at its batch size, evaluation at its own


def test_dense_gradient_steps_run_dense():
    # RigL's update steps read the gradients of masked weights: those steps run dense, the others on CSR.
    model, optimizer, sparsifier = setup("rigl", unit="steps", delta=3, t_end=30)
    kernels = SparseKernels(sparsifier, force=True, time_layers=False)
    seen = []
    for seed in range(7):
        update = sparsifier.needs_dense_gradients()
        optimizer.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(seed)
        loss = nn.functional.cross_entropy(model(torch.randn(16, 32, generator=g)), torch.randint(0, 4, (16,)))
        loss.backward()
        grad = model[3].weight.grad
        masked = ~sparsifier.masks["3.weight"]
        seen.append((update, bool(grad[masked].abs().sum() > 0)))
        optimizer.step()
    assert (True, True) in seen and (False, False) in seen
    assert all(update == dense for update, dense in seen)  # dense gradient exactly on the update steps
    assert kernels.mask_changes >= 2


def test_structure_follows_mask_changes():
    # GMP prunes further at each update: the CSR structure is rebuilt from the new masks, zeros stay exact.
    model, optimizer, sparsifier = setup("gmp", unit="steps", start=1, end=9, frequency=2)
    SparseKernels(sparsifier, force=True, time_layers=False)
    for seed in range(12):
        step(model, optimizer, seed)
        for name, mask in sparsifier.masks.items():
            weight = sparsifier.params[name].detach()
            assert torch.equal(weight[~mask], torch.zeros(int((~mask).sum())))
    assert sparsifier.sparsity().overall == pytest.approx(0.9, abs=0.01)


def test_layers_below_min_sparsity_stay_dense_untimed_and_the_report_says_why():
    model, optimizer, sparsifier = setup(sparsity=0.3, distribution="uniform")
    kernels = SparseKernels(sparsifier)  # min_sparsity 0.5: nothing is timed
    step(model, optimizer, 0)
    assert kernels.choices() == dict.fromkeys(kernels.layers, "dense")
    text = str(kernels.report())
    assert "per-layer kernels at batch 16" in text and "dense (sparsity below 50%)" in text


def test_evaluation_and_no_grad_run_dense():
    model, optimizer, sparsifier = setup()
    kernels = SparseKernels(sparsifier, force=True, time_layers=False)
    with torch.no_grad():
        model(torch.randn(3, 32))
    assert kernels.choices() == dict.fromkeys(kernels.layers, "dense")  # nothing decided: no training forward


def test_timed_choice_is_reported_with_times_and_follows_the_rule():
    model, optimizer, sparsifier = setup(sparsity=0.95)
    kernels = SparseKernels(sparsifier, repeats=1)
    step(model, optimizer, 0)
    report = kernels.report()
    assert all(layer.dense_time and layer.sparse_time for layer in report.layers)
    for layer in report.layers:  # the stated rule, on whatever the timing gave
        assert (layer.kernel, layer.reason) == kernels.rule(layer.dense_time, layer.sparse_time)


@pytest.mark.parametrize(
    "dense_ms, sparse_ms, expected",
    [
        (10.0, 5.0, ("csr", "faster")),
        (10.0, 9.5, ("csr", "faster")),  # exactly 5% faster, 0.5 ms saved
        (10.0, 9.6, ("dense", "faster by less than 5%")),
        (10.0, 10.0, ("dense", "slower")),
        (10.0, 30.0, ("dense", "slower")),
        (0.15, 0.06, ("dense", "saves less than 0.1 ms")),  # 2.5x faster, 0.09 ms saved
        (0.2, 0.1, ("csr", "faster")),
    ],
)
def test_rule_needs_the_margin_and_the_minimum_gain(dense_ms, sparse_ms, expected):
    _, _, sparsifier = setup()
    assert SparseKernels(sparsifier).rule(dense_ms / 1e3, sparse_ms / 1e3) == expected


@pytest.mark.parametrize(
    "dense_ms, sparse_ms, settled",
    [
        ([10.0, 10.5, 9.8], [4.0, 4.2, 5.0], True),  # CSR faster in every pairing
        ([10.0, 10.5, 9.8], [20.0, 25.0, 21.0], True),  # CSR slower in every pairing
        ([10.0, 10.5, 9.8], [9.0, 10.9, 9.3], False),  # the median says CSR, the worst pairing dense
        ([10.0, 10.5], [4.0, 4.2], False),  # fewer than 3 samples: never settled
    ],
)
def test_timing_stops_early_only_when_more_rounds_cannot_change_the_choice(dense_ms, sparse_ms, settled):
    _, _, sparsifier = setup()
    kernels = SparseKernels(sparsifier)
    assert kernels._settled([[t / 1e3 for t in dense_ms], [t / 1e3 for t in sparse_ms]]) is settled


def test_settled_timing_runs_fewer_rounds_and_a_close_call_all_of_them():
    calls = {"a": 0, "b": 0}

    def timed(name: str, seconds: float):
        def fn() -> None:
            calls[name] += 1
            time.sleep(seconds)

        return fn

    # Each call lasts longer than min_time, so every loop is one call: warmup, the calibration (sample 1), rounds.
    time_paired([timed("a", 3e-3), timed("b", 3e-3)], repeats=7, min_time=1e-3, warmup=1,
                settled=lambda samples: len(samples[0]) >= 3)  # fmt: skip
    assert calls == {"a": 1 + 3, "b": 1 + 3}
    calls.update(a=0, b=0)
    time_paired([timed("a", 3e-3), timed("b", 3e-3)], repeats=7, min_time=1e-3, warmup=1,
                settled=lambda samples: False)  # fmt: skip
    assert calls == {"a": 1 + 7, "b": 1 + 7}


def test_refuses_bad_options():
    _, _, sparsifier = setup()
    with pytest.raises(ValueError, match="margin"):
        SparseKernels(sparsifier, margin=1.5)
    with pytest.raises(ValueError, match="min_sparsity"):
        SparseKernels(sparsifier, min_sparsity=2)
    with pytest.raises(ValueError, match="min_gain"):
        SparseKernels(sparsifier, min_gain=-1)


# ---------------------------------------------------------------------------------------------------- the trainer
def _run(tmp_path, kernels: str):
    from sparsetrain.train import loop
    from sparsetrain.train.config import resolve

    settings = dict(
        dataset="digits",
        model="mlp",
        method="acdc",
        sparsity=0.9,
        epochs=3,
        batch_size=32,
        lr=0.1,
        threads=1,
        progress=False,
        plots=False,
        sparse_kernels=kernels,
        out=str(tmp_path / kernels),
        method_options={"unit": "steps", "warmup": 10, "compressed": 20, "decompressed": 10, "final": 40},
    )
    run = loop.Run(resolve(None, settings))  # fmt: skip
    return run, run.run()


def test_trainer_option_runs_the_sparse_phases_on_csr_and_matches_off(tmp_path, monkeypatch):
    # The digits MLP is too small for CSR to win the timing: force the kernels to exercise the path in the trainer.
    monkeypatch.setattr(sparsetrain, "SparseKernels", lambda s: SparseKernels(s, force=True, time_layers=False))
    on_run, on = _run(tmp_path, "auto")
    off_run, off = _run(tmp_path, "off")
    assert off["sparse_kernels"] is None
    layers = on["sparse_kernels"]["layers"]
    assert layers and all(c["forwards_csr"] == 3 * 40 for c in layers.values())  # 3 epochs of 40 steps, forced
    assert "per-layer kernels at batch 32" in on["sparse_kernels"]["report"]
    # The whole AC/DC run (dense, sparse, dense, sparse phases) ends where the dense kernels' run does.
    assert off["sparse_model"]["test_acc"] > 80
    assert on["sparse_model"]["sparsity"] == off["sparse_model"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert on["sparse_model"]["test_acc"] == pytest.approx(off["sparse_model"]["test_acc"], abs=0.5)
    for p, q in zip(on_run.model.parameters(), off_run.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_trainer_option_is_validated():
    from sparsetrain.errors import ConfigError
    from sparsetrain.train.config import resolve

    assert resolve(None, {})["sparse_kernels"] == "off"
    with pytest.raises(ConfigError, match="option 'sparse_kernels' must be one of auto, off; got 'on'"):
        resolve(None, {"sparse_kernels": "on"})


# ---------------------------------------------------------------------------------------------------- every method
# The conformance suite's models, optimizers, schedules and steps (its methods, chosen by Capability flags).
from test_conformance import MASKING, MODELS, TOTAL, assert_exact_counts, assert_masked_weights_zero  # noqa: E402
from test_conformance import build as build_method  # noqa: E402
from test_conformance import train_step as method_step  # noqa: E402


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", MASKING)
def test_every_step_on_sparse_kernels_equals_the_dense_step(method, model_name):
    """Every method that keeps masks (fixed between its updates): each step with the kernels forced on equals the
    dense kernels' step to float tolerance, masks included, through all its updates and phases."""
    dense_model, dense_opt, dense_sp, shape = build_method(method, model_name)
    model, optimizer, sparsifier, _ = build_method(method, model_name)
    kernels = SparseKernels(sparsifier, force=True, time_layers=False)
    assert kernels.layers  # the MLP's three Linear layers, the conv net's head
    for step in range(TOTAL):
        method_step(dense_model, dense_opt, step, shape)
        method_step(model, optimizer, step, shape)
        for name, mask in sparsifier.masks.items():
            assert torch.equal(mask, dense_sp.masks[name]), f"step {step}: masks of {name} differ"
        for p, q in zip(model.parameters(), dense_model.parameters()):
            close(p, q)
    assert sum(c["csr"] for c in kernels.forwards.values()) > 0


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("method", ["acdc", "gmp", "rigl", "static"])
def test_masked_weights_exactly_zero_with_sparse_kernels(method, opt_name):
    model, optimizer, sparsifier, shape = build_method(method, "mlp", opt_name)
    SparseKernels(sparsifier, force=True, time_layers=False)
    version = sparsifier.mask_version
    for step in range(TOTAL):
        method_step(model, optimizer, step, shape)
        assert_masked_weights_zero(sparsifier)
        if sparsifier.mask_version != version:
            version = sparsifier.mask_version
            assert_exact_counts(sparsifier)
    assert sparsifier.sparsity().overall >= 0.9 - 1e-3


def test_a_timing_at_one_density_decides_the_densities_it_implies():
    # CSR chosen at density 0.1 is chosen at 0.05 untimed; not chosen at 0.3, it is not chosen at 0.45 either.
    # The other directions are timed. Scripted times stand in for the clock (the rule itself is tested above).
    model, optimizer, sparsifier = setup(sparsity=0.8, distribution="uniform")
    kernels = SparseKernels(sparsifier, repeats=1)
    timed = []
    answer = {"sparse": 0.5}

    def scripted(module, layer, x):
        timed.append(round(layer.structure.density, 2))
        return 1e-2, answer["sparse"] * 1e-2

    kernels._time = scripted
    layer = kernels._layer("3.weight", model[3])
    x = torch.randn(16, 32)

    def decide(density):
        layer.structure.density = density
        return kernels._decide("3.weight", model[3], layer, x, 16)

    assert decide(0.1).kernel == "csr" and timed == [0.1]
    inferred = decide(0.05)
    assert (inferred.kernel, inferred.reason, timed) == ("csr", "chosen at density 0.100", [0.1])
    answer["sparse"] = 2.0  # now CSR is slower: a denser layer must be timed, it is not implied
    assert decide(0.3).kernel == "dense" and timed == [0.1, 0.3]
    assert decide(0.45).reason == "not chosen at density 0.300" and timed == [0.1, 0.3]
    assert decide(0.2).kernel == "dense" and timed == [0.1, 0.3, 0.2]  # between the two: nothing implies it


def test_weights_replaced_by_load_state_dict_assign_are_the_ones_computed_with():
    """``load_state_dict(assign=True)`` gives the layers new weight objects: the CSR copies follow them."""
    model, optimizer, sparsifier = setup()
    reference, ref_optimizer, _ = setup()  # dense kernels, the same masks; never stepped before the load
    SparseKernels(sparsifier, force=True, time_layers=False)
    step(model, optimizer, 0)  # the CSR copies of the first weights exist now
    state = {k: v.detach().clone() * 2 for k, v in model.state_dict().items()}  # zeros stay zeros
    model.load_state_dict(state, assign=True)
    reference.load_state_dict(state)
    x = torch.randn(4, 32)
    close(model(x), reference(x))
    sparsifier.detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach(optimizer)
    for seed in (1, 2):
        step(model, optimizer, seed)
        step(reference, ref_optimizer, seed)
    close(model(x), reference(x))
