"""The heuristic plans of light models, pinned: moving a cost rule must not move a plan.

``tests/data/heuristic_plans.json`` holds, for ResNet-50, VGG-19 and SqueezeNet at batch 1 and 8
and for both AVX2 (NCHWc8) and AVX-512 (NCHWc16) blocks, what the exact search on estimated costs
chose for every node and what the heuristic plan runs (that choice, or the whole model on
onnxruntime). A deliberate change of the cost model regenerates the file with
``python tests/test_heuristic_plans.py``, and the diff shows which plans it moved.
"""
import json
import sys
from pathlib import Path

import pytest

from fastrun.ir import reader
from fastrun.ops import formats, registry
from fastrun.ops.builtin import estimates
from fastrun.planning import costmodel, planner
from fastrun.runtime.plan import Plan
from fastrun.workflows import models
from tests.conftest import tiny_conv_model

PINNED = Path(__file__).parent / "data" / "heuristic_plans.json"
MODELS = ("resnet50", "vgg19", "squeezenet")
BATCHES = (1, 8)
BLOCKS = (8, 16)


def _rows(plan: Plan) -> list[str]:
    return [a if isinstance(a, str) else f"{a[0]} {a[1]} {','.join(a[2])}>{a[3]}" for a in plan.assignment()]


def _plans(name: str, batch: int) -> dict:
    path = models.example_path(name)
    graph = reader.load(path, {reader.load(path).inputs[0]: (batch, 3, 224, 224)})
    return {"search": _rows(planner.make_plan(graph, "fingerprint")),
            "heuristic": _rows(planner.heuristic_plan(graph, "fingerprint"))}


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_heuristic_plan_is_the_pinned_one(name, batch, block, monkeypatch):
    monkeypatch.setattr(formats, "native_block_size", lambda: block)
    expected = json.loads(PINNED.read_text())[f"{name} b{batch} NCHWc{block}"]
    assert _plans(name, batch) == expected


def test_an_implementation_is_priced_by_its_own_estimator():
    """``cost=`` in a registration is what the heuristic plan pays for the implementation; one
    without an estimator is priced as a direct algorithm slowed by its rank."""
    model = tiny_conv_model(c=16, k=16, hw=12)
    graph = reader.from_proto(model, model.SerializeToString(), {"x": (1, 16, 12, 12)})

    def build(spec, consts):
        """Stands in for a kernel: the plan is made, never run."""
        raise AssertionError("not built")

    try:
        registry.implementation("Conv", "test_priced", heuristic_rank=90, cost=lambda spec: 1e-6)(build)
        registry.implementation("Conv", "test_unpriced", heuristic_rank=90)(build)
        spec = planner.heavy_nodes(graph)[0].spec
        assert costmodel.impl_ms(registry.get("Conv", "test_priced"), spec) == 1e-6
        assert costmodel.impl_ms(registry.get("Conv", "test_unpriced"), spec) == estimates.direct_ms(spec, 90)
        assert planner.make_plan(graph, "fingerprint").nodes[0].impl == registry.get("Conv", "test_priced").id
    finally:
        registry.unregister("Conv", "test_priced")
        registry.unregister("Conv", "test_unpriced")
    assert not planner.make_plan(graph, "fingerprint").nodes[0].impl.startswith("test_")


if __name__ == "__main__":  # regenerate the pinned plans after a deliberate cost-model change
    pinned = {}
    for block in BLOCKS:
        formats.native_block_size = lambda b=block: b
        for name in MODELS:
            for batch in BATCHES:
                pinned[f"{name} b{batch} NCHWc{block}"] = _plans(name, batch)
    PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    sys.exit(0)
