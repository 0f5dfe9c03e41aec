"""``sparsetrain prune`` on a language model's run: perplexity is what it reports, and one-shot M-FAC's vectorised
gradients run the zoo's gpt without vmap's fallback (and its warnings).

A tiny gpt (2 layers, width 32, context 16) trained one epoch on 64 windows of the recorded standard-library text:
barely trained, but every number of the pipeline is real and the whole module takes seconds.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
from helpers.shared import run_cli, trained_digits_mlp_checkpoint

import sparsetrain
from sparsetrain.cli import main
from sparsetrain.models import build_model
from sparsetrain.oneshot.mfac import _looped_gradients, _vmapped_gradients, fisher_gradients
from sparsetrain.train.checkpoint import load
from sparsetrain.train.evaluation import batch_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_GPT = {"layers": 2, "heads": 2, "width": 32}
TRAIN = ["train", "--model", "gpt", "--dataset", "text", "--method", "dense", "--epochs", "1", "--batch-size", "16",
         "--limit-train", "64", "--threads", "1", "--no-progress",
         "--set", "model_options={layers: 2, heads: 2, width: 32}",
         "--set", "dataset_options={context: 16, max_bytes: 20000}"]  # fmt: skip


cli = run_cli


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune-text") / "gpt"
    done = cli(*TRAIN, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def eval_perplexity(path: Path, capsys) -> str:
    """What ``sparsetrain eval`` prints as the file's test perplexity (3 decimals)."""
    capsys.readouterr()
    assert main(["eval", str(path)]) == 0
    return re.search(r"test perplexity: (\S+)", capsys.readouterr().out).group(1)


@pytest.mark.parametrize("method", ["magnitude", "mfac"])
def test_prune_of_a_text_run_reports_perplexity_as_eval_does(gpt_run: Path, method: str, capsys) -> None:
    out_dir = gpt_run.parent / method
    options = ["--gradients", "16"] if method == "mfac" else []
    done = cli("prune", str(gpt_run), "--method", method, "--sparsity", "0.5,0.8", *options, "--out-dir", str(out_dir))
    assert done.returncode == 0, done.stderr
    printed = done.stdout
    # Perplexity where the dataset's metric is perplexity: the headline, the header, and no accuracy anywhere.
    unpruned = re.search(r"^unpruned test perplexity: (\S+)$", printed, re.M)
    assert unpruned, printed
    assert re.search(r"^sparsity +pruned ppl +recalibrated ppl +file$", printed, re.M), printed
    assert "acc" not in printed
    # vmap batches the attention of the vectorised M-FAC gradients: nothing on stderr (no fallback warning).
    assert done.stderr == ""
    assert unpruned.group(1) == eval_perplexity(gpt_run, capsys)
    rows = re.findall(r"^ +(0\.\d+) +(\S+) +- +(\S+)$", printed, re.M)
    assert [float(s) for s, _, _ in rows] == pytest.approx([0.5, 0.8], abs=2e-3)
    for _, ppl, file in rows:
        assert math.isfinite(float(ppl)) and 1 < float(ppl) < 1e4
        # The same file evaluated by `sparsetrain eval`: the same perplexity, to the printed digit.
        assert ppl == eval_perplexity(Path(file), capsys)
        metrics = load(file)["metrics"]
        assert metrics["metric"] == "perplexity" and f"{metrics['test_ppl']:.3f}" == ppl
        assert metrics["test_ppl_pruned"] == metrics["test_ppl"]  # no batch norm: nothing re-calibrated
        assert f"{metrics['source_test_ppl']:.3f}" == unpruned.group(1)
    assert float(rows[1][1]) >= float(rows[0][1]) * 0.99  # more pruning does not make the model much better


