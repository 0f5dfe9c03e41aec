"""Sparse training at scale: masks at 1 byte per weight (packed to a bit where they only feed a statistic), exact
zeros from boolean masks, enforcement only where the optimizer needs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.shared import assert_masked_plus_zero, roundtrip
from torch import nn

import sparsetrain
from sparsetrain import maskops
from sparsetrain.core import sparsifier as engine
from sparsetrain.core.packed_masks import PackedMask


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def train(model, optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


ACDC = dict(unit="steps", warmup=2, compressed=2, decompressed=2, final=2)


# ------------------------------------------------------------------------------------ exact zeros, boolean masks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_zeroing_is_exact_across_blocks_and_keeps_kept_bits(monkeypatch, dtype):
    """Masks of every size around the block size, several tensors sharing one workspace fill: masked positions
    become +0.0 whatever they held (NaN, inf, -0.0), kept ones stay bit for bit (NaN and -0.0 included)."""
    monkeypatch.setattr(engine, "_BLOCK", 7)
    g = torch.Generator().manual_seed(0)
    sizes = [(3,), (7,), (2, 4), (13,), (5, 5), (1,)]
    tensors, masks = [], []
    for shape in sizes:
        t = torch.randn(shape, generator=g).to(dtype)
        flat = t.view(-1)
        flat[0], flat[-1] = float("nan"), -0.0
        if flat.numel() > 2:
            flat[1] = -float("inf")
        tensors.append(t)
        masks.append(torch.rand(shape, generator=g) < 0.5)
    before = [t.clone() for t in tensors]
    workspace: dict = {}
    engine._zero_where_masked(tensors, masks, workspace)
    int_type = engine._SAME_WIDTH_INT[tensors[0].element_size()]
    for t, b, m in zip(tensors, before, masks):
        assert torch.equal(t.view(int_type)[~m], torch.zeros_like(t.view(int_type)[~m]))  # all-zero bits: +0.0
        assert torch.equal(t.view(int_type)[m], b.view(int_type)[m])
    assert all(w.numel() == 7 for w in workspace.values())  # one block, reused, whatever the tensors' sizes


def test_masks_are_not_copied_for_enforcement():
    """The enforcement holds the boolean masks themselves, not integer or float copies of them."""
    model = mlp()
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.9, total_steps=10, unit="steps", at=0)
    sparsifier.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert sparsifier._enforced_masks
    for name, mask in sparsifier._enforced_masks.items():
        assert mask is sparsifier.masks[name] and mask.dtype == torch.bool


# ------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("method, options", [("magnitude", dict(unit="steps", at=0)),
                                             ("gmp", dict(unit="steps", start=0, end=6, frequency=2)),
                                             ("rigl", dict(delta=2)), ("acdc", ACDC)])  # fmt: skip
def test_memory_bytes_is_one_byte_per_weight_plus_a_packed_bit_for_acdc(method, options):
    model = mlp()
    sparsifier = sparsetrain.create(method, model, sparsity=0.9, total_steps=12, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach(optimizer)
    train(model, optimizer, 12)
    report = sparsifier.memory_bytes()
    n = sum(p.numel() for p in sparsifier.params.values())
    assert report.parameters == n
    assert report.masks == n  # bool masks
    if method == "acdc":  # its previous compressed phase's masks, a bit each (each layer padded to a byte)
        packed = sum((p.numel() + 7) // 8 for p in sparsifier.params.values())
        assert report.method_state == packed
        assert report.bytes_per_parameter == pytest.approx(1.125, abs=1e-3)
    else:
        assert report.method_state == 0
        assert report.bytes_per_parameter == 1.0
    assert 0 < report.workspace <= 8 * engine._BLOCK
    assert report.total == report.masks + report.method_state + report.workspace


# ------------------------------------------------------------------------------------ AC/DC's packed previous masks
def test_packed_masks_round_trip_and_give_the_same_difference():
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (9,), (3, 5, 2), (64, 33)]:
        mask = torch.rand(shape, generator=g) < 0.3
        packed = maskops.pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        assert torch.equal(maskops.unpack_mask(packed, shape), mask)
    old = {"a": torch.rand(10, 9, generator=g) < 0.2, "b": torch.rand(13, generator=g) < 0.6}
    new = {"a": torch.rand(10, 9, generator=g) < 0.3, "b": torch.rand(13, generator=g) < 0.5}
    packed = maskops.packed_relative_mask_difference(
        {n: maskops.pack_mask(m) for n, m in old.items()}, {n: maskops.pack_mask(m) for n, m in new.items()}
    )
    assert packed == maskops.relative_mask_difference(old, new)
    with pytest.raises(ValueError, match="packed mask of shape"):
        maskops.unpack_mask(torch.zeros(3, dtype=torch.uint8), (30,))


def test_acdc_reads_previous_masks_saved_unpacked():
    """A checkpoint from before the packing holds the previous masks as booleans: the resumed run packs them and
    reports the same mask difference as a run that never stopped."""
    model = mlp()
    options = dict(unit="steps", warmup=2, compressed=2, decompressed=2, final=4)
    sparsifier = sparsetrain.create("acdc", model, sparsity=0.9, total_steps=10, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach(optimizer)
    train(model, optimizer, 4)  # compressed at 2, dense from 4
    state = roundtrip(sparsifier.state_dict())
    packed = state["extra"]["last_sparse_masks"]
    state["extra"]["last_sparse_masks"] = {
        n: maskops.unpack_mask(p, sparsifier.params[n].shape) for n, p in packed.items()
    }
    saved = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    train(model, optimizer, 4, start=4)  # compressed again at 6
    model2 = mlp(seed=1)
    sparsifier2 = sparsetrain.create("acdc", model2, sparsity=0.9, total_steps=10, **options)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    sparsifier2.attach(optimizer2)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    sparsifier2.load_state_dict(state)
    train(model2, optimizer2, 4, start=4)
    differences = [[e["mask_difference_pct"] for e in s.history if e["event"] == "compress"]
                   for s in (sparsifier, sparsifier2)]  # fmt: skip
    assert differences[0][-1] is not None and differences[0] == differences[1]


# ------------------------------------------------------------------------------------ enforcement only where needed
def magnitude_run(optimizer_factory, enforce: str = "auto"):
    model = mlp()
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.9, total_steps=20, unit="steps", at=0,
                                    enforce=enforce)  # fmt: skip
    optimizer = optimizer_factory(model.parameters())
    sparsifier.attach(optimizer)
    return model, sparsifier, optimizer


@pytest.mark.parametrize("name, factory, skips", [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4), True),
    ("sgd-plain", lambda p: torch.optim.SGD(p, lr=0.05), True),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3, amsgrad=True), True),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01), True),
    ("adam-eps0", lambda p: torch.optim.Adam(p, lr=0.01, eps=0.0), False),  # 0 / 0 at a kept-zero second moment
    ("adamw-large-decay", lambda p: torch.optim.AdamW(p, lr=0.5, weight_decay=3.0), False),  # 1 - lr wd < 0: -0.0
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9), False),  # no proof for it: re-zeroed
    # torch's fused kernels apply the same update rules, so the same proofs hold ('check' asserts them)
    ("sgd-fused", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                            fused=True), True),
    ("sgd-fused-maximize", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, maximize=True, fused=True), True),
    ("adam-fused", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3, amsgrad=True, fused=True), True),
    ("adamw-fused", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01, fused=True), True),
    ("adamw-fused-large-decay", lambda p: torch.optim.AdamW(p, lr=0.5, weight_decay=3.0, fused=True), False),
])  # fmt: skip
def test_rezeroing_is_skipped_exactly_where_the_optimizer_keeps_zeros(name, factory, skips):
    model, sparsifier, optimizer = magnitude_run(factory, enforce="check")
    train(model, optimizer, 10)
    assert_masked_plus_zero(sparsifier)
    # The first step after attach enforces everything; every later one is skipped exactly when proven.
    assert sparsifier.enforcement == ({"rezeroed": 1, "skipped": 9} if skips else {"rezeroed": 10, "skipped": 0})
    assert sparsetrain.core.sparsifier.optimizer_keeps_zeros(optimizer) is skips


def test_enforce_always_rezeroes_every_step_and_bad_mode_is_refused():
    model, sparsifier, optimizer = magnitude_run(lambda p: torch.optim.SGD(p, lr=0.05), enforce="always")
    train(model, optimizer, 5)
    assert sparsifier.enforcement == {"rezeroed": 5, "skipped": 0}
    with pytest.raises(ValueError, match="enforce must be one of auto, always, check; got 'sometimes'"):
        sparsetrain.create("magnitude", mlp(), sparsity=0.5, total_steps=5, enforce="sometimes")


def test_loading_weights_or_optimizer_state_enforces_the_next_step_in_full():
    """Weights or momentum loaded from elsewhere (a dense checkpoint) may be nonzero at masked positions: the next
    step re-zeroes the weights and clears the momentum there, then skipping resumes."""
    def sgd(p):
        return torch.optim.SGD(p, lr=0.05, momentum=0.9)

    model, sparsifier, optimizer = magnitude_run(sgd)
    dense_model = mlp(seed=3)
    dense_optimizer = sgd(dense_model.parameters())
    train(dense_model, dense_optimizer, 2)
    train(model, optimizer, 3)
    optimizer.load_state_dict(dense_optimizer.state_dict())  # momentum everywhere
    train(model, optimizer, 1, start=3)
    assert_masked_plus_zero(sparsifier)
    for name, param in sparsifier.params.items():
        assert torch.all(optimizer.state[param]["momentum_buffer"][~sparsifier.masks[name]] == 0)
    model.load_state_dict(dense_model.state_dict())  # dense weights
    train(model, optimizer, 1, start=4)
    assert_masked_plus_zero(sparsifier)
    train(model, optimizer, 3, start=5)
    assert_masked_plus_zero(sparsifier)
    assert sparsifier.enforcement == {"rezeroed": 3, "skipped": 5}


def test_check_mode_names_a_weight_written_outside_the_optimizer():
    model, sparsifier, optimizer = magnitude_run(lambda p: torch.optim.SGD(p, lr=0.05), enforce="check")
    train(model, optimizer, 2)
    with torch.no_grad():
        model[0].weight[~sparsifier.masks["0.weight"]] = 1.0
    with pytest.raises(RuntimeError, match="masked weights of '0.weight' are not \\+0.0"):
        train(model, optimizer, 1, start=2)
    sparsifier.apply_masks()
    assert_masked_plus_zero(sparsifier)


def test_step_by_hand_never_skips():
    """Without the pre-step hook the gradients were not masked: the weights move, and are re-zeroed every step."""
    model = mlp()
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.9, total_steps=20, unit="steps", at=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(4):
        train(model, optimizer, 1, start=step)
        sparsifier.step(optimizer)
        assert_masked_plus_zero(sparsifier)
    assert sparsifier.enforcement == {"rezeroed": 4, "skipped": 0}


# ------------------------------------------------------------------------------------ FSDP2 on 2 gloo CPU processes
FSDP_WORKER = Path(__file__).parent / "helpers" / "fsdp_worker.py"
FSDP_RUNS = ["acdc", "acdc_nm", "gmp_uniform", "magnitude", "static", "rigl", "set", "gap", "imp", "acdc_packed",
             "rigl_packed", "acdc_masked_sgd", "rigl_masked_adamw"]


@pytest.fixture(scope="module")
def fsdp_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(FSDP_WORKER),
               str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("run", FSDP_RUNS)
def test_fsdp2_shards_train_to_one_exact_global_mask_and_resume_bit_identically(fsdp_report, run):
    """Every rank masks its own rows: after every step the gathered weights are +0.0 wherever the gathered masks
    are 0; every mask computed on the shards equals the single-process mask of the gathered scores (one global
    top-k, per-layer top-k, or N:M); the gathered weights end at exactly the asked count of zeros; a run saved
    and resumed on fresh objects ends bit-identical; masks cost 1 byte per weight (AC/DC 1/8 more; with Adam it
    also keeps the second moments of pruned weights; packed: 1/8 byte)."""
    entry = fsdp_report[run]
    assert entry["checks"] == []
    assert entry["mask_updates"] >= 1
    if run == "acdc_nm":
        assert entry["zeros"] == entry["total"] // 2
    else:
        assert entry["zeros"] == entry["total"] - maskops.keep_count(entry["total"], 0.9)
    assert entry["report_sparsity"] == pytest.approx(entry["zeros"] / entry["total"])
    assert entry["resume_bit_identical"] is True
    expected = {"acdc": 1.125, "acdc_nm": 5.125, "acdc_packed": 0.25, "rigl_packed": 0.125,
                "acdc_masked_sgd": 1.125}.get(run, 1.0)
    assert entry["memory_bytes_per_parameter"] == pytest.approx(expected, abs=0.002)
    assert entry["masks_in_optimizer"] is ("masked" in run)  # MaskedSGD / MaskedAdamW mask each rank's rows


@pytest.mark.parametrize("run", ["acdc", "acdc_packed", "acdc_nm", "gmp_uniform"])
def test_fsdp2_state_reshards_from_2_ranks_to_1_process_and_back(fsdp_report, run):
    """Saved on 2 ranks (each its rows), loaded by one unsharded process (Sparsifier.load_state_dicts), trained
    there, saved and loaded again on 2 ranks (each cutting its rows from the full state): at each load the weights
    equal the saved ones exactly and the masks, AC/DC's packed previous masks and kept second moments (Adam, 2:4)
    equal the saved ones gathered; masks are updated on both sides of each move; masked weights are +0.0 after
    every step and the run ends at exactly the asked count of zeros."""
    entry = fsdp_report["reshard"][run]
    assert entry["checks"] == []
    assert entry["loaded_1"] == entry["loaded_2"] == {"weights": True, "masks": True, "previous_masks": True,
                                                      "second_moments": True, "count": True}  # fmt: skip
    assert entry["previous_masks_saved"] == ([True, True] if run.startswith("acdc") else [False, False])
    if run == "acdc_nm":
        assert entry["second_moments_saved"][0] == 3  # Adam's exp_avg_sq of the pruned weights, every layer
        assert entry["zeros"] == entry["total"] // 2
    else:
        assert entry["zeros"] == entry["total"] - maskops.keep_count(entry["total"], 0.9)
    assert min(entry["mask_updates"]) >= 1


def split_by_rows(state: dict, cuts: dict[str, int]) -> list[dict]:
    """An unsharded state cut into the two pieces two ranks would save: rows [0, cut) and [cut, end) of each
    parameter, with their masks, kept second moments and AC/DC's packed previous masks."""
    pieces = []
    for part in (0, 1):
        piece = {**state, "masks": {}, "rows": {}, "second_moments": {}, "extra": dict(state["extra"])}
        previous = state["extra"].get("last_sparse_masks")
        if previous is not None:
            piece["extra"]["last_sparse_masks"] = {}
        for name, mask in state["masks"].items():
            cut, end = cuts[name], mask.shape[0]
            rows = slice(0, cut) if part == 0 else slice(cut, end)
            piece["masks"][name] = mask[rows]
            piece["rows"][name] = [rows.start, rows.stop, end]
            for key, value in state["second_moments"].get(name, {}).items():
                piece["second_moments"].setdefault(name, {})[key] = value[rows]
            if previous is not None:
                unpacked = maskops.unpack_mask(previous[name], mask.shape)[rows]
                piece["extra"]["last_sparse_masks"][name] = maskops.pack_mask(unpacked)
        pieces.append(piece)
    return pieces


