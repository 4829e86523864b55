"""`push` of hostile checkpoint files: each is refused with one short sentence naming the file,
before anything large is inflated or stored. The files are built here, small and seeded."""

from __future__ import annotations

import collections
import io
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.demo.models import MyNet
from moduleserve.registry.errors import (
    CheckpointFormatError,
    InvalidInputError,
    RegistryError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)
from tests.helpers import Cli

# MyNet holds 24,872 bytes: pushes may inflate to 4 times that plus 1 MiB.
BOMB_BYTES = 32 * 2**20


@pytest.fixture
def reg(sqlite_registry: Registry) -> Registry:
    sqlite_registry.classes.register(
        "MyNet",
        "moduleserve.registry.demo.models:MyNet",
        {},
        [parse_input_spec("x:float32:-1,3,8,8")],
    )
    return sqlite_registry


@pytest.fixture
def cli(reg: Registry, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(reg.settings.database_url(), reg.settings.store, capsys)


def refusal(
    reg: Registry, path: Path, error: type[Exception] = InvalidInputError, **kw: str
) -> str:
    """Push `path`, expect `error`, check nothing was stored; return the one-line message."""
    with pytest.raises(error) as err:
        reg.push_file("mynet", path, class_name="MyNet", **kw)
    message = str(err.value)
    assert "\n" not in message and len(message) < 600, message
    assert path.name in message, message
    assert reg.checkpoints.list_models() == [] and list(reg.blobs.digests()) == []
    return message


# -- hand-written torch.save archives ---------------------------------------------------------


class Storage:
    """Stands for one storage record of an archive (pickled as torch's persistent id)."""

    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class Tensor:
    """Pickles as torch's own `_rebuild_tensor_v2` call over a `Storage`."""

    def __init__(self, storage: Storage, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.shape, self.stride = storage, shape, stride

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        rebuild = torch._utils._rebuild_tensor_v2  # type: ignore[attr-defined]  # torch's own
        args = (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict())
        return rebuild, args


class ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def write_archive(
    path: Path,
    obj: object,
    *,
    deflated_zeros: dict[str, int],
    stored: dict[str, bytes] | None = None,
) -> Path:
    """A torch.save-like zip with `stored` records and deflated runs of zeros (a deflate bomb)."""
    pickled = io.BytesIO()
    ArchivePickler(pickled, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, data in (stored or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        for key, size in deflated_zeros.items():
            info = zipfile.ZipInfo(f"archive/data/{key}")
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as entry:
                for _ in range(size // 2**20):
                    entry.write(bytes(2**20))
    return path


# -- tests ------------------------------------------------------------------------------------


def test_deflate_bomb_is_refused_before_it_is_inflated(reg: Registry, tmp_path: Path) -> None:
    numel = BOMB_BYTES // 4
    bomb = {"fc.weight": Tensor(Storage("0", numel), (numel,), (1,))}
    path = write_archive(tmp_path / "bomb.pth", bomb, deflated_zeros={"0": BOMB_BYTES})
    assert path.stat().st_size < BOMB_BYTES / 500
    message = refusal(reg, path, CheckpointFormatError)
    assert message == (
        "bomb.pth was refused unread: its compressed entries would inflate to 32.0 MiB, "
        "more than the 1.1 MiB that class 'MyNet' could use"
    )


@pytest.mark.parametrize(
    ("numel", "shape", "says"),
    [
        (2**40, (2**40,), "lying.pth is damaged or not a torch file ("),
        (4, (2**62, 2**62), "lying.pth is damaged or not a torch file ("),
        (4, (0, 2**62, 2**62), "has shape [0, 4611686018427387904, 4611686018427387904], whose"),
    ],
)
def test_archives_that_lie_about_sizes_give_one_sentence(
    reg: Registry, tmp_path: Path, numel: int, shape: tuple[int, ...], says: str
) -> None:
    obj = {"fc.weight": Tensor(Storage("0", numel), shape, (1,) * len(shape))}
    path = write_archive(tmp_path / "lying.pth", obj, deflated_zeros={}, stored={"0": bytes(16)})
    assert says in refusal(reg, path, CheckpointFormatError)


def test_npz_bomb_is_refused_the_same_way(reg: Registry, tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, **{"fc.weight": np.zeros(BOMB_BYTES // 4, np.float32)})
    assert "would inflate to 32.0 MiB" in refusal(reg, path, CheckpointFormatError)


def test_compressed_state_dict_within_the_limit_is_pushed(reg: Registry, tmp_path: Path) -> None:
    model = MyNet()
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with (
        zipfile.ZipFile(tmp_path / "plain.pth") as plain,
        zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as deflated,
    ):
        for name in plain.namelist():
            deflated.writestr(name, plain.read(name))
    version = reg.push_file("mynet", tmp_path / "deflated.pth", class_name="MyNet")
    loaded = reg.load_module("mynet", version.version)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kind", "make", "says"),
    [
        ("sparse", lambda t: t.to_sparse(), "tensor 'fc.weight' is sparse_coo, not dense"),
        (
            "meta",
            lambda t: torch.empty_like(t, device="meta"),
            "tensor 'fc.weight' is a meta tensor and holds no data",
        ),
        (
            "zero-stride",
            lambda t: torch.zeros(1).expand(t.shape),
            "tensor 'fc.weight' has shape [10, 576] but only 4 bytes of data (a zero-stride",
        ),
    ],
)
def test_tensors_that_cannot_be_stored_as_they_are_are_refused(
    reg: Registry, tmp_path: Path, kind: str, make: object, says: str
) -> None:
    state = MyNet().state_dict()
    state["fc.weight"] = make(state["fc.weight"])  # type: ignore[operator]
    torch.save(state, tmp_path / f"{kind}.pth")
    assert says in refusal(reg, tmp_path / f"{kind}.pth", CheckpointFormatError)
    with pytest.raises(CheckpointFormatError, match=f"^state_dict: {re.escape(says)}"):
        reg.push("mynet", state, class_name="MyNet")


def test_many_views_of_one_storage_are_refused_for_datasets(
    sqlite_registry: Registry, tmp_path: Path
) -> None:
    base = torch.zeros(4096)
    torch.save({f"view{i}": base[i:] for i in range(64)}, tmp_path / "views.pth")
    with pytest.raises(CheckpointFormatError, match=r"views\.pth was refused: its tensors are"):
        sqlite_registry.push_dataset_file("views", tmp_path / "views.pth")
    assert list(sqlite_registry.blobs.digests()) == []


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.int64])
def test_weights_of_another_kind_are_refused_by_float_layers(
    reg: Registry, tmp_path: Path, dtype: torch.dtype
) -> None:
    state = MyNet().state_dict()
    state["fc.weight"] = state["fc.weight"].to(dtype)
    name = str(dtype).removeprefix("torch.")
    torch.save(state, tmp_path / f"{name}.pth")
    message = refusal(reg, tmp_path / f"{name}.pth", StateDictMismatchError)
    assert message == (
        f"{name}.pth does not fit class 'MyNet': "
        f"dtype mismatch for fc.weight: expected float32, got {name}"
    )
    with pytest.raises(StateDictMismatchError, match="state_dict does not fit"):
        reg.push("mynet", state, class_name="MyNet")


def test_float64_weights_are_still_cast_into_float32_layers(reg: Registry) -> None:
    model = MyNet()
    reg.push("mynet", {k: v.double() for k, v in model.state_dict().items()}, class_name="MyNet")
    assert reg.load_module("mynet").state_dict()["fc.weight"].dtype == torch.float32


def test_a_file_of_thousands_of_tensors_gets_a_short_error(reg: Registry, tmp_path: Path) -> None:
    base = torch.zeros(2000)
    state = {f"layer{i}.weight": base[i : i + 1] for i in range(2000)}
    state["x" * 100_000] = torch.zeros(1)
    torch.save(state, tmp_path / "many.pth")
    message = refusal(reg, tmp_path / "many.pth", StateDictMismatchError)
    assert message.startswith("many.pth does not fit class 'MyNet': missing keys: conv.bias, ")
    assert message.endswith(" and 1991 more")


def test_truncated_files_say_so(reg: Registry, tmp_path: Path) -> None:
    torch.save(MyNet().state_dict(), tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    for cut in random.Random(0).sample(range(4, len(data)), 8):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        message = refusal(reg, tmp_path / "cut.pth", CheckpointFormatError)
        assert "cut.pth is truncated" in message and "Errno" not in message


def test_malformed_pickles_give_one_sentence(reg: Registry, tmp_path: Path) -> None:
    torch.save(MyNet().state_dict(), tmp_path / "whole.pth")
    with zipfile.ZipFile(tmp_path / "whole.pth") as whole:
        entries = {name: whole.read(name) for name in whole.namelist()}
    pkl = next(name for name in entries if name.endswith("/data.pkl"))
    rng = random.Random(0)
    for _ in range(60):
        damaged = bytearray(entries[pkl])
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        with zipfile.ZipFile(tmp_path / "damaged.pth", "w") as archive:
            for name, data in entries.items():
                archive.writestr(name, bytes(damaged) if name == pkl else data)
        try:
            reg.push_file("damaged", tmp_path / "damaged.pth", class_name="MyNet")
        except RegistryError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
            assert "damaged.pth" in str(exc)


def test_a_pickled_module_is_told_to_save_its_state_dict(reg: Registry, tmp_path: Path) -> None:
    torch.save(MyNet(), tmp_path / "model.pth")
    message = refusal(reg, tmp_path / "model.pth", UnsafeCheckpointError)
    assert message == (
        "model.pth holds a whole pickled model (torch.save(model)), refused unrun; "
        "save model.state_dict() instead"
    )


def test_key_takes_the_state_dict_out_of_a_training_checkpoint(
    reg: Registry, tmp_path: Path
) -> None:
    model = MyNet()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    checkpoint = {"epoch": 3, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    assert refusal(reg, tmp_path / "ckpt.pth", CheckpointFormatError) == (
        "ckpt.pth is a training checkpoint (epoch, model, optimizer), not a state_dict: "
        "pass --key model to push the state_dict stored there"
    )
    assert refusal(reg, tmp_path / "ckpt.pth", CheckpointFormatError, key="nope") == (
        "ckpt.pth has no entry 'nope' (its entries: epoch, model, optimizer)"
    )
    assert "entry 'optimizer' of ckpt.pth: 2 entries are not named tensors" in refusal(
        reg, tmp_path / "ckpt.pth", CheckpointFormatError, key="optimizer"
    )
    version = reg.push_file("mynet", tmp_path / "ckpt.pth", class_name="MyNet", key="model")
    loaded = reg.load_module("mynet", version.version)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_cli_push_key_and_one_line_errors(cli: Cli, tmp_path: Path) -> None:
    model = MyNet()
    torch.save({"model": model.state_dict(), "step": 10}, tmp_path / "ckpt.pth")
    code, _, err = cli("push", "mynet", str(tmp_path / "ckpt.pth"), "--class", "MyNet")
    assert code == 1
    assert err.strip().splitlines() == [
        "error: ckpt.pth is a training checkpoint (model, step), not a state_dict: "
        "pass --key model to push the state_dict stored there"
    ]
    code, out, err = cli(
        "push", "mynet", str(tmp_path / "ckpt.pth"), "--class", "MyNet", "--key", "model"
    )
    assert (code, out.strip()) == (0, "mynet:1"), err
    torch.save(model, tmp_path / "model.pth")
    code, _, err = cli("push", "mynet", str(tmp_path / "model.pth"))
    assert code == 1 and "save model.state_dict() instead" in err
    assert "add_safe_globals" not in err and len(err.strip().splitlines()) == 1


def test_key_is_refused_for_files_without_dicts(reg: Registry, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(MyNet().state_dict(), str(tmp_path / "flat.safetensors"))
    assert refusal(reg, tmp_path / "flat.safetensors", key="model") == (
        "flat.safetensors: --key picks a state_dict out of a .pt/.pth checkpoint, "
        "not a .safetensors file"
    )


def test_legacy_torch_files_still_push(reg: Registry, tmp_path: Path) -> None:
    model = MyNet()
    torch.save(model.state_dict(), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    version = reg.push_file("mynet", tmp_path / "old.pth", class_name="MyNet")
    loaded = reg.load_module("mynet", version.version)
    assert torch.equal(loaded.state_dict()["fc.bias"], model.fc.bias)