def test_prune_of_a_classifier_run_still_reports_accuracy(tmp_path: Path, capsys) -> None:
    path = trained_digits_mlp_checkpoint(tmp_path / "run" / "dense_best.pt", epochs=1)
    assert main(["prune", str(path), "--sparsity", "0.5", "--calibrate", "0"]) == 0
    printed = capsys.readouterr().out
    assert "unpruned test accuracy: " in printed and "pruned acc recalibrated acc" in printed
    assert "perplexity" not in printed and "ppl" not in printed
    metrics = load(tmp_path / "run" / "pruned_s0.5.pt")["metrics"]
    assert metrics["metric"] == "accuracy" and "test_ppl" not in metrics and 0 <= metrics["test_acc"] <= 100


def test_vectorised_and_looped_fisher_gradients_agree_on_a_gpt_without_warnings(recwarn, caplog) -> None:
    torch.manual_seed(0)
    model = build_model("gpt", input_shape=(16,), num_classes=256, options=TINY_GPT)
    params = [p for p in model.parameters() if p.dim() >= 2]
    batches = [(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))) for _ in range(6)]
    d = sum(p.numel() for p in params)
    model.eval()
    vmapped = torch.empty(len(batches), d, dtype=torch.float64)
    looped = torch.empty_like(vmapped)
    with caplog.at_level(logging.INFO, logger="sparsetrain.oneshot.mfac"):
        _vmapped_gradients(model, params, batches, batch_loss, vmapped)
        _looped_gradients(model, params, batches, batch_loss, looped)
        through = fisher_gradients(model, params, batches, batch_loss)
    assert looped.abs().max() > 1e-3  # real gradients, not zeros
    torch.testing.assert_close(vmapped, looped, rtol=0, atol=1e-5)
    torch.testing.assert_close(through, looped * math.sqrt(2), rtol=0, atol=1e-5)  # times sqrt(batch size)
    assert [str(w.message) for w in recwarn] == []  # no "batching rule not implemented" fallback warning
    assert "vectorised gradients failed" not in caplog.text  # fisher_gradients took the vmap path


def test_the_python_api_prunes_a_hugging_face_gpt2_with_a_perplexity_readout(recwarn) -> None:
    # README's path for a model one already has: prune_oneshot, prune_obc and prune_mfac on a GPT-2 built from a
    # config (its Conv1D layers, tied head, ModelOutput return), scored by perplexity on held-out tokens.
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    keep = ["transformer.wte.weight", "transformer.wpe.weight"]  # the embeddings, and so the tied head, stay dense
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (48, 17), generator=generator)
    train = [(tokens[i : i + 8, :-1], tokens[i : i + 8, 1:]) for i in range(0, 32, 8)]
    x, y = tokens[32:, :-1], tokens[32:, 1:]

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config).eval()

    def perplexity(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return math.exp(float(batch_loss(model(x).logits, y)))

    dense = perplexity(fresh())
    results = {}
    for name, prune in {
        "magnitude": lambda m: sparsetrain.oneshot.prune_oneshot(m, 0.5, exclude=keep),
        "obc": lambda m: sparsetrain.oneshot.prune_obc(m, 0.5, train, num_samples=32, exclude=keep),
        # The default loss reads the ModelOutput's .logits, (N, T, C) against the (N, T) next tokens.
        "mfac": lambda m: sparsetrain.oneshot.prune_mfac(m, 0.5, train, num_gradients=16, exclude=keep),
    }.items():
        model = fresh()
        masks = prune(model)
        assert not set(masks) & set(keep) and len(masks) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per layer
        state = model.state_dict()
        zeros = sum(int((state[n] == 0).sum()) for n in masks)
        assert zeros == sum(state[n].numel() for n in masks) // 2
        assert torch.equal(state["transformer.wte.weight"], fresh().state_dict()["transformer.wte.weight"])
        results[name] = perplexity(model)
        assert math.isfinite(results[name]) and results[name] < 2 * dense, (name, results[name], dense)
    explicit = fresh()
    sparsetrain.oneshot.prune_mfac(explicit, 0.5, train, num_gradients=16, exclude=keep,
                                   loss_fn=lambda out, target: batch_loss(out.logits, target))  # fmt: skip
    assert perplexity(explicit) == pytest.approx(results["mfac"], rel=1e-6)
    assert not [w for w in recwarn if "batching rule" in str(w.message)]