@pytest.mark.parametrize("storage", ["bool", "packed"])
def test_state_saved_in_row_pieces_loads_in_any_order_and_refuses_what_does_not_fit(storage):
    """What a sharded run's resume on another number of ranks does, in one process: pieces of rows (cut at
    uneven places, given in any order) assemble into the saved masks, AC/DC's previous masks and Adam's kept
    second moments; pieces that leave rows uncovered, come from different steps or carry a malformed row span are
    refused in one line."""
    options = dict(ACDC, mask_storage=storage)
    model = mlp()
    sparsifier = sparsetrain.create("acdc", model, sparsity=0.75, total_steps=8, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sparsifier.attach(optimizer)
    train(model, optimizer, 7)  # in the second compressed phase: previous masks and kept second moments exist
    state = roundtrip(sparsifier.state_dict())
    assert state["second_moments"] and state["extra"]["last_sparse_masks"] is not None
    cuts = {"0.weight": 5, "2.weight": 16, "4.weight": 3}
    pieces = split_by_rows(state, cuts)
    fresh = sparsetrain.create("acdc", mlp(1), sparsity=0.75, total_steps=8, **options)
    fresh.load_state_dicts([pieces[1], pieces[0]])
    assert fresh.count == 7
    for name in state["masks"]:
        assert torch.equal(fresh.masks[name], state["masks"][name])
        assert torch.equal(fresh._last_sparse_masks[name], state["extra"]["last_sparse_masks"][name])
        for key, value in state["second_moments"].get(name, {}).items():
            assert torch.equal(fresh._second_moments[name][key], value)
    with pytest.raises(ValueError, match=r"saved pieces of '0.weight' hold rows 0-5 of its 32; this rank needs "
                                         r"rows 0-32: load the states of every rank"):  # fmt: skip
        fresh.load_state_dicts([pieces[0]])
    with pytest.raises(ValueError, match=r"saved at different steps \(6, 7\)"):
        fresh.load_state_dicts([pieces[0], {**pieces[1], "count": 6}])
    bad = {**pieces[1], "rows": {**pieces[1]["rows"], "2.weight": [16, 32, 33]}}
    with pytest.raises(ValueError, match=r"mask '2.weight' of rows 16-32 has shape \(16, 32\), parameter has \(32, "):
        fresh.load_state_dicts([pieces[0], bad])
    assert fresh.count == 7 and torch.equal(fresh.masks["0.weight"], state["masks"]["0.weight"])  # left as loaded


def test_method_state_that_cannot_be_split_by_rows_is_refused_naming_the_method():
    """IMP keeps its rewind weights per rank: loaded from pieces of rows, it says so in one line with the fix."""
    model = mlp()
    options = dict(sparsity=0.75, total_steps=12, unit="steps", rounds=2, pretrain=4, rewind=1)
    sparsifier = sparsetrain.create("imp", model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier.attach(optimizer)
    train(model, optimizer, 5)
    state = roundtrip(sparsifier.state_dict())
    assert state["extra"]["rewind_state"] is not None
    pieces = split_by_rows(state, {"0.weight": 8, "2.weight": 16, "4.weight": 2})
    fresh = sparsetrain.create("imp", mlp(1), **options)
    with pytest.raises(ValueError, match=r"method 'imp' keeps per-rank state \(rewind_state\) that cannot be split "
                                         r"over another number of ranks: load it on as many ranks as saved it \(2\)"):
        fresh.load_state_dicts(pieces)


def test_fsdp2_methods_that_cannot_shard_say_so(fsdp_report):
    for method, message in fsdp_report["refused"].items():
        assert f"method {method!r} does not support FSDP-sharded parameters" in message


# ------------------------------------------------------------------------------------ mask_storage='packed'
@pytest.mark.parametrize("block", [7, 8, 1 << 20])
def test_zeroing_from_packed_masks_equals_boolean_masks(monkeypatch, block):
    """The enforcement reading packed bits block by block gives the boolean masks' result bit for bit (block
    sizes that are and are not a multiple of 8, tensors not a multiple of 8 long)."""
    monkeypatch.setattr(engine, "_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    shapes = [(3,), (7,), (2, 4), (13,), (5, 5), (1,), (9, 3)]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    for t in tensors:
        t.view(-1)[0] = float("nan")
    masks = [torch.rand(s, generator=g) < 0.5 for s in shapes]
    packed = [PackedMask(maskops.pack_mask(m), m.shape) for m in masks]
    expected = [t.clone() for t in tensors]
    engine._zero_where_masked(expected, masks, {})
    engine._zero_where_masked(tensors, packed, {})
    for t, e in zip(tensors, expected):
        assert torch.equal(t.view(torch.int32), e.view(torch.int32))


@pytest.mark.parametrize("method, options", [("gmp", dict(unit="steps", start=0, end=8, frequency=2)),
                                             ("rigl", dict(delta=3)), ("acdc", ACDC), ("gap", dict(unit="steps",
                                              groups=2, rounds=2, period=3))])  # fmt: skip
def test_packed_storage_trains_bit_identically_at_an_eighth_of_a_byte(method, options):
    """Same run with boolean and packed masks: identical weights, masks and state_dict; 1/8 byte per weight
    (AC/DC: 1/4 with its previous masks), and a state_dict either storage loads."""
    runs = []
    for storage in ("bool", "packed"):
        torch.manual_seed(0)
        model = mlp()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        sparsifier = sparsetrain.create(method, model, sparsity=0.9, total_steps=12, mask_storage=storage, **options)
        sparsifier.attach(optimizer)
        train(model, optimizer, 12)
        runs.append((model, sparsifier))
    (dense_model, plain), (packed_model, packed) = runs
    for (name, a), b in zip(dense_model.state_dict().items(), packed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(plain.masks[n], packed.masks[n]) for n in plain.masks)
    assert all(packed.masks[n].dtype == torch.bool for n in plain.masks)
    assert packed.sparsity().overall == plain.sparsity().overall >= 0.89
    n = sum(p.numel() for p in packed.params.values())
    assert packed.memory_bytes().masks == sum((p.numel() + 7) // 8 for p in packed.params.values()) < n / 7
    # Checkpoints hold boolean masks whatever the storage: each loads into the other.
    state = packed.state_dict()
    assert all(m.dtype == torch.bool for m in state["masks"].values())
    plain.load_state_dict(state)
    packed.load_state_dict(runs[0][1].state_dict())
    assert all(torch.equal(plain.masks[n], packed.masks[n]) for n in plain.masks)


def test_packed_masks_reject_an_unknown_storage():
    with pytest.raises(ValueError, match="mask_storage must be one of bool, packed; got 'bits'"):
        sparsetrain.create("magnitude", mlp(), sparsity=0.5, mask_storage="bits")
