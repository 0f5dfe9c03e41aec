"""Slim training: a channel-masked model trains and evaluates as the narrower network, with the full model's
outputs, gradients and batch-norm statistics; whole trainer runs equal to full-width ones; hooks; refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_structured import TRANSFORMERS, images, needs_fashion, real_input, zoo_model  # noqa: F401 (fixture)
from torch import nn

import sparsetrain
from sparsetrain.errors import ConfigError
from sparsetrain.models import build_model, list_models
from sparsetrain.structured import SlimTraining

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def channel_sparsifier(model: nn.Module, x: torch.Tensor, fraction: float = 1 / 3, seed: int = 2, whole=()):
    """A channel-mask sparsifier whose masks remove a random ``fraction`` of every set's groups (whole groups:
    producers, norms and consumers, as channel masks do), and every channel of the sets named in ``whole``."""
    s = sparsetrain.create("magnitude", model, sparsity=0.5, mask_type="channel", example_input=x[:1], total_steps=10)
    generator = torch.Generator().manual_seed(seed)
    masks = {n: torch.ones_like(m) for n, m in s.masks.items()}
    for channel_set in s.channel_groups.sets:
        chosen = torch.rand(channel_set.width, generator=generator) < fraction
        pruned = torch.arange(channel_set.width) if channel_set.name in whole else chosen.nonzero().squeeze(1)
        for member in channel_set.members:
            if not member.buffer:
                index = (pruned[:, None] * member.block + torch.arange(member.block)).reshape(-1)
                masks[member.name].index_fill_(member.dim, index, False)
    s.set_masks(masks, "test")  # zeroes the masked weights
    return s


def assert_close(expected: torch.Tensor, got: torch.Tensor, what: str = "") -> None:
    """Max abs difference <= 1e-5, relative to the values' scale where it exceeds 1."""
    expected, got = expected.detach(), got.detach()
    scale = max(1.0, float(expected.abs().max()))
    assert float((expected - got).abs().max()) <= 1e-5 * scale, what


