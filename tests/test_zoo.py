"""timm, segmentation-models-pytorch and MONAI networks: ReLU networks computed exactly, the others
refused with the offending modules named (MATH.md sections 1-2, 4)."""
import pytest
import torch

import pathmonitor as pm
from zoo import NON_RELU_NETWORKS, RELU_NETWORKS, l1_path_norm_by_surgery

pytest.importorskip("timm")
pytest.importorskip("segmentation_models_pytorch")
pytest.importorskip("monai")


@pytest.mark.parametrize("entry", RELU_NETWORKS, ids=lambda entry: entry.name)
def test_relu_networks_equal_the_surgery_oracle_and_are_rescaling_invariant(entry):
    torch.manual_seed(0)
    model = entry.build().eval()
    shape = entry.input_shape
    with torch.no_grad():
        assert float(pm.path_norm(model, shape, q=1)) == pytest.approx(l1_path_norm_by_surgery(model, shape),
                                                                        rel=1e-9)
        model = model.double()
        rescaled = pm.random_rescale(model, generator=torch.Generator().manual_seed(1), input_shape=shape)
        assert any(not torch.equal(p, r) for p, r in zip(model.parameters(), rescaled.parameters())), \
            "no rescalable channels were found: the invariance check would be vacuous"
        x = torch.randn((2,) + shape, dtype=torch.float64)
        before, after = model(x), rescaled(x)
        assert torch.allclose(after, before, rtol=1e-9, atol=1e-9 * float(before.abs().max()))
        assert float(pm.path_norm(rescaled, shape, q=2)) == pytest.approx(float(pm.path_norm(model, shape, q=2)),
                                                                           rel=1e-9)


@pytest.mark.parametrize("entry, offender", NON_RELU_NETWORKS, ids=lambda v: getattr(v, "name", v))
def test_other_networks_are_refused_naming_the_offending_modules(entry, offender):
    model = entry.build().eval()
    with pytest.raises(pm.UnsupportedModelError) as raised:
        pm.path_norm(model, entry.input_shape)
    problems = raised.value.problems
    assert any(p.kind == offender for p in problems), [(p.name, p.kind) for p in problems][:5]
    assert not any("could not be traced" in p.reason for p in problems)
    modules = dict(model.named_modules())
    for problem in problems:  # a module's own name, or "scope (Type)" for an operation in its forward
        name = problem.name.rsplit(" (", 1)[0]
        assert name in modules or name == "<model>", problem
