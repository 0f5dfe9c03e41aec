"""The Lightning callback, with the real lightning package, on a small MLP over random data (CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning")

from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from sparsetrain.integrations.lightning import CHECKPOINT_KEY, SparsetrainCallback  # noqa: E402


class Classifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader(n: int = 64, batch: int = 8) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=generator)
    y = (x[:, :4].argmax(1)).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(tmp_path, callbacks, **options) -> Trainer:
    settings = dict(accelerator="cpu", devices=1, max_epochs=4, enable_progress_bar=False, logger=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                    log_every_n_steps=1)  # fmt: skip
    settings.update(options)
    return Trainer(callbacks=callbacks, **settings)


def acdc(**options) -> SparsetrainCallback:
    # 4 epochs of 4 optimizer steps (8 batches, accumulation 2): dense 0-2, sparse 2-4, dense 4-10, sparse 10-16.
    return SparsetrainCallback("acdc", sparsity=0.9, unit="steps", warmup=2, compressed=2, decompressed=2, final=6)


class MaskWatch(Callback):
    """After every batch: the masked weights of ``callback`` are exactly +0.0 and the count is the global step."""

    def __init__(self, callback: SparsetrainCallback) -> None:
        self.callback, self.steps, self.metrics = callback, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sparsifier = self.callback.sparsifier
        assert sparsifier.count == trainer.global_step
        for name, mask in sparsifier.masks.items():
            masked = sparsifier.params[name].detach()[~mask]
            assert torch.equal(masked, torch.zeros_like(masked)) and not masked.signbit().any(), name
        self.steps.append(trainer.global_step)
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("sparsetrain/")})


def test_masks_are_zero_after_every_step_with_accumulation_and_logged(tmp_path):
    callback = acdc()
    watch = MaskWatch(callback)
    trainer(tmp_path, [callback, watch], accumulate_grad_batches=2).fit(Classifier(), loader())
    sparsifier = callback.sparsifier
    assert sparsifier.total_steps == 16 and sparsifier.steps_per_epoch == 4
    assert watch.steps == [(batch + 1) // 2 for batch in range(32)]  # a step every second batch
    assert sparsifier.count == 16 and sparsifier.phase == "sparse"
    assert sparsifier.sparsity().overall == pytest.approx(0.9, abs=1e-3)
    assert watch.metrics[-1] == {
        "sparsetrain/sparsity": pytest.approx(0.9, abs=1e-3),
        "sparsetrain/target_sparsity": pytest.approx(0.9),
        "sparsetrain/dense_phase": 0.0,
    }
    assert watch.metrics[7]["sparsetrain/dense_phase"] == 1.0  # after step 4: the decompressed phase
    assert callback.dense_twin["step"] == 10


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize("method", ["acdc", "rigl"])
def test_resume_is_bit_identical(tmp_path, method):
    def callback():
        return acdc() if method == "acdc" else SparsetrainCallback("rigl", sparsity=0.9, delta=2)

    whole_callback = callback()
    whole = Classifier()
    trainer(tmp_path / "whole", [whole_callback], accumulate_grad_batches=2).fit(whole, loader())

    first = callback()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_last=False)
    trainer(tmp_path / "cut", [first, StopAfterEpoch(2), saver], accumulate_grad_batches=2,
            enable_checkpointing=True).fit(Classifier(), loader())  # fmt: skip
    assert first.sparsifier.count == 8
    (path,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1:]
    saved = torch.load(path, weights_only=True)[CHECKPOINT_KEY]
    assert saved["step"] == 8 and saved["sparsifier"]["count"] == 8

    resumed_callback = callback()
    resumed = Classifier()
    trainer(tmp_path / "cut", [resumed_callback], accumulate_grad_batches=2).fit(resumed, loader(), ckpt_path=path)
    assert resumed_callback.sparsifier.count == whole_callback.sparsifier.count == 16
    for (name, expected), got in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(got, expected), name
    for name, mask in whole_callback.sparsifier.masks.items():
        assert torch.equal(resumed_callback.sparsifier.masks[name], mask), name


def test_resume_from_a_checkpoint_without_the_state_is_refused(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [StopAfterEpoch(1), saver], enable_checkpointing=True).fit(Classifier(), loader())
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    with pytest.raises(ValueError, match="holds no 'sparsetrain' state"):
        trainer(tmp_path, [acdc()]).fit(Classifier(), loader(), ckpt_path=path)


def test_missing_lightning_says_which_extra():
    code = "import sys; sys.modules['lightning'] = None; import sparsetrain.integrations.lightning"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pip install 'sparsetrain[lightning]'" in result.stderr


def test_a_masked_optimizer_from_configure_optimizers_masks_inside_its_update(tmp_path):
    """``configure_optimizers`` returning ``MaskedSGD``: the callback hands it the masks, the gradient pass is
    skipped, and the masked weights are +0.0 after every step (MaskWatch)."""
    from sparsetrain.optim import MaskedSGD

    class MaskedClassifier(Classifier):
        def configure_optimizers(self):
            return MaskedSGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    callback = acdc()
    watch = MaskWatch(callback)
    trainer(tmp_path, [callback, watch]).fit(MaskedClassifier(), loader())
    sparsifier = callback.sparsifier
    assert type(sparsifier._masks_handed_to).__name__ == "MaskedSGD"
    assert sparsifier.count == 32 and sparsifier.phase == "sparse"
    assert sparsifier.enforcement["skipped"] > 0
    assert sparsifier.sparsity().overall == pytest.approx(0.9, abs=1e-3)