def masked_grads(model: nn.Module, masks) -> dict[str, torch.Tensor]:
    """Each parameter's gradient with masked positions zeroed (what the step applies)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if name in masks:
            g[~masks[name]] = 0
        out[name] = g
    return out


@needs_fashion
@pytest.mark.parametrize("name", [m for m in list_models() if m not in TRANSFORMERS])
def test_every_zoo_model_slim_equals_masked_in_train_and_eval(name, images):  # noqa: F811
    # In float64: any difference beyond rounding would be a wrong channel, not float32 noise of a deep net (ResNet-56
    # float32 gradients differ by ~1e-5 of their scale from summing over fewer channels).
    x = real_input(name, images).double()
    model = zoo_model(name, x).double()
    s = channel_sparsifier(model, x)
    reference = copy.deepcopy(model)  # the full masked model, its class's forward
    slim = SlimTraining(s)
    y = torch.arange(x.shape[0]) % 10
    for mode in ("train", "eval"):
        for m in (model, reference):
            m.train(mode == "train")
            m.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        expected = reference(x)
        nn.functional.cross_entropy(expected, y).backward()
        assert_close(expected.detach(), out.detach(), f"{mode} outputs")
        got, want = masked_grads(model, s.masks), masked_grads(reference, s.masks)
        for param in got:
            assert_close(want[param], got[param], f"{mode} gradient of {param}")
        for (buffer, a), (_, b) in zip(model.named_buffers(), reference.named_buffers()):
            assert_close(b.double(), a.double(), f"{mode} buffer {buffer}")  # every channel, removed ones too
        # Gradients at removed channels are exactly zero without any masking: the slim network never saw them.
        for channel_set in s.channel_groups.sets:
            for member in channel_set.members:
                if not member.buffer and member.role == "producer":
                    p = model.get_parameter(member.name)
                    removed = ~s.masks[member.name].movedim(member.dim, 0).reshape(channel_set.width, -1).any(1)
                    assert torch.all(p.grad.movedim(member.dim, 0)[removed] == 0)
    widths = slim.summary()["widths"]
    assert sum(int(w.split("/")[0]) < int(w.split("/")[1]) for w in widths.values()) >= len(widths) / 2, widths
    assert slim.forwards["slim"] == 2 and slim.forwards["plain"] == 0 and slim.rebuilds == 1
    slim.remove()
    assert "forward" not in model.__dict__


def lenet_and_batch():
    torch.manual_seed(0)
    model = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    generator = torch.Generator().manual_seed(0)
    return model, torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,), generator=generator)


def test_channels_are_removed_by_masks_never_by_values_and_rebuilt_when_masks_change():
    model, x, y = lenet_and_batch()
    s = sparsetrain.create("magnitude", model, sparsity=0.5, mask_type="channel", example_input=x[:1], total_steps=4)
    s.set_masks({n: torch.ones_like(m) for n, m in s.masks.items()}, "dense")
    slim = SlimTraining(s)
    with torch.no_grad():
        # Weights all zero, unmasked: the channel still computes its bias and learns, so it must stay.
        model.features[0].weight[2].zero_()
        model.features[0].bias[2] = 0.5
    reference = copy.deepcopy(model)
    for m in (model, reference):
        nn.functional.cross_entropy(m(x), y).backward()
    assert slim.kept()["features.0"] == 6 and slim.forwards == {"slim": 0, "plain": 1}  # nothing removed: plain
    assert torch.equal(model.features[0].weight.grad, reference.features[0].weight.grad)
    assert model.features[0].weight.grad[2].abs().sum() > 0  # the zero weights learn
    masks = s.compute_masks(0.5, s.magnitude_scores())
    s.set_masks(masks, "prune")
    model(x)
    assert slim.kept() == {"features.0": 3, "features.3": 8, "classifier.1": 60, "classifier.3": 42}
    assert (slim.rebuilds, slim.forwards["slim"]) == (1, 1)
    s.set_masks({n: torch.ones_like(m) for n, m in masks.items()}, "dense again")
    model(x)
    assert slim.kept()["features.0"] == 6 and slim.forwards["plain"] == 2
    s.set_masks(masks, "the same channels again")  # a structure seen before is reused
    model(x)
    assert (slim.rebuilds, slim.mask_changes) == (1, 4)
    # Every channel of a set removed: one (zero) channel stays, as slim() keeps it.
    whole = channel_sparsifier(model, x, whole=("classifier.3",))
    slim.remove()
    slim = SlimTraining(whole)
    reference = copy.deepcopy(model)
    assert_close(reference(x), model(x))
    assert slim.kept()["classifier.3"] == 1 and slim.forwards["slim"] == 1


def test_a_model_converted_after_the_first_forward_gets_a_new_structure():
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(1, 8, 8), num_classes=10)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = channel_sparsifier(model, x)
    slim = SlimTraining(s)
    model(x)
    model.double()  # replaces every buffer: the running statistics the structure gathered from are gone
    reference = copy.deepcopy(model)
    out = model(x.double())
    assert out.dtype == torch.float64 and slim.rebuilds == 2
    assert_close(reference(x.double()), out)
    for (name, a), (_, b) in zip(model.named_buffers(), reference.named_buffers()):
        assert_close(b, a, name)  # the statistics were written into the converted buffers


def test_an_unreferenced_slim_training_keeps_the_model_working():
    import gc

    model, x, _ = lenet_and_batch()
    s = channel_sparsifier(model, x)
    SlimTraining(s)  # the object dropped, as a one-line use does: the patched model keeps it alive
    gc.collect()
    reference = copy.deepcopy(model)  # a copy gets its class's forward
    assert_close(type(model).forward(model, x), model(x))
    assert_close(type(reference).forward(reference, x), reference(x))


def test_a_copy_of_a_copy_computes_with_its_own_weights():
    import gc

    model, x, _ = lenet_and_batch()
    slim = SlimTraining(channel_sparsifier(model, x))
    first = copy.deepcopy(model)
    second = copy.deepcopy(first)  # a copy of a copy (a saved best model copied again)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(2)
    assert_close(type(second).forward(second, x), second(x))  # its own weights, not the first copy's
    del first
    gc.collect()
    assert_close(type(second).forward(second, x), second(x))
    assert slim.forwards["slim"] == 0  # the copies ran their own forwards, not the patched one


def test_a_plan_built_under_inference_mode_serves_the_training_forwards_after_it():
    from helpers.shared import conv_bn_net

    torch.manual_seed(0)
    model, x = conv_bn_net(), torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = channel_sparsifier(model, x)
    slim = SlimTraining(s)
    reference = copy.deepcopy(model)
    model.eval()
    with torch.inference_mode():  # the first forward after a prune is an evaluation
        model(x)
    model.train()
    out = model(x)
    out.sum().backward()  # autograd refuses indices created in inference mode
    assert_close(reference(x), out)
    assert slim.rebuilds == 1 and slim.forwards["slim"] == 1


def test_replaced_parameters_are_the_ones_the_forward_uses():
    model, x, _ = lenet_and_batch()  # no buffers: only the parameters' identities change
    s = channel_sparsifier(model, x)
    slim = SlimTraining(s)
    model(x)
    model.load_state_dict({k: 2 * v for k, v in model.state_dict().items()}, assign=True)  # new Parameter objects
    out = model(x)
    assert_close(type(model).forward(model, x), out)
    out.sum().backward()
    assert model.features[0].weight.grad is not None and slim.rebuilds == 2


def test_batch_norms_without_running_stats_or_with_a_cumulative_average_match_the_full_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 3),
    )  # fmt: skip
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    slim = SlimTraining(channel_sparsifier(model, x, fraction=0.5))
    reference = copy.deepcopy(model)
    for mode, context in ((True, torch.enable_grad), (True, torch.inference_mode), (False, torch.no_grad)):
        model.train(mode), reference.train(mode)
        with context():
            assert_close(reference(x), model(x), f"training={mode} {context.__name__}")
    # The cumulative average (momentum=None) decays the cut channels by 1/num_batches_tracked, as the full model.
    for (name, a), (_, b) in zip(model.named_buffers(), reference.named_buffers()):
        assert_close(b.double(), a.double(), name)
    assert slim.kept() == {"0": 4, "3": 6} and slim.forwards["slim"] + slim.eval_forwards["slim"] == 3


def test_hooked_modules_keep_their_channels_and_unknown_hooks_elsewhere_stop_the_cut():
    model, x, y = lenet_and_batch()
    s = sparsetrain.create("magnitude", model, sparsity=0.5, mask_type="channel", example_input=x[:1], total_steps=4)
    s.set_masks(s.compute_masks(0.5, s.magnitude_scores()), "prune")
    slim = SlimTraining(s)
    seen = []
    handle = model.features[3].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    reference = copy.deepcopy(model)
    assert_close(reference(x), model(x))
    # The hooked conv owns features.3 (its output) and reads features.0 (its input): neither set is cut.
    assert slim.kept() == {"features.0": 6, "features.3": 16, "classifier.1": 60, "classifier.3": 42}
    assert set(slim.summary()["skipped"]) == {"features.0", "features.3"} and seen[-1] == 16
    handle.remove()
    model(x)
    assert slim.kept()["features.3"] == 8 and seen[-1] == 16  # the hook is gone: cut again
    # A hook on a module that owns no channel set's tensor (a ReLU): which channels it sees is unknown.
    handle = model.features[1].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    plain = slim.forwards["plain"]
    assert_close(reference(x), model(x))
    assert slim.forwards["plain"] == plain + 1 and seen[-1] == 6
    handle.remove()
    model(x)
    assert slim.forwards["plain"] == plain + 1


def gated_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 3),
    )  # fmt: skip


def test_variational_gates_run_narrow_before_the_prune_and_equal_the_full_model():
    torch.manual_seed(0)
    model = gated_net()
    s = sparsetrain.create("variational", model, sparsity=0.75, total_steps=60, unit="steps", finish=50,
                           num_samples=100, prior_keep=0.3, gate_init=0.5, threshold=0.3, gate_lr=0.02, kl_warmup=10,
                           example_input=torch.zeros(1, 1, 8, 8))  # fmt: skip
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    s.attach(optimizer)
    slim = SlimTraining(s, torch.zeros(1, 1, 8, 8))
    compared, random_gates = 0, 0
    for step in range(16):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        model(x)  # the plan for the masks after this step
        cut = [k for k, c in enumerate(s.channel_groups.sets) if slim.kept()[c.name] < c.width]
        if not (cut and s._handles):
            continue
        assert set(s.slim_kept) == {s.channel_groups.sets[k].name for k in cut}
        # A set cut while its gates are still random (not settled at its target): the gate hook applies the kept
        # channels' gates to the narrower output.
        random_gates += any(not s.settled()[k] for k in cut)
        # The full model (its class's forward, the same gate hooks and gate noise of this step) on the batch.
        reference = copy.deepcopy(model)
        reference.zero_grad(set_to_none=True)
        results = []
        for m in (model, reference):
            optimizer.zero_grad()
            out = m(x)
            nn.functional.cross_entropy(out, y).backward()
            gate_grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in s.logits]
            results.append((out.detach(), masked_grads(m, s.masks), gate_grads))
            for p in s.logits:
                p.grad = None
        (out, grads, gate_grads), (want, want_grads, want_gate_grads) = results
        assert_close(want, out)
        for name in grads:
            assert_close(want_grads[name], grads[name], name)
        for a, b in zip(want_gate_grads, gate_grads):
            assert_close(a, b, "gate logits")
        compared += 1
        optimizer.zero_grad()
    assert compared > 0 and random_gates > 0, "no step ran narrower with gates on"


def fashion_batches(count: int, batch: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of real Fashion-MNIST training images (float64, pooled to ``size`` x ``size``)."""
    from sparsetrain.train.data import read_idx

    folder = Path("/usr/share/datasets/fashion-mnist")
    n = count * batch
    x = torch.from_numpy(read_idx(folder / "train-images-idx3-ubyte.gz")[:n].copy()).double().unsqueeze(1) / 255
    x = nn.functional.adaptive_avg_pool2d((x - 0.286) / 0.353, size)
    y = torch.from_numpy(read_idx(folder / "train-labels-idx1-ubyte.gz")[:n].copy()).long()
    return [(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(count)]


# Whole training runs in float64 (float32 runs part ways by rounding within a few hundred steps, as any two
# summation orders do; variational's natural-gradient gate step multiplies its gate gradients by up to 1e8).
WHOLE_RUNS = {
    # Gates close during the run (observed masks, many structures), then the prune to target.
    "variational": ("lenet5", 28, 80, dict(unit="steps", finish=60, num_samples=2000, gate_lr=0.05, kl_warmup=10)),
    # Channels pruned, back in a dense phase (batch-norm statistics of the cut channels must have decayed as the
    # full model's did), pruned again.
    "acdc": ("conv-bn", 8, 40, dict(unit="steps", mask_type="channel", warmup=5, compressed=10, decompressed=10,
                                    final=15)),
}  # fmt: skip


@needs_fashion
@pytest.mark.parametrize("method", list(WHOLE_RUNS))
def test_whole_training_with_slim_training_equals_full_width_training_in_float64(method):
    from helpers.shared import conv_bn_net

    name, size, steps, options = WHOLE_RUNS[method]
    batches = fashion_batches(steps, 32, size)

    def setup(slim: bool):
        torch.manual_seed(0)
        model = conv_bn_net() if name == "conv-bn" else build_model(name, input_shape=(1, 28, 28), num_classes=10)
        model = model.double()
        s = sparsetrain.create(method, model, sparsity=0.5, total_steps=steps, example_input=batches[0][0][:1],
                               seed=0, **options)  # fmt: skip
        optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True))
        s.attach(optimizer)
        return model, s, optimizer, SlimTraining(s) if slim else None

    full, slim = setup(False), setup(True)
    narrow = 0
    for x, y in batches:
        losses = []
        for model, _s, optimizer, _ in (full, slim):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert losses[0] == pytest.approx(losses[1], abs=1e-10)
        narrow += slim[3].forwards["slim"] > 0 and min(k / w for k, w in slim[3].widths.values()) < 1
    for n in full[1].masks:
        assert torch.equal(full[1].masks[n], slim[1].masks[n]), n
    for (n, a), (_, b) in zip(full[0].state_dict().items(), slim[0].state_dict().items()):
        assert_close(a.double(), b.double(), n)
    summary = slim[3].summary()
    assert narrow > steps // 4 and summary["mask_changes"] >= 3, summary
    with torch.no_grad():  # evaluation forwards are slim too
        full[0].eval(), slim[0].eval()
        assert_close(full[0](batches[0][0]), slim[0](batches[0][0]))
    assert slim[3].eval_forwards["slim"] == 1


