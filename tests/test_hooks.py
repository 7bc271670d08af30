"""Forward hooks and pre-hooks are not run while a model is captured: those that are not bookkeeping are
warned about (README, supported operations)."""
import functools
import warnings
from collections import OrderedDict

import pytest
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.nn.utils import prune

import pathmonitor as pm

SHAPE = (3, 8, 8)


def _net() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(4, 2)))


def _scale_output(module, inputs, output):
    return output * 3


def _scale_input(module, inputs):
    return (inputs[0] * 3,)


def _hook_warnings(compute) -> list[warnings.WarningMessage]:
    """The IgnoredHookWarnings `compute()` issues, every one of them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute()
    return [w for w in caught if issubclass(w.category, pm.IgnoredHookWarning)]


def _listed(warning: warnings.WarningMessage) -> list[str]:
    """The hooks a warning lists, one '<module>: <kind> <hook> from <origin>' each."""
    return [line[4:] for line in str(warning.message).splitlines() if line.startswith("  - ")]


def _only_the_users_hook_is_listed(net: nn.Sequential) -> None:
    """With a hook of the user's added beside those already there, the warning lists it and nothing else."""
    net.head.register_forward_hook(_scale_output)
    found = _hook_warnings(lambda: pm.path_norm(net, SHAPE))
    assert len(found) == 1 and len(_listed(found[0])) == 1
    assert _listed(found[0])[0].startswith("head (Linear): forward hook _scale_output from ")


def test_an_output_scaling_hook_is_warned_about_by_module_name():
    net = _net()
    net.features[2].register_forward_hook(_scale_output)
    with pytest.warns(pm.IgnoredHookWarning) as record:
        pm.path_norm(net, SHAPE)
    message = str(record[0].message)
    assert "features.2 (Conv2d): forward hook _scale_output" in message
    assert "not part of the path model" in message and "Remove such hooks" in message
    assert "fold what they do into the module" in message
    assert record[0].filename == __file__  # it points at the call that computed the path-norm


def test_a_forward_pre_hook_is_warned_about():
    net = _net()
    net.head.register_forward_pre_hook(_scale_input)
    with pytest.warns(pm.IgnoredHookWarning, match=r"head \(Linear\): forward pre-hook _scale_input"):
        pm.path_norm(net, SHAPE)


def test_hooks_of_the_root_and_of_a_bare_layer_are_named_by_the_class():
    net = _net()
    net.register_forward_hook(_scale_output)
    with pytest.warns(pm.IgnoredHookWarning, match=r"- Sequential: forward hook _scale_output"):
        pm.path_norm(net, SHAPE)
    layer = nn.Linear(3, 2)
    layer.register_forward_pre_hook(_scale_input)
    with pytest.warns(pm.IgnoredHookWarning, match=r"- Linear: forward pre-hook _scale_input"):
        pm.path_norm(layer, (3,))


@pytest.mark.parametrize("register", [register_module_forward_hook, register_module_forward_pre_hook])
def test_a_global_hook_is_warned_about(register):
    hook = _scale_output if register is register_module_forward_hook else _scale_input
    handle = register(hook)
    try:
        with pytest.warns(pm.IgnoredHookWarning, match=rf"every module \(global\): forward .*{hook.__name__}"):
            pm.path_norm(_net(), SHAPE)
    finally:
        handle.remove()


class _WithSpare(nn.Module):
    """A network holding a layer its forward never calls."""

    def __init__(self):
        super().__init__()
        self.net, self.unused = _net(), nn.Linear(2, 2)

    def forward(self, x):
        return self.net(x)


def test_a_hook_on_a_module_forward_never_calls_is_not_warned_about():
    model = _WithSpare()
    model.unused.register_forward_hook(_scale_output)  # it never runs, so it cannot change anything
    model.net.features[0].register_forward_hook(_scale_output)
    found = _hook_warnings(lambda: pm.path_norm(model, SHAPE))
    assert len(found) == 1 and "net.features.0" in str(found[0].message) and "unused" not in str(found[0].message)


def _pruned(net: nn.Sequential) -> nn.Sequential:
    prune.l1_unstructured(net.features[0], "weight", amount=0.5)
    prune.l1_unstructured(net.features[0], "weight", amount=0.5)  # a second time: a PruningContainer
    prune.l1_unstructured(net.head, "bias", amount=0.5)
    return net


