"""Zero-invariant groups and the slim model: every zoo model, a torchvision-style ResNet, refusals, export files.

Outputs are compared on real Fashion-MNIST images (the test set's first images, standardised).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers.shared import run_cli
from torch import nn

from sparsetrain import export
from sparsetrain.flops import FlopCounter
from sparsetrain.models import build_model, list_models, model_spec
from sparsetrain.structured import (
    CONSUMER,
    NORM,
    PRODUCER,
    UnsupportedModel,
    apply_keep,
    build_from_spec,
    groups,
    kept_channels,
    slim,
    slim_spec,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "t10k-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Eight real Fashion-MNIST test images, (8, 1, 28, 28), standardised."""
    from sparsetrain.train.data import read_idx

    x = torch.from_numpy(read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:8].copy()).float().unsqueeze(1) / 255
    return (x - x.mean()) / x.std()


def real_input(name: str, images: torch.Tensor) -> torch.Tensor:
    if name == "convbase":  # a 1-D model: 40 pixels from the middle rows of each image, as (N, 1, 40)
        return images.reshape(8, 1, -1)[:, :, 392:432].contiguous()
    if name == "wrn-28-10":  # 36M parameters: a 12x12 centre crop keeps the test fast
        return images[:2, :, 8:20, 8:20].contiguous()
    if name in ("mlp", "lenet5"):
        return images
    return nn.functional.avg_pool2d(images, 2)  # the deep nets on 14x14 images: the same graph, a quarter the work


def zoo_model(name: str, x: torch.Tensor) -> nn.Module:
    """The model for ``x``'s shape, in eval mode, with batch norms given random statistics, scales and shifts (at
    initialisation they are 0/1 and would hide a running statistic or shift left behind)."""
    torch.manual_seed(0)
    model = build_model(name, input_shape=tuple(x.shape[1:]), num_classes=10)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


@torch.no_grad()
def assert_close(expected: torch.Tensor, got: torch.Tensor) -> None:
    """Max abs difference <= 1e-5, relative to the outputs' scale where they exceed 1 (deep nets with random
    batch-norm statistics reach logits of 1e3; float32 rounds those at 1e-4)."""
    scale = max(1.0, float(expected.abs().max()))
    assert float((expected - got).abs().max()) <= 1e-5 * scale


@torch.no_grad()
def zero(model: nn.Module, chosen, roles=(PRODUCER, NORM, CONSUMER)) -> None:
    params = dict(model.named_parameters())
    for group in chosen:
        for piece in group.params:
            if piece.role in roles:
                piece.of(params[piece.name]).zero_()


# ------------------------------------------------------------------------------------------------- groups
def test_lenet5_groups_by_hand():
    model = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    zigs = groups(model, torch.zeros(1, 1, 28, 28))
    assert [(s.name, s.width) for s in zigs.sets] == [
        ("features.0", 6), ("features.3", 16), ("classifier.1", 120), ("classifier.3", 84)
    ]  # fmt: skip
    assert len(zigs) == 6 + 16 + 120 + 84
    assert zigs.fixed == {"classifier.5": "the network's output"}
    by_name = {g.name: g for g in zigs}
    first = by_name["features.0[2]"]
    assert {(s.name, s.dim, s.start, s.stop, s.role) for s in first.slices} == {
        ("features.0.weight", 0, 2, 3, PRODUCER), ("features.0.bias", 0, 2, 3, PRODUCER),
        ("features.3.weight", 1, 2, 3, CONSUMER),
    }  # fmt: skip
    # conv1's filter (25 weights at 28x28 positions) + its bias + conv2's input slice (16 x 25 at 10x10).
    assert first.size == 25 + 1 + 16 * 25
    assert first.flops == 25 * 28 * 28 + 16 * 25 * 10 * 10
    # After the flatten, channel 1 of conv2 is the block of its 5x5 map in the first Linear's inputs.
    flat = {s.name: s for s in by_name["features.3[1]"].slices}["classifier.1.weight"]
    assert (flat.dim, flat.start, flat.stop) == (1, 25, 50)
    assert zigs.dense_flops == FlopCounter(model, torch.zeros(1, 1, 28, 28)).dense_total
    assert "features.3" in zigs.table() and "226 groups" in zigs.table()


