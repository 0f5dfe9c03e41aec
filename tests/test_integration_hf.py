"""The Hugging Face Trainer callback, with the real transformers and accelerate packages, on tiny randomly
initialised GPT-2 and BERT models built from configs (no download)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from sparsetrain.integrations.huggingface import STATE_FILE, SparsetrainCallback  # noqa: E402

VOCAB, LENGTH = 50, 16


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=3)  # fmt: skip
    return BertForSequenceClassification(config)


def lm_data(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def classification_data(n: int, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    return [{"input_ids": row, "labels": int(row[0] % 3)} for row in ids]


def arguments(out, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                   learning_rate=1e-3, max_steps=12, logging_steps=2, save_strategy="no", seed=0,
                   disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
    options.update(overrides)
    return TrainingArguments(**options)


def acdc(**options) -> SparsetrainCallback:
    # AC/DC in steps: dense 0-2, sparse 2-4, dense 4-6, ... , sparse from 8 to the end of 12 steps.
    timeline = dict(unit="steps", warmup=2, compressed=2, decompressed=2, final=4)
    return SparsetrainCallback("acdc", sparsity=0.9, **{**timeline, **options})


class MaskWatch(TrainerCallback):
    """After every optimizer step: the masked weights of ``callback`` are exactly +0.0."""

    def __init__(self, callback: SparsetrainCallback) -> None:
        self.callback, self.steps, self.sparse_steps = callback, [], 0

    def on_step_end(self, args, state, control, **kwargs):
        sparsifier = self.callback.sparsifier
        assert sparsifier.count == state.global_step
        for name, mask in sparsifier.masks.items():
            weight = sparsifier.params[name].detach()
            masked = weight[~mask]
            assert torch.equal(masked, torch.zeros_like(masked)) and not masked.signbit().any(), name
        self.sparse_steps += sparsifier.sparsity_of_masks() > 0
        self.steps.append(state.global_step)


@pytest.mark.parametrize("build,data", [(gpt2, lm_data), (bert, classification_data)], ids=["gpt2", "bert"])
def test_masks_are_zero_after_every_step_and_logged(tmp_path, build, data):
    callback = acdc()
    watch = MaskWatch(callback)
    trainer = Trainer(model=build(), args=arguments(tmp_path), train_dataset=data(32), callbacks=[callback, watch])
    trainer.train()
    assert watch.steps == list(range(1, 13))
    assert watch.sparse_steps >= 6  # the compressed phases were reached through the Trainer's own steps
    sparsifier = callback.sparsifier
    assert sparsifier.count == 12 and sparsifier.phase == "sparse"
    assert sparsifier.sparsity().overall == pytest.approx(0.9, abs=1e-3)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6, 8, 10, 12]
    assert [entry["phase"] for entry in logged] == ["sparse", "dense", "dense", "sparse", "sparse", "sparse"]
    assert logged[-1]["sparsity"] == pytest.approx(0.9, abs=1e-3) and logged[-1]["target_sparsity"] == 0.9
    assert logged[0]["learning_rate"] > logged[-1]["learning_rate"]  # the Trainer's linear decay, untouched


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    callback = SparsetrainCallback("gmp", sparsity=0.8)
    watch = MaskWatch(callback)
    # 40 samples, batches of 4, accumulation 2: 10 batches, 5 optimizer steps per epoch, 2 epochs.
    args = arguments(tmp_path, max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=2)
    trainer = Trainer(model=gpt2(), args=args, train_dataset=lm_data(40), callbacks=[callback, watch])
    trainer.train()
    sparsifier = callback.sparsifier
    assert sparsifier.total_steps == 10 and sparsifier.steps_per_epoch == 5
    assert sparsifier.count == trainer.state.global_step == 10
    assert watch.steps == list(range(1, 11))
    assert sparsifier.sparsity().overall == pytest.approx(0.8, abs=1e-3)  # the schedule ran to its end


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def final_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("method,options", [("acdc", {}), ("rigl", {"delta": 2})], ids=["acdc", "rigl"])
def test_resume_is_bit_identical(tmp_path, method, options):
    def callback():
        if method == "acdc":
            return acdc()
        return SparsetrainCallback(method, sparsity=0.9, **options)

    # Adam moments, dropout, the linear LR decay and gradient accumulation all cross the interruption.
    overrides = dict(save_strategy="steps", save_steps=5, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    whole = callback()
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path / "whole", **overrides), train_dataset=lm_data(48),
                      callbacks=[whole])  # fmt: skip
    trainer.train()
    expected = final_weights(trainer)

    first = callback()
    interrupted = Trainer(model=gpt2(), args=arguments(tmp_path / "cut", **overrides), train_dataset=lm_data(48),
                          callbacks=[first, StopAt(5)])  # fmt: skip
    interrupted.train()
    assert first.sparsifier.count == 5
    saved = torch.load(tmp_path / "cut" / "checkpoint-5" / STATE_FILE, weights_only=True)
    assert saved["step"] == 5 and saved["sparsifier"]["count"] == 5 and saved["method"] == method
    assert set(saved["sparsifier"]["masks"]) == set(first.sparsifier.masks)

    resumed = callback()
    again = Trainer(model=gpt2(), args=arguments(tmp_path / "cut", **overrides), train_dataset=lm_data(48),
                    callbacks=[resumed])  # fmt: skip
    again.train(resume_from_checkpoint=True)
    assert resumed.sparsifier.count == whole.sparsifier.count == 12
    got = final_weights(again)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    for name, mask in whole.sparsifier.masks.items():
        assert torch.equal(resumed.sparsifier.masks[name], mask), name
    if method == "acdc":
        assert whole.dense_twin is not None and resumed.dense_twin["step"] == whole.dense_twin["step"]


def test_resume_without_the_state_file_is_refused(tmp_path):
    args = arguments(tmp_path, save_strategy="steps", save_steps=4, max_steps=8)
    trainer = Trainer(model=gpt2(), args=args, train_dataset=lm_data(32), callbacks=[acdc(), StopAt(4)])
    trainer.train()
    (tmp_path / "checkpoint-4" / STATE_FILE).unlink()
    again = Trainer(model=gpt2(), args=args, train_dataset=lm_data(32), callbacks=[acdc()])
    with pytest.raises(ValueError, match="no sparsetrain.pt was found"):
        again.train(resume_from_checkpoint=True)


def test_state_of_another_checkpoint_is_refused(tmp_path):
    args = arguments(tmp_path, save_strategy="steps", save_steps=4, max_steps=12)
    trainer = Trainer(model=gpt2(), args=args, train_dataset=lm_data(32), callbacks=[acdc(), StopAt(8)])
    trainer.train()
    os.replace(tmp_path / "checkpoint-4" / STATE_FILE, tmp_path / "checkpoint-8" / STATE_FILE)
    again = Trainer(model=gpt2(), args=args, train_dataset=lm_data(32), callbacks=[acdc()])
    with pytest.raises(ValueError, match="saved at optimizer step 4, the run resumes at step 8"):
        again.train(resume_from_checkpoint=True)


def test_follows_a_recreated_optimizer(tmp_path):
    callback = acdc()
    watch = MaskWatch(callback)
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path), train_dataset=lm_data(32), callbacks=[callback, watch])
    trainer.train()
    old = callback.session.optimizer
    trainer.optimizer, trainer.lr_scheduler = None, None  # the Trainer builds new ones at the next train()
    watch.steps = []
    trainer.train()
    assert callback.session.optimizer is not old and not old._optimizer_step_pre_hooks
    assert watch.steps == list(range(1, 13))  # masks zero after every step with the new optimizer too


def test_dense_twin_scored_on_the_eval_set(tmp_path):
    callback = acdc()
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8)
    trainer = Trainer(model=gpt2(), args=args, train_dataset=lm_data(32), eval_dataset=lm_data(16, seed=5),
                      callbacks=[callback])  # fmt: skip
    trainer.train()
    twin = callback.dense_twin
    assert twin["step"] == 8 and twin["eval_loss"] is not None  # the end of the decompressed phase 4-8
    model = gpt2()
    model.load_state_dict(twin["state"])
    weights = [p for n, p in model.named_parameters() if n in callback.sparsifier.params]
    assert sum(int((w == 0).sum()) for w in weights) < 0.5 * sum(w.numel() for w in weights)  # dense, not pruned


def test_missing_transformers_says_which_extra():
    code = "import sys; sys.modules['transformers'] = None; import sparsetrain.integrations.huggingface"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pip install 'sparsetrain[hf]'" in result.stderr and "transformers" in result.stderr


def test_methods_with_their_own_optimizer_are_refused(tmp_path):
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path), train_dataset=lm_data(8),
                      callbacks=[SparsetrainCallback("rda", sparsity=0.9)])  # fmt: skip
    with pytest.raises(ValueError, match="trains with its own optimizer"):
        trainer.train()


def test_a_masked_optimizer_handed_to_the_trainer_masks_inside_its_update(tmp_path):
    """``optimizers=(MaskedAdamW(...), None)``: the callback attaches to it under accelerate's wrapper, hands it
    the masks (no gradient pass), and the masked weights are +0.0 after every step of the compressed phases."""
    from sparsetrain.optim import MaskedAdamW

    model = gpt2()
    optimizer = MaskedAdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    callback = acdc(enforce="check")  # asserts +0.0 at every step whose re-zeroing is skipped
    watch = MaskWatch(callback)
    handed = []

    class Handed(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            handed.append(len(optimizer._step_masks))

    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=lm_data(32), optimizers=(optimizer, None),
                      callbacks=[callback, watch, Handed()])  # fmt: skip
    trainer.train()
    sparsifier = callback.sparsifier
    assert sparsifier._masks_handed_to is optimizer
    assert max(handed) == len(sparsifier.params) and 0 in handed  # masks in the compressed phases, none in dense
    assert sparsifier.enforcement["skipped"] > 0
    assert sparsifier.sparsity().overall == pytest.approx(0.9, abs=1e-3)