# ------------------------------------------------------------------------------------------------ the trainer
RUN = {"model": "lenet5", "method": "gmp", "mask_type": "channel", "sparsity": 0.5, "limit_train": 2000,
       "epochs": 3, "batch_size": 100, "threads": 1, "plots": False, "progress": False}  # fmt: skip


def train(out: Path, stop_after: int | None = None, resume: bool = False, **settings) -> dict:
    from sparsetrain.train.config import resolve
    from sparsetrain.train.loop import Run

    class Stop(Exception):
        pass

    def on_epoch(row: dict) -> None:
        if stop_after is not None and row["epoch"] == stop_after:
            raise Stop  # after last.pt was written, as a killed run leaves it

    run = Run(resolve(None, {**RUN, "out": str(out), **settings}), on_epoch=on_epoch, resume=resume)
    try:
        return run.run()
    except Stop:
        return {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slim-runs")
    train(root / "off", slim_training="off")
    train(root / "auto", slim_training="auto")
    train(root / "resumed", slim_training="auto", stop_after=2)
    train(root / "resumed", slim_training="auto", resume=True)
    return {name: root / name for name in ("off", "auto", "resumed")}


@needs_fashion
def test_a_slim_run_equals_the_full_width_run_and_resumes_bit_identically(runs):
    off, auto = (json.loads((runs[k] / "summary.json").read_text()) for k in ("off", "auto"))
    assert auto["sparse_model"]["test_acc"] == pytest.approx(off["sparse_model"]["test_acc"], abs=1e-4)
    rows = {k: [json.loads(line) for line in (runs[k] / "metrics.jsonl").read_text().splitlines()] for k in runs}
    for a, b in zip(rows["auto"], rows["off"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
    masks = {k: torch.load(runs[k] / "last.pt", weights_only=True)["sparsifier"]["masks"] for k in runs}
    for name in masks["off"]:
        assert torch.equal(masks["auto"][name], masks["off"][name]), name
    record = auto["slim_training"]
    assert off["slim_training"] is None and record["active"] and record["rebuilds"] >= 1
    assert record["widths"] == {"features.0": "3/6", "features.3": "8/16", "classifier.1": "60/120",
                                "classifier.3": "42/84"}  # fmt: skip
    assert record["forwards_slim"] > 0 and record["eval_forwards_slim"] > 0
    # Resumed after epoch 2: the same weights, bit for bit, as the uninterrupted slim run.
    a = torch.load(runs["auto"] / "sparse_final.pt", weights_only=True)["model"]
    b = torch.load(runs["resumed"] / "sparse_final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_fashion
def test_auto_on_a_method_without_channel_masks_warns_once_and_trains_at_full_width(tmp_path, caplog):
    from sparsetrain.train.config import resolve
    from sparsetrain.train.loop import Run

    settings = {**RUN, "method": "acdc", "mask_type": "unstructured", "slim_training": "auto", "out": str(tmp_path)}
    with caplog.at_level("WARNING", logger="sparsetrain.train.loop"):
        run = Run(resolve(None, settings))
        run.setup()  # model, data, sparsifier: where slim training is decided
    warnings = [r.getMessage() for r in caplog.records if "slim_training" in r.getMessage()]
    assert len(warnings) == 1 and "no effect: method acdc with mask_type unstructured" in warnings[0], warnings
    assert run.slim is None and "forward" not in run.model.__dict__


# ------------------------------------------------------------------------------------------------ refusals
def test_wrapped_models_are_refused_and_unsupported_models_left_alone():
    model, x, _ = lenet_and_batch()
    wrapped = nn.DataParallel(model)
    s = sparsetrain.create("magnitude", wrapped, sparsity=0.5, total_steps=4)
    with pytest.raises(ConfigError, match="DataParallel.*single-process.*slim_training=off"):
        SlimTraining(s, x[:1])
    gated = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    s = sparsetrain.create("magnitude", gated, sparsity=0.5, total_steps=4)
    slim = SlimTraining(s, torch.zeros(1, 4))
    assert not slim.active and "sigmoid" in slim.unsupported.lower() and "forward" not in gated.__dict__
    assert slim.summary()["unsupported"] == slim.unsupported


def test_the_trainer_refuses_slim_training_with_sparse_kernels():
    from sparsetrain.train.config import resolve

    with pytest.raises(ConfigError, match="slim_training=auto and sparse_kernels=auto cannot be combined"):
        resolve(None, {"slim_training": "auto", "sparse_kernels": "auto"})
    with pytest.raises(ConfigError, match="'slim_training' must be one of auto, off"):
        resolve(None, {"slim_training": "on"})
