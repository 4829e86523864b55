"""The registry's rules, on SQLite files and on PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.checkpoints import UNSET
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.demo.models import MLP, MyNet, Net, TiedAutoencoder
from moduleserve.registry.errors import (
    AliasConflictError,
    ClassBuildError,
    ClassMismatchError,
    ClassNotAllowedError,
    IntegrityError,
    InvalidInputError,
    InvalidNameError,
    ModelNotFoundError,
    StateDictMismatchError,
    VersionInUseError,
    VersionNotFoundError,
)
from tests.helpers import run_python, subprocess_env


def register_demo_classes(registry: Registry) -> None:
    registry.classes.register(
        "MyNet",
        "moduleserve.registry.demo.models:MyNet",
        {},
        [parse_input_spec("x:float32:-1,3,8,8")],
    )
    registry.classes.register(
        "MLP",
        "moduleserve.registry.demo.models:MLP",
        {"hidden": [16]},
        [parse_input_spec("x:float32:-1,784")],
    )
    registry.classes.register(
        "Tied",
        "moduleserve.registry.demo.models:TiedAutoencoder",
        {},
        [parse_input_spec("x:float32:-1,8")],
    )
    registry.classes.register(
        "Net", "moduleserve.registry.demo.models:Net", {}, [parse_input_spec("x:float32:-1,3,8,8")]
    )


@pytest.fixture
def reg(registry: Registry) -> Registry:
    register_demo_classes(registry)
    return registry


def test_versions_count_up_and_identical_checkpoints_share_one_blob(reg: Registry) -> None:
    state = MyNet().state_dict()
    first = reg.push("mynet", state, class_name="MyNet")
    second = reg.push("mynet", state)
    assert (first.version, second.version) == (1, 2)
    assert first.digest == second.digest
    assert list(reg.blobs.digests()) == [first.digest]
    assert reg.blobs.path(first.digest).stat().st_size == first.size


def test_version_numbers_are_never_reused_after_delete(reg: Registry) -> None:
    for _ in range(3):
        reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    reg.checkpoints.delete("mynet", 3)
    assert reg.push("mynet", MyNet().state_dict()).version == 4
    assert reg.checkpoints.get_model("mynet").versions == (1, 2, 4)


def test_loaded_module_equals_the_pushed_one_in_eval_mode(reg: Registry) -> None:
    source = Net()
    source.train()
    source(torch.randn(8, 3, 8, 8))  # moves BatchNorm running statistics away from 0/1
    reg.push("nested", source.state_dict(), class_name="Net")
    loaded = reg.load_module("nested", "1")
    assert not loaded.training
    x = torch.randn(4, 3, 8, 8)
    source.eval()
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_tied_weights_and_integer_buffers_round_trip_exactly(reg: Registry, tmp_path: Path) -> None:
    tied = TiedAutoencoder()
    reg.push("tied", tied.state_dict(), class_name="Tied")
    loaded = reg.load_module("tied")
    assert loaded.decoder.weight is loaded.encoder.weight
    assert torch.equal(loaded.encoder.weight, tied.encoder.weight)
    assert len(list(loaded.parameters())) == 1

    mlp = MLP(hidden=[16])
    mlp.train()
    for _ in range(5):
        mlp(torch.randn(4, 784))
    reg.push("mlp", mlp.state_dict(), class_name="MLP")
    state = reg.state_dict(reg.checkpoints.resolve("mlp", 1))
    for key, value in mlp.state_dict().items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert state["layers.1.num_batches_tracked"].dtype == torch.int64
    assert int(state["layers.1.num_batches_tracked"]) == 5

    reg.export("tied", 1, tmp_path / "tied.pth")
    exported = torch.load(tmp_path / "tied.pth", weights_only=True)
    assert exported["decoder.weight"].data_ptr() == exported["encoder.weight"].data_ptr()


def test_state_dict_that_does_not_fit_names_every_problem(reg: Registry) -> None:
    state = MyNet().state_dict()
    del state["fc.bias"]
    state["conv.weight"] = torch.zeros(8, 3, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as err:
        reg.push("mynet", state, class_name="MyNet")
    message = str(err.value)
    assert "missing keys: fc.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "shape mismatch for conv.weight: expected [16, 3, 3, 3], got [8, 3, 3, 3]" in message
    assert reg.checkpoints.list_models() == []


def test_pickle_that_runs_code_is_refused_and_nothing_runs(reg: Registry, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": Exploit()}, evil)
    with pytest.raises(InvalidInputError, match=r"refused.*nothing in it was run.*posix.system"):
        reg.push_file("mynet", evil, class_name="MyNet")
    assert not marker.exists()
    assert reg.checkpoints.list_models() == []


def test_pth_state_dict_is_imported_and_converted(reg: Registry, tmp_path: Path) -> None:
    model = MyNet()
    torch.save(model.state_dict(), tmp_path / "mynet.pth")
    version = reg.push_file("mynet", tmp_path / "mynet.pth", class_name="MyNet")
    assert reg.blobs.read(version.digest)[:8]  # stored as safetensors bytes
    loaded = reg.load_module("mynet", version.version)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["../x", "", "a/b", "..", ".hidden", "x" * 200, "a b"])
def test_bad_names_are_refused(reg: Registry, name: str) -> None:
    with pytest.raises(InvalidNameError):
        reg.push(name, MyNet().state_dict(), class_name="MyNet")
    with pytest.raises(InvalidNameError):
        reg.push_dataset(name, {"inputs": torch.zeros(2)})


def test_bad_alias_names_are_refused(reg: Registry) -> None:
    reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    for alias in ["../x", "", "3", "a/b"]:
        with pytest.raises(InvalidNameError):
            reg.checkpoints.set_alias("mynet", alias, 1)


def test_corrupted_blob_is_detected_at_load_and_by_verify(reg: Registry) -> None:
    version = reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    path = reg.blobs.path(version.digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        reg.load_module("mynet", 1)
    [problem] = reg.verify()
    assert (problem.digest, problem.problem, problem.referenced_by) == (
        version.digest,
        "corrupt",
        ("mynet:1",),
    )
    path.unlink()
    assert reg.verify()[0].problem == "missing"


def test_alias_compare_and_set_and_history(reg: Registry) -> None:
    for _ in range(3):
        reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    reg.checkpoints.set_alias("mynet", "production", 1, expect=None, actor="ci")
    reg.checkpoints.set_alias("mynet", "production", 2, expect=1, actor="alice")
    with pytest.raises(AliasConflictError, match="points at version 2, not the expected version 1"):
        reg.checkpoints.set_alias("mynet", "production", 3, expect=1, actor="bob")
    with pytest.raises(AliasConflictError):
        reg.checkpoints.set_alias("mynet", "production", 3, expect=None)
    assert reg.checkpoints.resolve("mynet", "production").version == 2
    reg.checkpoints.unset_alias("mynet", "production", expect=2, actor="carol")
    history = reg.checkpoints.alias_history("mynet")
    assert [(e.from_version, e.to_version, e.actor) for e in history] == [
        (None, 1, "ci"),
        (1, 2, "alice"),
        (2, None, "carol"),
    ]
    assert all(e.at.tzinfo is not None for e in history)


def test_empty_ref_resolves_to_default_alias_else_latest(reg: Registry) -> None:
    for _ in range(3):
        reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    assert reg.checkpoints.resolve("mynet", "").version == 3
    reg.checkpoints.set_alias("mynet", "production", 2)
    assert reg.checkpoints.resolve("mynet", "").version == 2
    with pytest.raises(VersionNotFoundError):
        reg.checkpoints.resolve("mynet", "staging")
    with pytest.raises(VersionNotFoundError):
        reg.checkpoints.resolve("mynet", 9)
    with pytest.raises(ModelNotFoundError):
        reg.checkpoints.resolve("nothing", "")


def test_delete_is_refused_while_an_alias_points_at_the_version(reg: Registry) -> None:
    reg.push("mynet", MyNet().state_dict(), class_name="MyNet", alias="production")
    with pytest.raises(VersionInUseError, match="production"):
        reg.checkpoints.delete("mynet", 1)
    reg.checkpoints.delete("mynet", 1, force=True, actor="admin")
    assert reg.checkpoints.get_model("mynet").versions == ()
    assert reg.checkpoints.alias_history("mynet")[-1].to_version is None


def test_first_push_fixes_the_class(reg: Registry) -> None:
    with pytest.raises(InvalidInputError, match="first push must name a --class"):
        reg.push("mynet", MyNet().state_dict())
    reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    with pytest.raises(ClassMismatchError):
        reg.push("mynet", MLP(hidden=[16]).state_dict(), class_name="MLP")


def test_lineage_tags_and_metrics_are_recorded(reg: Registry) -> None:
    reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    child = reg.push(
        "mynet",
        MyNet().state_dict(),
        parent=1,
        source="job:7",
        tags={"team": "vision"},
        metrics={"loss": 0.5},
        description="tuned",
    )
    assert (child.parent_version, child.source, child.tags, child.metrics) == (
        1,
        "job:7",
        {"team": "vision"},
        {"loss": 0.5},
    )
    tagged = reg.checkpoints.tag("mynet", "2", {"stage": "qa"}, remove=["team"])
    assert tagged.tags == {"stage": "qa"}
    with pytest.raises(VersionNotFoundError):
        reg.push("mynet", MyNet().state_dict(), parent=42)


def test_classes_outside_allowed_prefixes_are_never_imported(registry: Registry) -> None:
    with pytest.raises(ClassNotAllowedError):
        registry.classes.register("evil", "os:system", {}, [parse_input_spec("x:float32:-1,1")])
    with pytest.raises(ClassNotAllowedError):
        registry.classes.register(
            "evil", "moduleserve.registry.demoevil:X", {}, [parse_input_spec("x:float32:-1,1")]
        )
    with pytest.raises(ClassBuildError, match="unexpected keyword"):
        registry.classes.register(
            "bad",
            "moduleserve.registry.demo.models:MyNet",
            {"nope": 1},
            [parse_input_spec("x:float32:-1,3,8,8")],
        )
    with pytest.raises(InvalidInputError, match="forward"):
        registry.classes.register(
            "bad",
            "moduleserve.registry.demo.models:MyNet",
            {},
            [parse_input_spec("image:float32:-1,3,8,8")],
        )
    assert registry.classes.list() == []


def test_class_registration_records_inputs_and_inferred_outputs(registry: Registry) -> None:
    cls = registry.classes.register(
        "two",
        "moduleserve.registry.demo.models:TwoInputNet",
        {},
        [parse_input_spec("a:float32:-1,4"), parse_input_spec("b:float32:-1,4")],
    )
    assert [s.to_dict() for s in cls.outputs] == [
        {"name": "output0", "dtype": "float32", "shape": [-1, 2]}
    ]
    assert registry.classes.get("two").inputs == cls.inputs


def test_non_persistent_buffers_fall_back_to_a_real_build(registry: Registry) -> None:
    from tests.models import WithNonPersistentBuffer

    registry.classes.register(
        "npb", "tests.models:WithNonPersistentBuffer", {}, [parse_input_spec("x:float32:-1,3")]
    )
    source = WithNonPersistentBuffer()
    registry.push("npb", source.state_dict(), class_name="npb")
    loaded = registry.load_module("npb")
    x = torch.randn(2, 3)
    torch.testing.assert_close(loaded(x), source(x))


def test_datasets_round_trip(registry: Registry) -> None:
    tensors = {"inputs": torch.randn(10, 4), "targets": torch.arange(10)}
    dataset = registry.push_dataset("toy", tensors, "ten rows")
    assert dataset.tensors == {
        "inputs": {"dtype": "float32", "shape": [10, 4]},
        "targets": {"dtype": "int64", "shape": [10]},
    }
    loaded = registry.load_dataset("toy")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert [d.name for d in registry.datasets.list()] == ["toy"]


def test_gc_removes_only_unreferenced_old_blobs(reg: Registry) -> None:
    kept = reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    dropped = reg.push("mynet", MyNet().state_dict())
    reg.checkpoints.delete("mynet", dropped.version)
    assert reg.gc(min_age_s=3600).digests == ()  # too young: a push may be in flight
    dry = reg.gc(dry_run=True, min_age_s=0)
    assert dry.digests == (dropped.digest,) and reg.blobs.exists(dropped.digest)
    report = reg.gc(min_age_s=0)
    assert report.digests == (dropped.digest,) and report.bytes_freed == dropped.size
    assert not reg.blobs.exists(dropped.digest) and reg.blobs.exists(kept.digest)


def test_concurrent_pushers_get_distinct_consecutive_versions(
    reg: Registry, db_url: str, store: Path
) -> None:
    reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    code = (
        "import torch\n"
        "from moduleserve.registry.api import Registry\n"
        "from moduleserve.registry.config import RegistrySettings\n"
        "from moduleserve.registry.demo.models import MyNet\n"
        "r = Registry(RegistrySettings())\n"
        "print(' '.join(str(r.push('mynet', MyNet().state_dict()).version) for _ in range(5)))\n"
    )
    env = subprocess_env(db_url, store)
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    numbers = sorted(int(n) for out, _ in outputs for n in out.split())
    assert numbers == list(range(2, 22))
    assert reg.checkpoints.get_model("mynet").versions == tuple(range(1, 22))
    assert reg.verify() == []


def test_several_processes_migrating_at_once_all_succeed(db_url: str, store: Path) -> None:
    code = "from moduleserve.registry.cli import main; raise SystemExit(main(['init']))"
    env = subprocess_env(db_url, store)
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in results]
    assert sum("migrated from empty" in out for out, _ in results) == 1
    assert (
        run_python(
            "from moduleserve.registry.cli import main; raise SystemExit(main(['list']))", env
        ).returncode
        == 0
    )


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(sqlite_registry: Registry) -> None:
    with sqlite_registry.db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_unset_sentinel_is_distinct_from_none() -> None:
    assert UNSET is not None and repr(UNSET) == "UNSET"


def test_schema_tables_exist(registry: Registry) -> None:
    tables = set(sa.inspect(registry.db.engine).get_table_names())
    assert {
        "module_classes",
        "models",
        "versions",
        "aliases",
        "alias_events",
        "datasets",
        "alembic_version",
    } <= tables


def test_racing_first_alias_sets_give_one_winner_and_conflicts(reg: Registry) -> None:
    import threading

    from moduleserve.registry.errors import ConflictError

    reg.push("mynet", MyNet().state_dict(), class_name="MyNet")
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def claim() -> None:
        barrier.wait()
        try:
            reg.checkpoints.set_alias("mynet", "staging", 1, expect=None)
            outcomes.append("won")
        except ConflictError as exc:  # AliasConflictError, or WriteConflictError on PostgreSQL
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert outcomes.count("won") == 1 and len(outcomes) == 6, outcomes
    assert len(reg.checkpoints.alias_history("mynet", "staging")) == 1


def test_versions_stored_before_the_dtype_kind_check_still_load(sqlite_registry: Registry) -> None:
    """A state_dict cast with .float() (BatchNorm's int64 counter included) is refused by a
    push now, but a version stored that way earlier keeps loading, cast to the class's dtypes."""
    from moduleserve.registry.formats import encode_tensors

    sqlite_registry.classes.register(
        "Net", "moduleserve.registry.demo.models:Net", {}, [parse_input_spec("x:float32:-1,3,8,8")]
    )
    module = sqlite_registry.classes.build(sqlite_registry.classes.get("Net"))
    floats = {k: v.float() for k, v in module.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match=r"dtype mismatch for block1\.bn\.num_batches"):
        sqlite_registry.push("net", floats, class_name="Net")
    data = encode_tensors(floats)  # what an older release stored
    sqlite_registry.checkpoints.add_version(
        "net", sqlite_registry.blobs.put(data), len(data), "Net"
    )

    loaded = sqlite_registry.load_module("net", "1")

    assert loaded.block1.bn.num_batches_tracked.dtype == torch.int64