def test_residual_additions_tie_channels_and_depthwise_convs_carry_them():
    resnet = build_model("resnet20", input_shape=(3, 16, 16), num_classes=10)
    stream = groups(resnet, torch.zeros(1, 3, 16, 16)).channel_set("conv1")
    names = {(m.name, m.role) for m in stream.members}
    # The stem and every block's second conv of stage 1 write the same 16 channels (identity shortcuts) ...
    for producer in ("conv1.weight", "layer1.0.conv2.weight", "layer1.2.conv2.weight", "layer1.2.bn2.weight"):
        assert any(n == producer and r in (PRODUCER, NORM) for n, r in names), producer
    # ... which stage 2's first block reads through its conv and its projection shortcut.
    assert ("layer2.0.conv1.weight", CONSUMER) in names and ("layer2.0.shortcut.0.weight", CONSUMER) in names
    inner = {(m.name, m.role) for m in groups(resnet, torch.zeros(1, 3, 16, 16)).channel_set("layer1.0.conv1").members}
    assert inner == {
        ("layer1.0.conv1.weight", PRODUCER), ("layer1.0.bn1.weight", NORM), ("layer1.0.bn1.bias", NORM),
        ("layer1.0.bn1.running_mean", "stats"), ("layer1.0.bn1.running_var", "stats"),
        ("layer1.0.conv2.weight", CONSUMER),
    }  # fmt: skip
    mobilenet = build_model("mobilenet-v1", input_shape=(3, 16, 16), num_classes=10)
    stem = groups(mobilenet, torch.zeros(1, 3, 16, 16)).channel_set("features.0.0")
    depthwise = [m for m in stem.members if m.name == "features.1.0.0.weight"]
    assert len(depthwise) == 1 and depthwise[0].role == PRODUCER and depthwise[0].dim == 0


TRANSFORMERS = ("gpt", "vit")  # attention and layer norms: outside the channel groups this package follows


@pytest.mark.parametrize(
    "name, sample, words",
    [
        ("gpt", torch.zeros(1, 16, dtype=torch.long), ["GPT", "control flow"]),
        ("vit", torch.zeros(1, 1, 28, 28), ["Tensor.flatten", "supported:"]),
    ],
)
def test_transformers_are_refused_naming_what_is_not_followed(name, sample, words):
    options = {"layers": 1, "width": 32, "heads": 2}
    model = build_model(
        name, input_shape=tuple(sample.shape[1:]), num_classes=10, options={**options, "context": 16}
        if name == "gpt" else options
    )  # fmt: skip
    with pytest.raises(UnsupportedModel) as error:
        groups(model, sample)
    assert all(word in str(error.value) for word in words), str(error.value)


@needs_fashion
@pytest.mark.parametrize("name", [m for m in list_models() if m not in TRANSFORMERS])
def test_every_zoo_model_zero_invariant_and_slim_equals_masked(name, images):
    x = real_input(name, images)
    model = zoo_model(name, x)
    zigs = groups(model, x[:1])
    assert len(zigs) > 0
    with torch.no_grad():
        # One group: zeroing only the slices that make the channel (weights, bias, batch-norm scale and shift)
        # already gives the outputs of the model without the channel, consumers' input slices left as they are.
        one = zigs[len(zigs) // 2]
        masked = copy.deepcopy(model)
        zero(masked, [one], roles=(PRODUCER, NORM))
        small = slim(masked, x[:1], zigs=zigs)
        assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters()) - one.size
        assert_close(masked(x), small(x))
        # Many groups at once (a third, at random, whole groups as a channel mask leaves them): slim == masked.
        generator = torch.Generator().manual_seed(2)
        chosen = [g for g in zigs if torch.rand(1, generator=generator) < 1 / 3]
        masked = copy.deepcopy(model)
        zero(masked, chosen)
        small = slim(masked, x[:1], zigs=zigs)
        expected = masked(x)
        assert_close(expected, small(x))
        assert not torch.allclose(expected, model(x), atol=1e-3)  # the groups mattered
        kept = kept_channels(masked, zigs)
        removed = {s.name: s.width - len(kept[s.name]) for s in zigs.sets}
        for channel_set in zigs.sets:
            n_chosen = sum(g.channel_set == channel_set.name for g in chosen)
            assert removed[channel_set.name] == min(n_chosen, channel_set.width - 1)
        assert FlopCounter(small, x[:1]).dense_total < FlopCounter(model, x[:1]).dense_total


