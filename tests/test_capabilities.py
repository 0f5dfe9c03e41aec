"""Typed capabilities: checked at registration, every flag documented and read, no method names in the trainer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.core import Capability, ScheduledPruning, Sparsifier, register
from sparsetrain.core.capabilities import QUERY_FLAGS
from sparsetrain.core.registry import _REGISTRY
from sparsetrain.schedules import OneShot

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparsetrain"


@pytest.fixture
def scratch_registry():
    """Registrations made by a test are removed afterwards."""
    before = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)


def test_every_registered_method_declares_a_capability_flag():
    for name in sparsetrain.list_methods():
        assert isinstance(sparsetrain.get_method(name).capabilities, Capability), name


def test_register_refuses_string_capabilities(scratch_registry):
    class Strings(Sparsifier):
        capabilities = frozenset({"sparse"})

    with pytest.raises(ValueError, match=r"Strings.capabilities must be a sparsetrain.core.Capability.*frozenset"):
        register("strings")(Strings)
    assert "strings" not in sparsetrain.list_methods()


@pytest.mark.parametrize(
    "flag, query",
    [
        (Capability.OWN_OPTIMIZER, "wrap_optimizer"),
        (Capability.DENSE_GRADIENTS, "needs_dense_gradients"),
        (Capability.REPLICA_PHASES, "synchronize_gradients"),
    ],
)
def test_query_flags_are_declared_exactly_when_the_query_is_overridden(scratch_registry, flag, query):
    class FlagOnly(Sparsifier):
        capabilities = Capability.SPARSE | flag

    with pytest.raises(ValueError, match=f"{flag.name}.*{query}.*does not override"):
        register("flag-only")(FlagOnly)

    class QueryOnly(Sparsifier):
        capabilities = Capability.SPARSE

    setattr(QueryOnly, query, lambda self, *args: True)
    with pytest.raises(ValueError, match=f"{flag.name}.*{query}.*does not declare"):
        register("query-only")(QueryOnly)

    class Both(Sparsifier):
        capabilities = Capability.SPARSE | flag

    setattr(Both, query, lambda self, *args: True)
    assert register("both")(Both) is Both


def test_closure_needs_own_optimizer(scratch_registry):
    class Closure(Sparsifier):
        capabilities = Capability.CLOSURE

    with pytest.raises(ValueError, match="OWN_OPTIMIZER"):
        register("closure-only")(Closure)


def test_register_refuses_a_class_that_is_not_a_sparsifier(scratch_registry):
    with pytest.raises(ValueError, match="Sparsifier subclasses"):
        register("nothing")(object)


def test_a_new_scheduled_method_is_a_schedule_and_a_score(scratch_registry):
    """A (schedule, score) registration in a few lines: random pruning at 30% of the run."""

    @register("random-at")
    class RandomAt(ScheduledPruning):
        """Random one-shot pruning at 30% of the run."""

        capabilities = Capability.SPARSE | Capability.MASK_UPDATES
        score = "random"

        def make_schedule(self) -> OneShot:
            return OneShot(self.steps(0.3, "at"), self.final_sparsity)

    model = nn.Linear(10, 10)
    s = sparsetrain.create("random-at", model, sparsity=0.5, total_steps=10, seed=3)
    assert [s.phase_at(t) for t in range(10)] == ["dense"] * 3 + ["sparse"] * 7
    assert [(p.start, p.end, p.kind) for p in s.timeline()] == [(0, 3, "dense"), (3, 10, "sparse")]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    s.attach(optimizer)
    for _ in range(3):
        optimizer.step()
    assert int((~s.masks["weight"]).sum()) == 50
    # The mask is the top half of the random scores of (seed 3, step 3).
    expected = sparsetrain.maskops.topk_mask(torch.rand(10, 10, generator=s.generator(3)), 0.5)
    assert torch.equal(s.masks["weight"], expected)


def test_scores_by_name():
    model = nn.Linear(4, 4)
    s = sparsetrain.create("dense", model)
    assert torch.equal(s.scores("magnitude")["weight"], model.weight.detach().abs())
    assert torch.equal(s.scores("random", 5)["weight"], torch.rand(4, 4, generator=s.generator(5)))
    assert torch.equal(s.scores("gradient")["weight"], torch.zeros(4, 4))  # no gradient yet
    with pytest.raises(ValueError, match="unknown score 'hessian'.*magnitude, random, gradient"):
        s.scores("hessian")


def test_every_flag_is_documented_and_read():
    """Each flag appears in Capability's docstring, in docs/architecture.md and in code outside its declarations."""
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    sources = [p for p in PACKAGE.rglob("*.py") if p.name != "capabilities.py"] + list((ROOT / "tests").glob("*.py"))
    text = {p: p.read_text() for p in sources if p.name != "test_capabilities.py"}
    for flag in Capability:
        assert f"{flag.name}:" in Capability.__doc__, flag
        assert f"`{flag.name}`" in architecture, flag
        # A read tests the flag (``in``, ``&``, the suite's ``methods_with``); a declaration only joins flags with |.
        readers = [
            p.name
            for p, source in text.items()
            for line in source.splitlines()
            if f"Capability.{flag.name}" in line and re.search(r" in |&|methods_with\(", line)
        ]
        assert readers or flag in QUERY_FLAGS, f"Capability.{flag.name} is read nowhere"


def test_no_method_names_in_the_trainer_or_cli():
    """The trainer and the CLI ask the sparsifier (capabilities, queries), never compare a method's name."""
    names = "|".join(map(re.escape, sparsetrain.list_methods()))
    compare = re.compile(rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)|in\s*\(\s*["']({names})["']""")
    # `sparsetrain prune --method` names one-shot pruners (magnitude, obc, spdy, mfac): a namespace of its own,
    # which shares two names with the training methods.
    commands = [p for p in (PACKAGE / "commands").glob("*.py") if not p.name.startswith("prune")]
    files = [*(PACKAGE / "train").glob("*.py"), PACKAGE / "cli.py", *commands]
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if compare.search(line) and "phase" not in line and "kind" not in line and "encoding" not in line
    ]
    assert found == []
