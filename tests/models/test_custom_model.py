"""model.params.path of the ``custom`` model names an nn.Module or a user's factory, nothing else."""

import sys
import textwrap

import pytest
from torch import nn

from gossamer.models import build_model

USER_MODULE = """
    import os
    from shutil import rmtree
    from subprocess import run as sub_run

    from torch import nn

    system = os.system


    class Net(nn.Module):
        def __init__(self, input_shape, num_classes, width=8):
            super().__init__()
            self.fc = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(),
                                    nn.Linear(width, num_classes))

        def forward(self, x):
            return self.fc(x)


    def make_net(input_shape, num_classes, width=4):
        return Net(input_shape, num_classes, width)


    def not_a_model(*args, **kwargs):
        return 42


    class NotAModule:
        def __init__(self, *args, **kwargs):
            raise AssertionError("called")


    class Callable:
        def __call__(self, *args, **kwargs):
            raise AssertionError("called")


    an_instance = Callable()
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "gossamer_test_user_models"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _refused(path, match, **params):
    with pytest.raises(ValueError) as err:
        build_model("custom", (4,), 2, seed=0, path=path, **params)
    msg = str(err.value)
    assert "\n" not in msg and "model.params.path" in msg and repr(path) in msg, msg
    assert match in msg, msg


@pytest.mark.parametrize("path", ["os:system", "builtins:eval", "subprocess:run", "math:sqrt",
                                  "os.path:join", "shutil:rmtree", "importlib:import_module",
                                  "antigravity:fly", "posix:system"])
def test_stdlib_and_builtins_are_refused_before_import(path, monkeypatch, tmp_path):
    marker = tmp_path / "called"
    top = path.partition(".")[0].partition(":")[0]
    if top not in sys.modules:                     # not even imported
        monkeypatch.delitem(sys.modules, top, raising=False)
    _refused(path, "standard library", pass_shapes=False, kwargs={"args": ["touch", str(marker)]})
    assert not marker.exists()
    if top == "antigravity":
        assert "antigravity" not in sys.modules


@pytest.mark.parametrize("attr,match", [
    ("system", "not a class or Python function"),          # os.system re-exported
    ("sub_run", "function of subprocess"),                 # a stdlib function re-exported
    ("rmtree", "function of shutil"),
    ("NotAModule", "not an nn.Module subclass"),
    ("an_instance", "not a class or Python function"),
])
def test_user_module_reexports_and_non_modules_are_refused(user_module, attr, match, tmp_path):
    marker = tmp_path / "called"
    _refused(f"{user_module}:{attr}", match, pass_shapes=False, kwargs={"args": ["touch", str(marker)]})
    assert not marker.exists()


@pytest.mark.parametrize("path", ["torch:load", "torch.hub:load", "numpy:load", "yaml:unsafe_load",
                                  "gossamer.cli:main"])
def test_functions_of_packages_that_ship_no_models_are_refused(path):
    _refused(path, "not a model factory", pass_shapes=False, kwargs={})


def test_user_classes_and_factories_work(user_module):
    model = build_model("custom", (4,), 3, seed=0, path=f"{user_module}:Net", kwargs={"width": 5})
    assert type(model).__name__ == "Net" and model.fc[1].out_features == 5
    model = build_model("custom", (4,), 3, seed=0, path=f"{user_module}:make_net")
    assert model.fc[1].out_features == 4
    model = build_model("custom", (4,), 2, seed=0, path="torch.nn:Linear", pass_shapes=False,
                        kwargs={"in_features": 4, "out_features": 2})
    assert isinstance(model, nn.Linear)
    with pytest.raises(ValueError, match="did not produce an nn.Module"):
        build_model("custom", (4,), 2, seed=0, path=f"{user_module}:not_a_model")
    with pytest.raises(ValueError, match="cannot be imported"):
        build_model("custom", (4,), 2, seed=0, path=f"{user_module}:missing")
    with pytest.raises(ValueError, match="must look like"):
        build_model("custom", (4,), 2, seed=0, path="no_colon")