# A torchvision-style ResNet (torchvision's BasicBlock/Bottleneck layout, written out: torchvision is not a
# dependency): max-pool stem, a ReLU module called twice per block, downsample Sequential, torch.flatten.
class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyTorchvisionResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        down1 = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(_Bottleneck(8, 4, 1, down1), _Bottleneck(16, 4))
        down2 = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer2 = nn.Sequential(_Bottleneck(16, 8, 2, down2), _Bottleneck(32, 8))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@needs_fashion
def test_torchvision_style_resnet(images):
    torch.manual_seed(0)
    model = TinyTorchvisionResNet().eval()
    zigs = groups(model, images[:1])
    assert {s.name: s.width for s in zigs.sets} == {
        "conv1": 8, "layer1.0.conv1": 4, "layer1.0.conv2": 4, "layer1.0.conv3": 16, "layer1.1.conv1": 4,
        "layer1.1.conv2": 4, "layer2.0.conv1": 8, "layer2.0.conv2": 8, "layer2.0.conv3": 32, "layer2.1.conv1": 8,
        "layer2.1.conv2": 8,
    }  # fmt: skip
    # conv3 and the downsample write one stream with the identity of the next block.
    stream = {m.name for m in zigs.channel_set("layer1.0.conv3").members}
    assert {"layer1.0.downsample.0.weight", "layer1.1.conv3.weight", "layer2.0.conv1.weight"} <= stream
    chosen = list(zigs)[::3]
    with torch.no_grad():
        zero(model, chosen)
        small = slim(model, images[:1], zigs=zigs)
        assert (model(images) - small(images)).abs().max() <= 1e-5
    assert small.layer1[0].conv3.out_channels < 16 and small.layer1[1].conv1.in_channels < 16


# ------------------------------------------------------------------------------------------------- refusals
class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3)
        self.b = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.fc(y.mean((2, 3)))


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.sigmoid(self.conv(x)).mean((2, 3)))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.fc(x)


