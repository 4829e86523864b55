"""`moduleserve-registry inspect`: offline introspection straight from the registry, no server.

The CLI runs in-process through main(argv); its figures are checked against torch computed
directly on the modules the test pushed (SQLite and PostgreSQL registries).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from moduleserve.client.introspection_results import TensorStats, Totals
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.demo.models import FrozenBackboneNet, MyNet, Net
from tests.helpers import (
    Cli,
    approx,
    assert_stats_match,
    expected_totals,
    randomize_batchnorm,
)

IMAGE = "x:float32:-1,3,8,8"


class InspectCli(Cli):
    """`moduleserve-registry inspect` on one registry, with its output captured."""

    def inspect_json(self, *args: str) -> Any:
        code, out, err = self("--json", "inspect", *args)
        assert (code, err) == (0, "")
        return json.loads(out)

    def refused(self, *args: str) -> str:
        """The one-sentence error of a command that must fail with exit status 1."""
        code, out, err = self("inspect", *args)
        assert (code, out) == (1, "")
        assert err.startswith("error: ") and len(err.splitlines()) == 1
        return err


@pytest.fixture
def pushed(registry: Registry) -> dict[str, nn.Module]:
    """mynet:1 (alias production), mynet:2 (fc tuned), net:1, frozen:1, by model:version."""
    for name, path, kwargs, spec in (
        ("mynet", "moduleserve.registry.demo.models:MyNet", {}, IMAGE),
        ("net", "moduleserve.registry.demo.models:Net", {"channels": 4}, IMAGE),
        ("frozen", "moduleserve.registry.demo.models:FrozenBackboneNet", {}, "x:float32:-1,16"),
    ):
        registry.classes.register(name, path, kwargs, [parse_input_spec(spec)])
    first, tuned, net = MyNet(), MyNet(), Net(channels=4)
    tuned.load_state_dict(first.state_dict())
    with torch.no_grad():
        tuned.fc.weight.add_(0.01 * torch.randn_like(tuned.fc.weight))
    randomize_batchnorm(net, 7)
    modules = {"mynet:1": first, "mynet:2": tuned, "net:1": net, "frozen:1": FrozenBackboneNet()}
    for ref, module in modules.items():
        model = ref.partition(":")[0]
        registry.push(model, module.state_dict(), class_name=model)
    registry.checkpoints.set_alias("mynet", "production", 1)
    return modules


@pytest.fixture
def cli(pushed: dict[str, nn.Module], db_url: str, store: Path, capsys: Any) -> InspectCli:
    return InspectCli(db_url, store, capsys)


def test_tree(cli: InspectCli, pushed: dict[str, nn.Module]) -> None:
    net = pushed["net:1"]
    code, out, _ = cli("inspect", "net", "tree")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "net:1 (net)"
    assert lines[1].startswith("Net()  params=") and "    bn: BatchNorm2d(4, eps=1e-05" in out
    assert f"params={sum(p.numel() for p in net.parameters()):,}" in lines[1]
    assert lines[-1].startswith(f"parameters: {expected_totals(net).parameters:,} (trainable")
    tree = cli.inspect_json("frozen:1", "tree")
    frozen = pushed["frozen:1"]
    assert [n["name"] for n in tree["nodes"]] == [n for n, _ in frozen.named_modules()]
    assert Totals(**tree["totals"]) == expected_totals(frozen)
    assert tree["model"] == {
        "model": "frozen",
        "version": 1,
        "class_name": "frozen",
        "loaded": False,
    }


def test_params_and_buffers(cli: InspectCli, pushed: dict[str, nn.Module]) -> None:
    mynet = pushed["mynet:1"]
    listing = cli.inspect_json("mynet:production", "params")
    assert [t["name"] for t in listing["tensors"]] == list(mynet.state_dict())
    weight = listing["tensors"][2]
    assert (weight["shape"], weight["requires_grad"]) == ([10, 576], True)
    assert_stats_match(TensorStats(**weight["stats"]), mynet.fc.weight)
    code, out, _ = cli("inspect", "frozen", "params", "--pattern", "backbone.*")
    assert code == 0 and out.splitlines()[0] == "frozen:1 (frozen)"
    assert "frozen" in out.splitlines()[2] and "head.weight" not in out  # GRAD column

    net = pushed["net:1"]
    code, out, _ = cli("inspect", "net", "buffers", "--pattern", "block1.*")
    rows = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert code == 0 and rows == [n for n, _ in net.named_buffers() if n.startswith("block1.")]
    buffers = cli.inspect_json("net", "buffers")["tensors"]
    assert len(buffers) == len(list(net.buffers()))
    mean = net.block1.bn.running_mean
    assert buffers[0]["stats"]["mean"] == approx(float(mean.double().mean()))
    assert buffers[2]["stats"]["max"] == 7  # num_batches_tracked


def test_tensor(cli: InspectCli, pushed: dict[str, nn.Module]) -> None:
    weight = pushed["mynet:2"].fc.weight.detach()
    values = cli.inspect_json("mynet:2", "tensor", "fc.weight", "--slice", "0:2, :3")
    assert (values["dtype"], values["shape"]) == ("float32", [2, 3])
    assert torch.equal(torch.tensor(values["values"]), weight[0:2, :3])
    code, out, _ = cli("inspect", "mynet", "tensor", "conv.bias", "--slice", "-1")
    header, value = out.splitlines()
    assert (code, header) == (0, "conv.bias float32[]:")
    assert float(value) == pytest.approx(float(pushed["mynet:1"].conv.bias[-1].detach()), rel=1e-6)


def test_diff(cli: InspectCli, pushed: dict[str, nn.Module]) -> None:
    code, out, _ = cli("inspect", "mynet:production", "diff", "2")
    assert code == 0 and out.splitlines()[0] == "mynet:2 against mynet:1"
    assert "4 compared: 1 changed, 3 unchanged, 0 mismatched" in out
    diff = cli.inspect_json("mynet:1", "diff", "mynet:2")
    entry = {e["name"]: e for e in diff["entries"]}["fc.weight"]
    a, b = (pushed[f"mynet:{v}"].fc.weight.detach().double() for v in (1, 2))
    assert entry["kind"] == "parameter"
    assert entry["metrics"]["changed_elements"] == int((a != b).sum())
    assert entry["metrics"]["diff_norm"] == approx(float((b - a).norm()))
    assert entry["metrics"]["max_abs_diff"] == float((b - a).abs().max())


def test_refusals_are_one_sentence(cli: InspectCli) -> None:
    err = cli.refused("mynet", "diff", "net:1")
    assert "cannot diff net:1 (moduleserve.registry.demo.models:Net) against mynet:1" in err
    assert err.rstrip().endswith("they are different Module classes")
    err = cli.refused("mynet", "tensor", "fc.wieght")
    assert (
        err == "error: tensor 'fc.wieght' not found; did you mean 'fc.weight' or 'conv.weight'?\n"
    )
    assert cli.refused("mynet", "tensor", "fc.weight", "--slice", "0:2, x").startswith(
        "error: invalid slice '0:2, x': 'x' is not an integer"
    )
    err = cli.refused("mynet", "tensor", "fc.bias", "--slice", "0,0")
    assert err.endswith("it indexes 2 dimensions but the tensor has 1\n")
    assert "over the cap of 5" in cli.refused("mynet", "tensor", "fc.bias", "--max-elements", "5")
    assert cli.refused("mynet:7", "tree") == "error: model 'mynet' has no version or alias '7'\n"
    assert "unclosed '['" in cli.refused("net", "params", "--pattern", "block[1")