def _weight_normed(net: nn.Sequential) -> nn.Sequential:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old-style weight_norm is deprecated, still used
        nn.utils.weight_norm(net.features[0])
    return net


def _spectral_normed(net: nn.Sequential) -> nn.Sequential:
    nn.utils.spectral_norm(net.features[2])
    return net


def _unchanged(net: nn.Sequential) -> nn.Sequential:
    return net


@pytest.mark.parametrize("prepare", [_unchanged, _pruned, _weight_normed, _spectral_normed])
def test_models_whose_hooks_the_path_model_accounts_for_are_not_warned_about(prepare):
    net = prepare(_net())
    assert prepare is _unchanged or any(m._forward_pre_hooks for m in net.modules())
    assert _hook_warnings(lambda: pm.path_norm(net, SHAPE)) == []
    assert _hook_warnings(lambda: pm.check_support(net, SHAPE)) == []
    _only_the_users_hook_is_listed(net)


def _function_from(origin: str):
    def hook(module, *args):
        return None
    hook.__module__ = origin
    return hook


def _bound_method_from(origin: str):
    class Offload:
        def hook(self, module, *args):
            return None
    Offload.hook.__module__ = origin
    return Offload().hook


def _partial_from(origin: str):
    return functools.partial(_function_from(origin))


def _callable_object_from(origin: str):
    class Hook:
        def __call__(self, module, *args):
            return None
    Hook.__module__ = origin
    return Hook()


def _decorated_from(origin: str):
    """A hook from `origin` under a decorator of another module that keeps `__wrapped__`."""
    inner = _function_from(origin)

    @functools.wraps(inner)
    def wrapper(*args):
        return inner(*args)
    wrapper.__module__ = "some.profiler"
    return wrapper


FORMS = [_function_from, _bound_method_from, _partial_from, _callable_object_from, _decorated_from]
BOOKKEEPING_ORIGINS = ["deepspeed.runtime.zero.parameter_offload", "torch.distributed.fsdp._fully_shard._fsdp_state",
                       "torch.distributed._composable.replicate"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("origin", BOOKKEEPING_ORIGINS)
def test_hooks_of_sharding_frameworks_are_not_warned_about(form, origin):
    net = _net()
    for module in net.modules():  # as ZeRO-3 registers them: on every module, before and after forward
        module.register_forward_pre_hook(form(origin))
        module.register_forward_hook(form(origin))
    assert _hook_warnings(lambda: pm.path_norm(net, SHAPE)) == []
    _only_the_users_hook_is_listed(net)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("origin", ["user_code.logging", "deepspeed_like.hooks"])
def test_hooks_of_any_other_origin_are_warned_about_in_every_form(form, origin):
    net = _net()
    net.features[0].register_forward_hook(form(origin))
    found = _hook_warnings(lambda: pm.path_norm(net, SHAPE))
    assert len(found) == 1 and f"from {origin}" in str(found[0].message)


def test_the_warning_is_issued_once_per_captured_graph():
    net = _net()
    plain = float(pm.path_norm(net, SHAPE).detach())
    first = net.features[0].register_forward_hook(_scale_output)
    found = _hook_warnings(lambda: [pm.path_norm(net, SHAPE) for _ in range(3)])
    assert len(found) == 1
    second = net.head.register_forward_pre_hook(_scale_input)  # a new hook is noticed on the next call
    found = _hook_warnings(lambda: [pm.path_norm(net, SHAPE) for _ in range(3)])
    assert len(found) == 1 and "head (Linear)" in str(found[0].message)
    first.remove()
    second.remove()
    found = _hook_warnings(lambda: [pm.path_norm(net, SHAPE) for _ in range(2)])
    assert found == [] and float(pm.path_norm(net, SHAPE).detach()) == plain


def test_the_path_norm_is_that_of_the_network_without_its_hooks():
    """What the warning is about: a hook scaling a layer's output changes the network, not the value."""
    net = _net()
    plain = float(pm.path_norm(net, SHAPE).detach())
    net.features[0].register_forward_hook(_scale_output)
    with pytest.warns(pm.IgnoredHookWarning):
        assert float(pm.path_norm(net, SHAPE).detach()) == plain