@pytest.mark.parametrize(
    "model, shape, words",
    [
        (_Concat(), (1, 1, 6, 6), ["torch.cat", "node 'cat'", "supported:"]),
        (_Gate(), (1, 1, 6, 6), ["torch.sigmoid"]),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), (1, 4), ["module '1' (LayerNorm)"]),
        (nn.Sequential(nn.Conv2d(4, 8, 1, groups=2), nn.Flatten(), nn.Linear(8, 2)), (1, 4, 1, 1),
         ["grouped convolution (groups=2"]),
        (_Branchy(), (1, 4), ["cannot trace _Branchy", "control flow"]),
    ],
)  # fmt: skip
def test_unsupported_operations_are_refused_by_name(model, shape, words):
    with pytest.raises(UnsupportedModel) as info:
        groups(model, torch.zeros(shape))
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_a_module_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(self.fc(x)))

    with pytest.raises(UnsupportedModel, match="module 'fc' .*called more than once"):
        groups(Twice(), torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------------- spec and file
@needs_fashion
@pytest.mark.parametrize("name", ["resnet20", "lenet5"])
def test_slim_file_round_trip(name, images, tmp_path):
    model = zoo_model(name, images)
    zigs = groups(model, images[:1])
    zero(model, list(zigs)[1::2])
    keep = kept_channels(model, zigs)
    small = apply_keep(copy.deepcopy(model), zigs, keep)
    spec = slim_spec(model_spec(name, (1, 28, 28), 10), keep)
    path = tmp_path / "small.safetensors"
    export.save(small, path, metadata={"model_spec": spec})
    back = export.load(path).eval()
    with torch.no_grad():
        assert (back(images) - model(images)).abs().max() <= 1e-5
    for key, tensor in small.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def _tamper(path: Path, spec: dict, out: Path) -> Path:
    """The file at ``path`` with its model spec replaced (tensors unchanged)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata()
    info = json.loads(meta["sparsetrain"])
    info["metadata"]["model_spec"] = spec
    save_file(tensors, str(out), metadata={**meta, "sparsetrain": json.dumps(info)})
    return out


def test_a_slim_spec_from_a_stranger_is_validated(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    zigs = groups(model, torch.zeros(1, 1, 28, 28))
    keep = {"features.3": list(range(8))}
    path = tmp_path / "small.safetensors"
    spec = slim_spec(model_spec("lenet5", (1, 28, 28), 10), keep)
    export.save(apply_keep(copy.deepcopy(model), zigs, keep), path, metadata={"model_spec": spec})
    assert export.load(path).features[3].out_channels == 8
    bad = {
        "an index out of range": {"features.3": [0, 99]},
        "indices not increasing": {"features.3": [3, 3, 4, 5, 6, 7, 8, 9]},
        "an unknown channel set": {"nope": [0]},
        "not a list": {"features.3": "0-7"},
    }
    for what, wrong in bad.items():
        tampered = _tamper(path, {**spec, "slim": {"keep": wrong}}, tmp_path / "bad.safetensors")
        with pytest.raises(export.ExportError, match="cannot build its model") as info:
            export.load(tampered)
        assert "kept channels" in str(info.value), what
    # Valid kept channels that do not match the stored tensors: refused by shape, before anything is allocated.
    other = _tamper(path, {**spec, "slim": {"keep": {"features.3": list(range(9))}}}, tmp_path / "other.safetensors")
    with pytest.raises(export.ExportError, match="does not match"):
        export.load(other)
    # A spec naming a huge model is built on the meta device only: refused for its shapes, not out of memory.
    huge = _tamper(path, {**spec, "name": "wrn-28-10", "input_shape": [3, 32, 32]}, tmp_path / "huge.safetensors")
    with pytest.raises(export.ExportError):
        export.load(huge)


def test_build_from_spec_on_meta_gives_the_slim_shapes():
    keep = {"features.0": [1, 4], "classifier.1": list(range(0, 120, 2))}
    with torch.device("meta"):
        model = build_from_spec(slim_spec(model_spec("lenet5", (1, 28, 28), 10), keep))
    assert model.features[0].weight.shape == (2, 1, 5, 5) and model.features[0].weight.is_meta
    assert model.features[3].weight.shape == (16, 2, 5, 5)
    assert model.classifier[1].weight.shape == (60, 400) and model.classifier[3].weight.shape == (84, 60)


# ------------------------------------------------------------------------------------------------- the CLI
# A short channel AC/DC run of LeNet-5: dense 0-1, channel-sparse 1-2, dense 2-3, channel-sparse 3-4 (epochs).
CHANNEL_RUN = [
    "train", "--model", "lenet5", "--method", "acdc", "--sparsity", "0.5", "--limit-train", "1000", "--epochs", "4",
    "--batch-size", "100", "--lr", "0.05", "--threads", "1", "--no-progress",
    "--set", "method_options={unit: epochs, warmup: 1, compressed: 1, decompressed: 1, final: 1}",
    "--set", "method_options.mask_type=channel",
]  # fmt: skip


def cli(*args: str):
    return run_cli(*args, threads=1)


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "acdc-channel"
    result = cli(*CHANNEL_RUN, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@needs_fashion
def test_channel_acdc_run_then_slim_eval_export_bench(channel_run, images, tmp_path):
    import json

    from sparsetrain.train.checkpoint import load as load_checkpoint
    from sparsetrain.train.checkpoint import restore_model

    rows = [json.loads(line) for line in (channel_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["dense", "sparse", "dense", "sparse"]
    data = load_checkpoint(channel_run)
    masked = restore_model(data, channel_run).eval()
    zigs = groups(masked, images[:1])
    kept = kept_channels(masked, zigs)
    # Half of each layer's channels are whole zero groups (uniform per layer by default): exactly, as top-k keeps.
    assert {name: len(k) for name, k in kept.items()} == {
        "features.0": 3, "features.3": 8, "classifier.1": 60, "classifier.3": 42
    }  # fmt: skip

    small_file = tmp_path / "small.safetensors"
    result = cli("slim", str(channel_run), "-o", str(small_file))
    assert result.returncode == 0, result.stderr
    assert "226 in 4 channel sets, 113 all-zero removed" in result.stdout and "forward FLOPs" in result.stdout
    small = export.load(small_file).eval()
    assert small.features[3].out_channels == 8 and small.classifier[1].in_features == 8 * 25
    with torch.no_grad():
        assert (small(images) - masked(images)).abs().max() <= 1e-5  # real images, max abs difference
    summary = json.loads((channel_run / "summary.json").read_text())

    result = cli("eval", str(small_file))
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.split("test accuracy: ")[1].split("%")[0])
    assert accuracy == pytest.approx(summary["sparse_model"]["test_acc"], abs=0.05)

    half = tmp_path / "small16.safetensors"
    result = cli("export", str(small_file), "-o", str(half), "--dtype", "fp16")
    assert result.returncode == 0, result.stderr
    assert export.load(half).features[3].out_channels == 8
    result = cli("bench", str(small_file), "--batch-sizes", "1", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "lenet5" in result.stdout, result.stdout
    # A slim file is also timed against its full-width model, with the FLOP ratio the speed-up is read against.
    assert "slim model against its full-width lenet5: forward FLOPs per sample 416,520 -> " in result.stdout
    full_ms, slim_ms, speedup = result.stdout.split("full ms")[1].splitlines()[1].split()[1:]
    assert float(full_ms) > 0 and float(slim_ms) > 0 and speedup.endswith("x")

    result = cli("slim", str(channel_run), "-o", str(small_file))  # exists: nothing overwritten
    assert result.returncode == 2 and result.stderr.startswith("error:") and "--force" in result.stderr


def test_the_config_takes_channel_masks_for_the_methods_that_have_them():
    from sparsetrain.errors import ConfigError
    from sparsetrain.train.config import TrainConfig, resolve

    config = TrainConfig.from_dict(resolve({}, {"method": "gmp", "mask_type": "channel", "sparsity": 0.5}))
    assert (config.mask_type, config.target_sparsity) == ("channel", 0.5)
    with pytest.raises(ConfigError, match="'rigl' does not support channel masks.*methods that do: .*acdc"):
        resolve({}, {"method": "rigl", "mask_type": "channel"})


def test_channel_acdc_pruned_groups_come_back_in_the_dense_phase():
    """A whole group at zero gets no gradient (ReLU'(0) = 0): it re-enters with the values it had when pruned."""
    import sparsetrain

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    schedule = dict(total_steps=12, unit="steps", warmup=2, compressed=2, decompressed=4, final=4)
    sparsifier = sparsetrain.create("acdc", model, sparsity=0.5, mask_type="channel", example_input=x[:1], **schedule)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach(optimizer)
    weights = []
    for _ in range(12):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        weights.append(model[0].weight.detach().clone())
        if sparsifier.count == 2:
            pruned = ~sparsifier.masks["0.weight"][:, 0, 0, 0]
            before = weights[-1].clone()  # the values at the compression (step 2), then zeroed
    assert int(pruned.sum()) == 4
    assert torch.all(weights[2][pruned] == 0)  # step 3: compressed
    # The decompression at step 4 gives the pruned filters back their step-2 values, then they train.
    assert not torch.any(weights[4][pruned] == 0)
    assert torch.all((weights[4][pruned] - before[pruned]).abs() < 0.5)
