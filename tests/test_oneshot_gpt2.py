"""One-shot pruning of a tiny GPT-2 (Hugging Face transformers): SparseGPT forced, the OBC database, and
calibration batches in the Hugging Face form (``{"input_ids", "attention_mask", "labels"}``)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from sparsetrain.maskops import keep_count, nm_mask, topk_count_mask
from sparsetrain.oneshot import (
    SpdyTimings,
    build_database,
    layer_hessian,
    prune_mfac,
    prune_obc,
    prune_oneshot,
    prune_spdy,
)
from sparsetrain.oneshot.calibration import model_inputs
from sparsetrain.oneshot.mfac import fisher_gradients
from sparsetrain.oneshot.spdy import measure_speedup

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = "*.c_*.weight"  # the Conv1D layers (attention and MLP) of every block


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def token_batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(n)]


def dict_batches(n: int = 3, pad: bool = False) -> list[dict[str, torch.Tensor]]:
    out = []
    for ids in token_batches(n):
        mask = torch.ones_like(ids)
        if pad:
            mask[:, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


def layer_error(dense_w: torch.Tensor, new_w: torch.Tensor, h: torch.Tensor) -> float:
    """``sum over outputs delta^T H delta / 2`` for a Conv1D (in, out) weight: the inputs are its rows."""
    delta = (new_w - dense_w).double()
    return float(((h @ delta) * delta).sum() / 2)


# -------------------------------------------------------------------------------------------- SparseGPT forced
@pytest.mark.parametrize("mask_type", ["unstructured", "2:4"])
def test_sparsegpt_forced_on_gpt2_is_exact_and_beats_magnitude_on_every_layer(mask_type, caplog):
    model = tiny_gpt2()
    dense = copy.deepcopy(model)
    batches = token_batches()
    sparsity = 0.5 if mask_type == "unstructured" else None
    solvers: dict = {}
    errors: dict = {}
    with caplog.at_level(logging.INFO, logger="sparsetrain"):
        masks = prune_obc(model, sparsity, batches, mask_type=mask_type, distribution="uniform", include=LAYERS,
                          solver="sparsegpt", solvers=solvers, layer_errors=errors)
    assert len(masks) == 8 and set(solvers) == set(masks)
    assert "pruned by magnitude" not in caplog.text
    for name, mask in masks.items():
        assert solvers[name][0] == "sparsegpt"
        weight = model.get_parameter(name).detach()
        assert mask.shape == weight.shape and solvers[name][1] == weight.shape[0]  # inputs along dim 0
        kept = keep_count(weight.numel(), 0.5)
        assert int(mask.sum()) == kept and int((weight != 0).sum()) == kept and torch.all(weight[~mask] == 0)
        if mask_type == "2:4":
            assert torch.all(mask.reshape(-1, 4, mask.shape[1]).sum(1) == 2)  # groups of 4 inputs, along dim 0
        # The layer's inputs in the pruned model are the ones it was solved on (every layer before it is pruned).
        module = model.get_submodule(name.rpartition(".")[0])
        h = layer_hessian(model, module, batches)
        w = dense.get_parameter(name).detach()
        magnitude = (nm_mask(w.abs(), 2, 4, input_dim=0) if mask_type == "2:4"
                     else topk_count_mask(w.abs(), kept))
        ours = layer_error(w, weight, h)
        assert ours == pytest.approx(errors[name], rel=1e-3)
        assert ours < layer_error(w, w * magnitude, h), name


def logits_error(model: torch.nn.Module, dense: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float((model(x).logits - dense(x).logits).pow(2).sum()) for x in batches)


def test_database_allocation_with_sparsegpt_forced_on_gpt2(caplog):
    # The solver was silently dropped with allocation='database': the database was built by ExactOBS.
    model = tiny_gpt2()
    dense = copy.deepcopy(model)
    batches = token_batches()
    target = sum(int((~m).sum()) for m in prune_oneshot(copy.deepcopy(model), 0.6, include=LAYERS).values())
    report: dict = {}
    solvers: dict = {}
    with caplog.at_level(logging.INFO, logger="sparsetrain"):
        masks = prune_obc(model, 0.6, batches, include=LAYERS, allocation="database", solver="sparsegpt",
                          report=report, solvers=solvers)
    assert report["allocation"] in ("database", "magnitude") and len(masks) == 8
    assert "by sparsegpt" in caplog.text and "by exact" not in caplog.text
    assert "pruned by magnitude" not in caplog.text
    assert {kind for kind, _ in solvers.values()} == {"sparsegpt"} and set(solvers) == set(masks)
    zeros = 0
    for name, mask in masks.items():
        weight = model.get_parameter(name)
        assert int((weight == 0).sum()) == int((~mask).sum())
        zeros += int((~mask).sum())
    assert zeros == target
    magnitude = copy.deepcopy(dense)
    prune_oneshot(magnitude, 0.6, include=LAYERS)
    assert logits_error(model, dense, batches) < logits_error(magnitude, dense, batches)


# --------------------------------------------------------------------------- calibration batches as mappings
def test_mapping_batches_prune_as_their_input_ids_and_run_the_model_with_keywords():
    model = tiny_gpt2()
    by_tensor, by_dict = copy.deepcopy(model), copy.deepcopy(model)
    calls: list[dict] = []
    by_dict.register_forward_pre_hook(lambda m, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    a = prune_obc(by_tensor, 0.5, token_batches(), include=LAYERS, solver="sparsegpt")
    b = prune_obc(by_dict, 0.5, dict_batches(), include=LAYERS, solver="sparsegpt")
    for name in a:  # an all-ones attention mask: the same calibration inputs, the same result
        assert torch.equal(a[name], b[name])
        assert torch.equal(by_tensor.get_parameter(name), by_dict.get_parameter(name))
    assert calls and all(set(c) == {"input_ids", "attention_mask"} for c in calls)  # labels are not passed


def test_mapping_batches_pass_their_attention_mask():
    model = tiny_gpt2()
    padded, full = copy.deepcopy(model), copy.deepcopy(model)
    prune_obc(padded, 0.5, dict_batches(pad=True), include=LAYERS)
    prune_obc(full, 0.5, dict_batches(), include=LAYERS)
    # The last block's inputs differ when the mask hides positions from attention.
    name = "transformer.h.1.mlp.c_fc.weight"
    assert not torch.equal(padded.get_parameter(name), full.get_parameter(name))


def test_mapping_batches_in_the_database_allocation_and_num_samples():
    model = tiny_gpt2()
    report: dict = {}
    masks = prune_obc(model, 0.5, dict_batches(), include=LAYERS, allocation="database", num_samples=6,
                      report=report)
    target = sum(int((~m).sum()) for m in prune_oneshot(tiny_gpt2(), 0.5, include=LAYERS).values())
    assert sum(int((model.get_parameter(n) == 0).sum()) for n in masks) == target
    assert set(report["calibration_loss"]) == {"database", "magnitude"}
    # The cache key covers every entry of the mapping batches: another attention mask, another database.
    db = build_database(tiny_gpt2(), dict_batches(), grid=(0.0, 0.5), include=LAYERS)
    assert db.key != build_database(tiny_gpt2(), dict_batches(pad=True), grid=(0.0, 0.5), include=LAYERS).key


def test_mapping_batches_in_spdy():
    model = tiny_gpt2()
    batches = dict_batches()
    db = build_database(model, batches, grid=(0.0, 0.5, 0.8), include=LAYERS, solver="sparsegpt")
    times = SpdyTimings(2, 1, db.grid, list(db.names), overhead=1.0)
    for name in db.names:
        numel = db.weights[name][0].numel()
        times.times[name] = [float(numel) if s < 0.5 else 0.4 * keep_count(numel, s) for s in db.grid]
        times.kernels[name] = ["dense" if s < 0.5 else "csr" for s in db.grid]
    times.dense_total = 1.0 + sum(db.weights[n][0].numel() for n in db.names)
    pruned = copy.deepcopy(model)
    report: dict = {}
    masks = prune_spdy(pruned, 1.5, batches, batch_size=2, database=db, timings=times, candidates=5,
                       measure=False, report=report)
    assert report["predicted_speedup"] >= 1.5 and set(masks) == set(db.names)
    sample = {k: v[:2] for k, v in model_inputs(batches[0]).items()}
    assert measure_speedup(model, pruned, sample, repeats=1, min_time=1e-3) > 0


def test_mapping_batches_in_mfac_use_the_models_own_loss():
    model = tiny_gpt2()
    batches = dict_batches(2)
    params = [model.get_parameter("transformer.h.0.mlp.c_fc.weight")]
    grads = fisher_gradients(model, params, [(model_inputs(b), b["labels"]) for b in batches])
    for row, b in zip(grads, batches):
        loss = model(**b).loss  # the shifted next-token cross-entropy of GPT-2, labels included
        (g,) = torch.autograd.grad(loss, params)
        assert torch.allclose(row.float(), g.reshape(-1) * 4**0.5, atol=1e-5)
    pruned = copy.deepcopy(model)
    masks = prune_mfac(pruned, 0.5, batches, num_gradients=4, num_samples=8, include=LAYERS,
                       distribution="uniform")
    for name, mask in masks.items():
        weight = pruned.get_parameter(name)
        assert int(mask.sum()) == keep_count(weight.numel(), 0.5) == int((weight != 0).sum())
    with pytest.raises(ValueError, match=r"'labels'.*keys \['input_ids', 'attention_mask'\]"):
        prune_mfac(copy.deepcopy(model), 0.5, [{k: v for k, v in b.items() if k != "labels"} for b in batches],
                   num_gradients=2, include=LAYERS)


@pytest.mark.parametrize("batch", ["not a batch", 3, [[1, 2]], ({"input_ids": torch.zeros(2, 4)},)])
def test_other_batch_forms_are_refused_by_name(batch):
    with pytest.raises(ValueError, match="a calibration batch must be a tensor.*mapping.*got a"):
        prune_obc(tiny_gpt2(), 0.5, [batch], include=LAYERS)


# ------------------------------------------------------------------------ perplexity of a pruned GPT-2, in Python
def test_evaluate_scores_a_pruned_gpt2_by_its_logits():
    # evaluate() passed the ModelOutput to the loss (AttributeError: no attribute "dim").
    from torch.utils.data import TensorDataset

    from sparsetrain.train.evaluation import evaluate

    model = tiny_gpt2()
    prune_obc(model, 0.5, dict_batches(), include=LAYERS, solver="sparsegpt")
    ids = torch.cat(token_batches(2))  # (8, 16): inputs are the first 15 tokens, targets the next ones
    result = evaluate(model, TensorDataset(ids[:, :-1], ids[:, 1:]), 3, torch.device("cpu"))
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=ids).loss)  # GPT-2's own shifted next-token loss
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    from sparsetrain.train.evaluation import output_logits

    with pytest.raises(TypeError, match="returned a tuple; evaluate needs logits"):
        output_logits((torch.zeros(2, 3),))


# ------------------------------------------------------------- the database's allocation losing is said, not silent
def test_keeping_magnitudes_allocation_over_the_database_is_a_warning(caplog):
    # On this random (untrained) GPT-2 the DP's levels have the smaller summed layer error but the larger
    # calibration loss: the c_proj layers' errors are ~1e-5 (small weights, small inputs) while they write straight
    # into the residual stream, so the DP prunes them to 95-98%. The fallback was logged at INFO only.
    model = tiny_gpt2()
    report: dict = {}
    errors: dict = {}
    with caplog.at_level(logging.INFO, logger="sparsetrain"):
        prune_obc(model, 0.6, dict_batches(), include=LAYERS, allocation="database", report=report,
                  layer_errors=errors)
    assert report["allocation"] == "magnitude"
    losses = report["calibration_loss"]
    assert losses["database"] > losses["magnitude"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "OBC allocation" in r.getMessage()]
    assert len(warnings) == 1
    assert f"{losses['database']:.4g}" in warnings[0].getMessage()
    assert "kept magnitude's allocation at sparsity 0.6" in warnings[0].getMessage()


def test_database_levels_of_gpt2_are_stored_in_conv1d_layout_with_their_own_error():
    # What the DP adds up is what gets stitched: each stored (in, out) level, scored on the layer's dense-model
    # Hessian, has the error stored with it, and its zeros are the level's.
    model = tiny_gpt2()
    db = build_database(model, dict_batches(), grid=(0.0, 0.5, 0.9), include=LAYERS, solver="exact")
    for name in db.names:
        w = model.get_parameter(name).detach()
        h = layer_hessian(model, model.get_submodule(name.rpartition(".")[0]), dict_batches())
        for level, sparsity in enumerate(db.grid):
            stored = db.weights[name][level]
            assert stored.shape == w.shape and int((stored == 0).sum()) == w.numel() - keep_count(w.numel(), sparsity)
            assert layer_error(w, stored, h) == pytest.approx(float(db.errors[name][level]), rel=1e-4, abs=1e-12)


def test_database_judges_a_language_model_by_its_own_loss_on_the_labels():
    """The database's allocation check scores a causal LM by next-token cross-entropy: the model's own loss on the
    batch's labels (shifted by the model), per sample, not by the distance to the dense logits."""
    from sparsetrain.oneshot.calibration import collect_batches
    from sparsetrain.oneshot.database import _calibration_loss

    model = tiny_gpt2()
    batches = dict_batches(2)
    inputs, targets = collect_batches(batches)
    reference = [model(**x) for x in inputs]  # the dense logits: a distance to them would be 0 here
    loss = _calibration_loss(model, inputs, targets, reference)
    expected = sum(float(model(**b).loss) * 4 for b in batches) / 8
    assert loss == pytest.approx(expected, rel=1e-6) and loss > 1.0


def test_database_judges_next_token_targets_per_position():
    """(inputs, next tokens) batches of a model with (N, T, V) logits: cross-entropy per position, averaged over
    each sample's positions, then over samples (the zoo's gpt and text data)."""
    from sparsetrain.oneshot.database import _calibration_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64))
    x = [torch.randint(0, 64, (3, 5)), torch.randint(0, 64, (2, 5))]
    y = [torch.randint(0, 64, (3, 5)), torch.randint(0, 64, (2, 5))]
    reference = [model(t) for t in x]
    loss = _calibration_loss(model, x, y, reference)
    per_sample = [torch.nn.functional.cross_entropy(model(a).transpose(1, 2), b, reduction="none").mean(1)
                  for a, b in zip(x, y)]  # fmt: skip
    assert loss == pytest.approx(float(torch.cat(per_sample).mean()), rel=1e-6)
