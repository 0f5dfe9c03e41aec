"""The zoo's transformers (gpt, vit), the text dataset, and a run of the trainer that reports perplexity.

Tiny sizes throughout (2 layers, width 32, context 16 or 32, a 60 KB corpus) so that every method can be run on
both models in seconds.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_conformance import SCHEDULES, TOTAL
from torch import nn

import sparsetrain
from sparsetrain.cli import format_summary, main
from sparsetrain.core import Capability
from sparsetrain.core.registry import get_method
from sparsetrain.core.selection import select_parameters
from sparsetrain.models import build_model, model_spec
from sparsetrain.structured import UnsupportedModel
from sparsetrain.train import data
from sparsetrain.train.checkpoint import load, restore_model
from sparsetrain.train.evaluation import batch_loss, evaluate

TINY_GPT = {"layers": 2, "heads": 2, "width": 32}
TINY_VIT = {"layers": 2, "heads": 2, "width": 32, "patch": 7}
PROJECTIONS = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.proj.weight", "fc.weight", "fc_out.weight")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: one thread is faster than two that contend with other processes for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpt(context: int = 16, **options) -> nn.Module:
    torch.manual_seed(0)
    return build_model("gpt", input_shape=(context,), num_classes=256, options={**TINY_GPT, **options})


def vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vit", input_shape=(1, 28, 28), num_classes=10, options=TINY_VIT)


# ---------------------------------------------------------------------------------------------------- the models
def test_gpt_is_causal_and_predicts_every_position() -> None:
    model = gpt().eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert a.shape == (2, 16, 256)
    assert torch.equal(a[:, :10], b[:, :10])  # no position sees a later token
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="longer than the model's context 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_tied_head_is_the_token_embedding_and_untied_is_its_own() -> None:
    tied, untied = gpt(), gpt(tied=False)
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    n = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n == 256 * 32


def test_model_options_are_checked_and_kept_in_the_spec() -> None:
    with pytest.raises(ValueError, match=r"model 'gpt' has no option 'layer'; its options: layers \(default 4\)"):
        build_model("gpt", input_shape=(16,), num_classes=256, options={"layer": 2})
    with pytest.raises(ValueError, match="option tied expects bool, got 1"):
        build_model("gpt", input_shape=(16,), num_classes=256, options={"tied": 1})
    with pytest.raises(ValueError, match="width 30 must be a multiple of heads 4"):
        build_model("gpt", input_shape=(16,), num_classes=256, options={"width": 30})
    with pytest.raises(ValueError, match="context=8 is shorter than the sequences"):
        build_model("gpt", input_shape=(16,), num_classes=256, options={"context": 8})
    with pytest.raises(ValueError, match="patch size 5 must divide the image size 28x28"):
        build_model("vit", input_shape=(1, 28, 28), num_classes=10, options={"patch": 5})
    with pytest.raises(ValueError, match="model 'lenet5' has no option 'width'; its options: none"):
        build_model("lenet5", input_shape=(1, 28, 28), num_classes=10, options={"width": 2})
    spec = json.loads(json.dumps(model_spec("gpt", (16,), 256, TINY_GPT)))
    assert spec == {"name": "gpt", "input_shape": [16], "num_classes": 256, "options": TINY_GPT}
    torch.manual_seed(0)
    rebuilt = build_model(**spec)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), gpt().state_dict().values()))


# ---------------------------------------------------------------------------------------------------- selection
def test_default_selection_sparsifies_projections_not_embeddings_or_norms() -> None:
    blocks = [f"blocks.{i}.{p}" for i in range(2) for p in PROJECTIONS]
    assert list(select_parameters(gpt())) == blocks  # the tied head is the token embedding: dense
    assert list(select_parameters(gpt(tied=False))) == [*blocks, "head.weight"]
    assert list(select_parameters(vit())) == [*blocks, "head.weight"]  # not patch_embed, cls_token, pos_embed
    # The declaration holds for a transformer inside another module too (its names then carry a prefix).
    wrapped = nn.Sequential(nn.Identity(), gpt())
    assert list(select_parameters(wrapped)) == [f"1.{name}" for name in blocks]
    # include replaces the default, exclude removes from it.
    assert list(select_parameters(gpt(), include="pos_emb.weight")) == ["pos_emb.weight"]
    assert "blocks.0.fc.weight" not in select_parameters(gpt(), exclude="*.fc.weight")


def test_a_tied_weight_is_one_parameter_under_either_name() -> None:
    model = gpt()
    # Naming the head selects the one shared tensor, keyed by its first name; excluding it by the head's name
    # removes the embedding too (they are one tensor: it cannot be both sparse and dense).
    chosen = select_parameters(model, include="head.weight")
    assert list(chosen) == ["tok_emb.weight"] and chosen["tok_emb.weight"] is model.head.weight
    assert select_parameters(model, include=["tok_emb.weight", "blocks.0.fc.weight"], exclude="head.weight") == {
        "blocks.0.fc.weight": model.blocks[0].fc.weight
    }
    # Sparsified through either name, the head computes with the masked embedding: one mask, exact zeros.
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.5, include="head.weight", total_steps=4, at=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.attach(optimizer)
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimizer.zero_grad()
        batch_loss(model(x[:, :-1]), x[:, 1:]).backward()
        optimizer.step()
    mask = sparsifier.masks["tok_emb.weight"]
    assert int((model.head.weight[~mask] != 0).sum()) == 0
    assert int((~mask).sum()) == 256 * 32 // 2


def _tokens(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    seq = torch.randint(0, 256, (4, 17), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _images(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)


@pytest.mark.parametrize("method", sparsetrain.list_methods())
@pytest.mark.parametrize("model_name", ["gpt", "vit"])
def test_every_method_trains_a_transformer_with_exact_zeros(method: str, model_name: str) -> None:
    model, batches = (gpt(), _tokens) if model_name == "gpt" else (vit(), _images)
    if getattr(get_method(method), "needs_example_input", False):
        # Structured methods prune zero-invariant channel groups, which attention and layer norms do not have:
        # refused with the operation that cannot be followed, never trained wrongly.
        with pytest.raises(UnsupportedModel):
            sparsetrain.create(method, model, sparsity=0.5, total_steps=TOTAL, example_input=batches(0)[0][:1])
        return
    embeddings = {n for n, _ in model.named_parameters() if "emb" in n or n == "cls_token"}
    sparsifier = sparsetrain.create(method, model, sparsity=0.8, total_steps=TOTAL, **SCHEDULES.get(method, {}))
    optimizer = sparsifier.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    sparsifier.attach(optimizer)
    assert set(sparsifier.params).isdisjoint(embeddings)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in embeddings}
    for step in range(TOTAL):
        x, y = batches(step)

        def closure(x=x, y=y) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        for name, mask in sparsifier.masks.items():
            assert int((sparsifier.params[name][~mask] != 0).sum()) == 0, (step, name)
    if Capability.SPARSE in get_method(method).capabilities:
        assert sparsifier.sparsity().overall == pytest.approx(0.8, abs=0.01)
    for name, value in before.items():  # trained, but never pruned
        weight = dict(model.named_parameters())[name]
        assert not torch.equal(weight, value) and int((weight == 0).sum()) == 0, name


# ---------------------------------------------------------------------------------------------------- text data
def _text_file(tmp_path: Path, size: int = 3000) -> tuple[Path, bytes]:
    content = bytes((i * 7 + i // 13) % 256 for i in range(size))
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    return path, content


def test_text_splits_by_position_into_shifted_windows(tmp_path: Path) -> None:
    path, content = _text_file(tmp_path)
    splits = data.load_dataset("text", data_dir=str(path), val_fraction=0.1, options={"context": 10})
    assert splits.metric == "perplexity" and splits.input_shape == (10,) and splits.num_classes == 256
    stream = torch.tensor(list(content))
    # 2400 training bytes, then 300 validation, then the last 300 test: windows of 10 with the next byte as target.
    for part, start, end in ((splits.train, 0, 2400), (splits.val, 2400, 2700), (splits.test, 2700, 3000)):
        x, y = part.tensors
        n = (end - start - 1) // 10
        assert x.shape == y.shape == (n, 10)
        assert torch.equal(x.flatten().long(), stream[start : start + 10 * n])
        assert torch.equal(y.flatten().long(), stream[start + 1 : start + 10 * n + 1])
    assert splits.info["sha256"] == hashlib.sha256(content).hexdigest()
    assert splits.info["split_tokens"] == {"train": 2400, "val": 300, "test": 300}
    limited = data.load_dataset("text", data_dir=str(path), options={"context": 10}, limit_train=5)
    assert len(limited.train) == 5


def test_default_corpus_is_the_standard_library_recorded() -> None:
    a = data.load_dataset("text", options={"context": 32, "max_bytes": 60_000})
    b = data.load_dataset("text", options={"context": 32, "max_bytes": 60_000})
    info = a.info
    assert info["source"] == "python standard library" and info["bytes"] == 60_000
    assert info["files"] == sorted(info["files"]) and info["files"][0].endswith(".py")
    expected = b"".join((Path(info["root"]) / f).read_bytes() for f in info["files"])[:60_000]
    assert info["sha256"] == hashlib.sha256(expected).hexdigest()
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])  # deterministic


def test_text_file_errors_say_what_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(path: Path | str, match: str, **options) -> None:
        with pytest.raises(data.DataError, match=match):
            data.load_dataset("text", data_dir=str(path), options=options)

    refused(tmp_path / "missing.txt", "missing.txt' does not exist")
    refused(tmp_path, "is not a regular file")
    (tmp_path / "empty.txt").write_bytes(b"")
    refused(tmp_path / "empty.txt", "empty.txt' is empty")
    path, _ = _text_file(tmp_path, 300)
    refused(path, r"300 tokens are too few for windows of 64 tokens in every split \(the val part has 30")
    refused(path, "has no option 'length'; its options: context", length=3)
    refused(path, "option context must be a positive number of tokens, got 0", context=0)
    monkeypatch.setattr(data, "MAX_TEXT_BYTES", 100)
    refused(path, "has 300 bytes, more than the 100 read into memory; .*max_bytes=N")
    assert data.load_dataset("text", data_dir=str(path), options={"context": 4, "max_bytes": 100}).info["bytes"] == 100


# ---------------------------------------------------------------------------------------------------- the trainer
RUN = ["train", "--model", "gpt", "--dataset", "text", "--method", "acdc", "--epochs", "4", "--batch-size", "32",
       "--optimizer", "adamw", "--lr", "0.003", "--threads", "1", "--no-progress",
       "--set", "model_options={layers: 2, heads: 2, width: 32}",
       "--set", "dataset_options={context: 32, max_bytes: 60000}",
       "--set", "method_options={unit: epochs, warmup: 1, compressed: 1, decompressed: 1, final: 1}"]  # fmt: skip


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "gpt"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main([*RUN, "--out", str(out)]) == 0
    return out, buffer.getvalue()


def test_acdc_on_gpt_reports_perplexity_everywhere(gpt_run) -> None:
    out, printed = gpt_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "perplexity" and summary["data"]["source"] == "python standard library"
    sparse, dense = summary["sparse_model"], summary["dense_model"]
    assert sparse["sparsity"] == pytest.approx(0.9, abs=1e-3) and dense["sparsity"] == 0
    assert 1 < sparse["test_ppl"] < 60 and 1 < dense["test_ppl"] < 60  # well below 256, chance for bytes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"train_ppl", "val_ppl", "test_ppl"} <= set(row) for row in rows)
    # The dense model of the pair is the dense phase with the lowest validation perplexity (only epoch 3 here).
    assert dense["epoch"] == 3 and dense["val_ppl"] <= rows[2]["val_ppl"] * 1.5
    assert "ppl: train" in printed and "| model                 | val ppl | test ppl | sparsity |" in printed
    # The checkpoint rebuilds the model with its options; evaluating it gives the summary's numbers.
    checkpoint = load(out / "sparse_final.pt")
    assert checkpoint["model_spec"]["options"] == TINY_GPT
    splits = data.load_run_dataset(checkpoint["config"])
    test = evaluate(restore_model(checkpoint, out), splits.test, 1000, torch.device("cpu"))
    assert test["ppl"] == pytest.approx(sparse["test_ppl"], rel=1e-5)


def test_summary_table_of_a_classification_run_is_unchanged() -> None:
    summary = {"method": "gmp", "sparse_model": {"val_acc": 80.0, "test_acc": 79.5, "sparsity": 0.9,
               "forward_flops_ratio": 0.1}, "dense_model": None, "train_flops_ratio": 0.5, "wall_time_s": 3.0,
               "out": "runs/x", "files": []}  # fmt: skip
    assert "| model          | val acc | test acc | sparsity |" in format_summary(summary)


def test_unknown_model_or_dataset_option_is_a_usage_error(tmp_path: Path, capsys) -> None:
    for option in ("model_options.layer=2", "dataset_options.ctx=2"):
        code = main(["train", "--model", "gpt", "--dataset", "text", "--set", option, "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and "its options:" in err and "Traceback" not in err


def test_eval_of_a_text_run_prints_perplexity(gpt_run, capsys) -> None:
    out, _ = gpt_run
    summary = json.loads((out / "summary.json").read_text())
    assert main(["eval", str(out)]) == 0
    assert f"test perplexity: {summary['sparse_model']['test_ppl']:.3f}" in capsys.readouterr().out


def test_a_tied_gpt_exports_to_safetensors_and_loads_back_tied(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from sparsetrain import export

    model = gpt()  # dense: its tensors are stored as they are, the tied one under both names
    export.save(model, tmp_path / "gpt.safetensors", metadata={"model_spec": model_spec("gpt", (16,), 256, TINY_GPT)})
    back = export.load(tmp_path / "gpt.safetensors")
    assert back.head.weight is back.tok_emb.weight
    assert torch.equal(back.tok_emb.weight, model.tok_emb.weight)


def test_an_export_claiming_a_huge_model_option_is_refused_at_once(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from sparsetrain import export

    # Building a billion layers, even on the meta device, would take hours before the shapes could refuse them.
    spec = model_spec("gpt", (16,), 256, {**TINY_GPT, "layers": 10**9})
    export.save(gpt(), tmp_path / "hostile.safetensors", metadata={"model_spec": spec})
    with pytest.raises(export.ExportError, match="options .* exceed the 42368 weights it holds"):
        export.load(tmp_path / "hostile.safetensors")


# ------------------------------------------ Hugging Face GPT-2: N:M groups run along a Conv1D's inputs (dim 0)
HF_VOCAB, HF_LENGTH = 128, 16


def hf_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=HF_VOCAB, n_positions=HF_LENGTH, n_embd=64, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def assert_nm_along_inputs(model: nn.Module, masks: dict[str, torch.Tensor], n: int = 2, m: int = 4) -> None:
    """Every Conv1D weight (stored (in, out)): each group of M consecutive inputs of an output column keeps N."""
    from transformers.pytorch_utils import Conv1D

    names = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)]
    assert len(names) == 4  # c_attn, attn c_proj, c_fc, mlp c_proj
    for name in names:
        mask = masks[name]
        kept = mask.reshape(mask.shape[0] // m, m, mask.shape[1]).sum(dim=1)  # (in / M groups, out)
        assert bool((kept == n).all()), f"{name}: not {n} of every {m} along dim 0"
        assert not bool((model.get_parameter(name)[~mask] != 0).any()), f"{name}: a pruned weight is not 0"


def test_hf_gpt2_sparsifier_nm_masks_run_along_each_conv1d_input_dimension() -> None:
    model = hf_gpt2()
    sparsifier = sparsetrain.create("magnitude", model, mask_type="2:4", total_steps=10)
    assert_nm_along_inputs(model, sparsifier.masks)
    from sparsetrain.core.selection import input_dim

    assert input_dim(model, "transformer.h.0.mlp.c_fc.weight") == 0
    assert input_dim(model, "transformer.wte.weight") == 1  # an embedding keeps dim 1, as before
    # A step with a real loss: the masks (recomputed at step 0 only) and the hard zeros hold after it.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.attach(optimizer)
    ids = torch.randint(HF_VOCAB, (2, HF_LENGTH), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert_nm_along_inputs(model, sparsifier.masks)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # M-FAC's vmap over GPT-2's attention
def test_hf_gpt2_oneshot_nm_masks_run_along_each_conv1d_input_dimension() -> None:
    from sparsetrain.oneshot import prune_mfac, prune_obc, prune_oneshot

    ids = torch.randint(HF_VOCAB, (8, HF_LENGTH), generator=torch.Generator().manual_seed(2))
    model = hf_gpt2()
    assert_nm_along_inputs(model, prune_oneshot(model, None, mask_type="2:4"))
    model = hf_gpt2()  # OBC / SparseGPT solve Linear and Conv2d; a Conv1D keeps its magnitude N:M mask
    assert_nm_along_inputs(model, prune_obc(model, None, [ids], mask_type="2:4"))

    def lm_loss(out, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten())

    model = hf_gpt2()
    masks = prune_mfac(model, None, [(ids, ids)], num_gradients=4, block_size=64, loss_fn=lm_loss, mask_type="2:4")
    assert_nm_along_inputs(model, masks)


def test_hf_gpt2_cram_compresses_each_conv1d_along_its_input_dimension() -> None:
    model = hf_gpt2()
    sparsifier = sparsetrain.create("cram", model, mask_type="2:4", total_steps=10)
    optimizer = sparsifier.make_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    masks = dict(zip(sparsifier.params, optimizer.compression_masks(0.5), strict=True))
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            module.weight.data.mul_(masks[f"{name}.weight"])  # assert_nm_along_inputs also checks the zeros
    assert_nm_along_inputs(model, masks)


def test_nm_checks_a_conv1d_weight_along_its_input_dimension() -> None:
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D  # noqa: N806

    torch.manual_seed(0)
    fits = nn.Sequential(Conv1D(6, 8))  # weight (in=8, out=6): 8 inputs take 2:4, 6 outputs need not
    for method in ("magnitude", "cram"):
        sparsifier = sparsetrain.create(method, fits, mask_type="2:4", total_steps=4)
        assert sparsifier.masks["0.weight"].shape == (8, 6)
    misfit = nn.Sequential(Conv1D(8, 6))  # weight (in=6, out=8): 6 inputs do not
    for method in ("magnitude", "cram"):
        with pytest.raises(ValueError, match=r"'0.weight' of shape \(6, 8\) has an input dimension \(dim 0\) \(6\) "
                                             r"that is not a multiple of 4; exclude it with exclude=\['0.weight'\]"):
            sparsetrain.create(method, misfit, mask_type="2:4", total_steps=4)


FSDP_CONV1D = """
import sys
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from transformers.pytorch_utils import Conv1D
import sparsetrain

dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
model = nn.Sequential(Conv1D(8, 16), nn.ReLU(), nn.Linear(8, 4))
fully_shard(model)
try:
    sparsetrain.create("magnitude", model, mask_type="2:4", total_steps=4)
except ValueError as error:
    print("refused:", error)
kept = sparsetrain.create("magnitude", model, mask_type="2:4", total_steps=4, exclude=["0.weight"])
print("excluded:", sorted(kept.masks))
dist.destroy_process_group()
"""


def test_fsdp_refuses_nm_groups_along_a_sharded_conv1d_dim0(tmp_path: Path) -> None:
    # FSDP shards dim 0, along which a Conv1D's N:M groups run; one process suffices to build the DTensors.
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, "-c", FSDP_CONV1D, str(tmp_path / "store")], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert ("refused: mask_type '2:4' on FSDP-sharded parameters (fully_shard): parameter '0.weight' is a "
            "transposed (in, out) Conv1D weight") in run.stdout  # fmt: skip
    assert "exclude it with exclude=['0.weight']" in run.stdout
    assert "excluded: ['2.weight']" in run.stdout
