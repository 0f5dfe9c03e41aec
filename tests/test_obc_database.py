"""The OBC database (layer x sparsity grid), its disk cache and the DP allocation (Frantar & Alistarh 2022)."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from helpers.shared import trained_digits_mlp_checkpoint
from torch import nn

from sparsetrain.oneshot import allocate_levels, build_database, database, prune_obc
from sparsetrain.oneshot.database import _calibration_loss


def brute_force(errors, zeros, target):
    best = None
    for levels in itertools.product(*(range(len(e)) for e in errors)):
        if sum(z[lv] for z, lv in zip(zeros, levels)) >= target:
            err = sum(e[lv] for e, lv in zip(errors, levels))
            if best is None or err < best:
                best = err
    return best


def test_dp_equals_brute_force_on_small_random_cases():
    rng = random.Random(0)
    for _ in range(200):
        layers, levels = rng.randint(1, 4), rng.randint(1, 4)
        errors = [[rng.uniform(0, 10) for _ in range(levels)] for _ in range(layers)]
        zeros = [[rng.randint(0, 50) for _ in range(levels)] for _ in range(layers)]
        target = rng.randint(0, sum(max(z) for z in zeros))
        chosen = allocate_levels(errors, zeros, target)
        assert sum(z[lv] for z, lv in zip(zeros, chosen)) >= target
        assert sum(e[lv] for e, lv in zip(errors, chosen)) == pytest.approx(brute_force(errors, zeros, target))
        coarse = allocate_levels(errors, zeros, target, buckets=7)  # rounded units: feasible, maybe not optimal
        assert sum(z[lv] for z, lv in zip(zeros, coarse)) >= target
    with pytest.raises(ValueError, match="out of reach"):
        allocate_levels([[0.0, 1.0]], [[0, 5]], 6)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 4))


def batches(n: int = 4):
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=gen)
    return [(torch.randn(64, 16, generator=gen) @ mix, torch.randint(0, 4, (64,), generator=gen)) for _ in range(n)]


GRID = (0.0, 0.5, 0.8, 0.9)


@pytest.fixture
def count_obs(monkeypatch):
    calls = [0]
    real = database.exact_obs

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(database, "exact_obs", counted)
    return calls


def test_database_holds_each_level_and_its_error(count_obs):
    model = mlp()
    db = build_database(model, batches(), grid=GRID)
    assert db.names == ["0.weight", "2.weight", "4.weight"] and count_obs[0] == 3 * len(GRID)
    for name in db.names:
        numel = db.weights[name][0].numel()
        assert [int((w == 0).sum()) for w in db.weights[name]] == db.zeros(name)
        assert db.zeros(name)[1] == numel // 2
        errs = db.errors[name].tolist()
        assert errs[0] == pytest.approx(0, abs=1e-6) and errs == sorted(errs)


def test_cache_is_reused_and_rebuilt_on_a_changed_checkpoint(tmp_path, count_obs):
    cache = tmp_path / "ckpt.obcdb.safetensors"
    model = mlp()
    first = build_database(model, batches(), grid=GRID, cache=cache)
    built = count_obs[0]
    assert cache.is_file() and first.source == "built" and built == 3 * len(GRID)
    again = build_database(model, batches(), grid=GRID, cache=cache)
    assert count_obs[0] == built and again.source == "cache"
    for name in first.names:
        assert torch.equal(first.weights[name], again.weights[name])
    with torch.no_grad():
        model[2].weight[0, 0] += 1.0  # another checkpoint
    rebuilt = build_database(model, batches(), grid=GRID, cache=cache)
    assert rebuilt.source == "built" and count_obs[0] == 2 * built
    build_database(model, batches(3), grid=GRID, cache=cache)  # another calibration set
    assert count_obs[0] == 3 * built


def test_a_foreign_cache_file_is_refused_and_rebuilt(tmp_path, count_obs):
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "db.safetensors"
    model = mlp()
    good = build_database(model, batches(), grid=GRID, cache=cache)
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(cache)
    for bad in (
        {**tensors, "w/2.weight": torch.zeros(len(GRID), 12, 33)},  # wrong shape, right key
        {**tensors, "e/0.weight": tensors["e/0.weight"].float()},  # wrong dtype
        {**tensors, "w/4.weight": torch.ones(len(GRID), 4, 12)},  # dense weights at every level
    ):
        save_file(bad, cache, metadata=meta)
        count_obs[0] = 0
        db = build_database(model, batches(), grid=GRID, cache=cache)
        assert db.source == "built" and count_obs[0] == 3 * len(GRID)
        assert torch.equal(db.weights["4.weight"], good.weights["4.weight"])
    marker = tmp_path / "executed"
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cache.write_bytes(pickle.dumps(Evil()))  # a pickle at the cache's name: never unpickled
    db = build_database(model, batches(), grid=GRID, cache=cache)
    assert db.source == "built" and not marker.exists()
    assert build_database(model, batches(), grid=GRID, cache=cache).source == "cache"


@pytest.mark.parametrize("sparsity", [0.6, 0.85])
def test_default_obc_is_never_worse_than_obc_at_global_allocation(sparsity):
    model = mlp()
    dense = copy.deepcopy(model)
    reference = [dense(x) for x, _ in batches()]
    inputs, targets = [x for x, _ in batches()], [y for _, y in batches()]
    baseline = copy.deepcopy(model)
    base_masks = prune_obc(baseline, sparsity, batches())
    report: dict = {}
    masks = prune_obc(model, sparsity, batches(), allocation="database", report=report)
    assert report["allocation"] in ("database", "magnitude")
    assert set(report["levels"]) == set(masks)
    loss = _calibration_loss(model, inputs, targets, reference)
    assert loss <= _calibration_loss(baseline, inputs, targets, reference) + 1e-9
    assert loss == pytest.approx(min(report["calibration_loss"].values()))
    # Exactly the global magnitude's total number of zeros, whichever allocation won.
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in masks)
    assert zeros == sum(int((~m).sum()) for m in base_masks.values())


def test_database_allocation_on_a_hugging_face_model_scores_its_logits():
    # A transformers model returns a ModelOutput, not a tensor: the calibration loss compared the two outputs
    # (TypeError: unsupported operand type(s) for -). It scores the logits.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    tokens = [torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    for calibration in (tokens, [(x, torch.randint(0, 3, (8,))) for x in tokens]):  # squared error, cross-entropy
        pruned = copy.deepcopy(model)
        report: dict = {}
        masks = prune_obc(pruned, 0.5, calibration, allocation="database", report=report)
        assert set(report["calibration_loss"]) == {"database", "magnitude"}
        zeros = sum(int((p == 0).sum()) for n, p in pruned.named_parameters() if n in masks)
        assert zeros == sum(int((~m).sum()) for m in masks.values())


@pytest.fixture(scope="module")
def trained_mlp_checkpoint(tmp_path_factory):
    """LeNet-300-100 on the 8x8 digits, trained 1 epoch by hand (well under 1 s)."""
    return trained_digits_mlp_checkpoint(tmp_path_factory.mktemp("obcdb") / "run" / "dense_best.pt", epochs=1)


def test_prune_command_obc_defaults_to_the_database_and_reuses_its_cache(trained_mlp_checkpoint, capsys,
                                                                        monkeypatch):
    from sparsetrain.cli import main
    from sparsetrain.train import checkpoint

    calls = [0]
    real = database.exact_obs

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(database, "exact_obs", counted)
    out_dir = trained_mlp_checkpoint.parent / "obcdb"
    argv = ["prune", str(trained_mlp_checkpoint), "--method", "obc", "--sparsity", "0.5,0.9", "--calibration",
            "128", "--out-dir", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    cache = trained_mlp_checkpoint.with_name(trained_mlp_checkpoint.name + ".obcdb.safetensors")
    assert cache.is_file() and f"built and cached in {cache}" in out
    assert "layer error" in out and "allocation" in out
    first = calls[0]
    assert first >= 3 * 12  # three layers at the 12 default levels (+ exact top-ups)
    assert main([*argv, "--force"]) == 0
    out = capsys.readouterr().out
    assert f"loaded from {cache}" in out and calls[0] - first <= 2 * 3  # at most top-ups, no database rebuild
    for s in ("0.5", "0.9"):
        data = checkpoint.load(out_dir / f"pruned_s{s}.pt")
        assert data["metrics"]["allocation"] in ("database", "magnitude") and data["metrics"]["layer_error"] >= 0
        assert data["metrics"]["sparsity"] == pytest.approx(float(s), abs=1e-3)
        assert main(["eval", str(out_dir / f"pruned_s{s}.pt")]) == 0
    assert "acc" in capsys.readouterr().out.lower()
    assert main(["prune", str(trained_mlp_checkpoint), "--allocation", "database"]) == 2
    assert "needs --method obc" in capsys.readouterr().err
