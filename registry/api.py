"""The registry's Python API: one object the CLI, the server, job workers and tests share."""

from __future__ import annotations

import getpass
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moduleserve.registry.blobs import BlobStore
from moduleserve.registry.checkpoints import Checkpoints
from moduleserve.registry.classes import ClassCatalog
from moduleserve.registry.config import RegistrySettings
from moduleserve.registry.datasets import Datasets
from moduleserve.registry.db import Database, check_schema, migrate
from moduleserve.registry.entities import BlobProblem, Dataset, ModuleClass, TensorSpec, Version
from moduleserve.registry.errors import (
    InvalidInputError,
    JobStateError,
    ModelNotFoundError,
    shorten,
)
from moduleserve.registry.jobs import Jobs
from moduleserve.registry.names import check_alias, check_name
from moduleserve.registry.uploads import DatasetUpload, DeclaredTensor

# torch (and the modules built on it) loads on first use, not at import: admin commands
# that only read the database (list, show, alias, verify, gc) then start in a fraction
# of a second instead of the 1-2 s torch's import takes.
if TYPE_CHECKING:
    import torch
    from torch import nn


# How far a pushed file's compressed entries may inflate, in multiples of what the class
# holds: a float64 file for a float32 class is twice its size, and a training checkpoint
# read with `key` also holds the optimizer's state (Adam keeps two more copies).
INFLATE_FACTOR = 4


@dataclass(frozen=True)
class GcReport:
    """What `gc` removed (or would remove, on a dry run)."""

    digests: tuple[str, ...]
    bytes_freed: int
    temp_files: tuple[str, ...]
    dry_run: bool


def default_actor() -> str:
    """Who a registry change is recorded as, when the caller does not say."""
    try:
        return f"api ({getpass.getuser()})"
    except (KeyError, OSError):
        return "api"


class Registry:
    """Module classes, checkpoint versions, aliases and datasets over one database and store."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url(), settings.busy_timeout_ms)
        self.blobs = BlobStore(settings.store)
        self.classes = ClassCatalog(self.db, settings.allowed_prefixes(), settings.class_path)
        self.checkpoints = Checkpoints(self.db, settings.default_alias)
        self.datasets = Datasets(self.db)
        self.jobs = Jobs(self.db, self.checkpoints)

    def init(self) -> tuple[str | None, str]:
        """Create or migrate the schema (safe to repeat); returns (before, after) revisions."""
        return migrate(self.db)

    def check_schema(self) -> None:
        """Raise SchemaOutdatedError unless the schema is at this release's head."""
        check_schema(self.db)

    def close(self) -> None:
        """Release database connections."""
        self.db.dispose()

    # -- checkpoints -----------------------------------------------------------------------

    def push(
        self,
        model: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        class_name: str | None = None,
        parent: int | None = None,
        source: str = "upload",
        description: str = "",
        tags: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        alias: str | None = None,
        actor: str | None = None,
    ) -> Version:
        """Check a state_dict loads strictly into its class and serves its spec, store it,
        record a new version.

        Serving is checked as the server will serve it: the class is built with these
        weights and runs two rows of zeros per its input spec; every output must match the
        output spec with one row per input row (ForwardCheckError otherwise). The blob is
        durable on disk before the version row is committed, so a crash in between leaves
        at most an unreferenced blob (removed by `gc`), never a row pointing at a missing
        or partial file.
        """
        return self._push(
            model,
            tensors,
            "state_dict",
            class_name=class_name,
            parent=parent,
            source=source,
            description=description,
            tags=tags,
            metrics=metrics,
            alias=alias,
            actor=actor,
        )

    def _push(
        self,
        model: str,
        tensors: Mapping[str, torch.Tensor],
        label: str,
        *,
        class_name: str | None = None,
        actor: str | None = None,
        **options: Any,
    ) -> Version:
        from moduleserve.registry.classes import check_forward
        from moduleserve.registry.formats import check_tensors, encode_tensors
        from moduleserve.registry.loading import check_fits

        module_class = self.classes.get(class_name or self._class_of(model))
        skeleton = self.classes.build(module_class, device="meta")
        check_fits(module_class.name, skeleton.state_dict(), tensors, source=label)
        check_tensors(tensors, label)
        check_forward(module_class, self.build_with(module_class, tensors), label)
        data = encode_tensors(tensors)
        digest = self.blobs.put(data)
        return self.checkpoints.add_version(
            model,
            digest,
            len(data),
            module_class.name,
            actor=actor or default_actor(),
            checked=module_class,
            **options,
        )

    def push_file(
        self, model: str, path: Path, *, key: str | None = None, **options: Any
    ) -> Version:
        """`push` from a .safetensors, .npz or `.pt/.pth` file (no pickle code runs).

        `key` takes the state_dict out of a dict checkpoint such as
        `{"model": state_dict, "optimizer": ...}`. The file is checked against the class
        before its tensors are read: compressed entries may inflate to at most
        `INFLATE_FACTOR` times what the class holds, and every key, shape and dtype must fit.
        """
        from moduleserve.registry.formats import read_tensor_file
        from moduleserve.registry.loading import state_nbytes
        from moduleserve.registry.torchfiles import SizeLimit

        check_name("model", model)
        path = Path(path)
        module_class = self.classes.get(options.get("class_name") or self._class_of(model))
        expected = self.classes.build(module_class, device="meta").state_dict()
        limit = SizeLimit(
            INFLATE_FACTOR * state_nbytes(expected) + 2**20,
            f"that class {module_class.name!r} could use",
        )
        tensors = read_tensor_file(path, limit=limit, key=key)
        return self._push(model, tensors, shorten(path.name), **options)

    def _class_of(self, model: str) -> str:
        try:
            class_name = self.checkpoints.get_model(model).class_name
        except ModelNotFoundError:
            raise InvalidInputError(
                f"model {model!r} does not exist yet: its first push must name a --class"
            ) from None
        if not class_name:
            raise InvalidInputError(
                f"model {model!r} has no class (its class was deleted): its next push must "
                "name a --class"
            )
        return class_name

    def update_class(
        self,
        name: str,
        *,
        inputs: Sequence[TensorSpec] = (),
        outputs: Sequence[TensorSpec] = (),
        description: str | None = None,
    ) -> ModuleClass:
        """Change a class's input spec, output spec or description.

        A new spec is checked as at registration, then against every stored version of the
        class's models: each is built with its weights and must serve the new spec
        (ForwardCheckError naming the first that does not; nothing is changed then). A
        model the server has loaded keeps the spec it loaded with until it is loaded again.
        """
        from moduleserve.registry.classes import check_forward

        current = self.classes.get(name)
        revised = self.classes.revise(name, inputs=inputs, outputs=outputs, description=description)
        stored = self.classes.versions_of(name)
        if (revised.inputs, revised.outputs) != (current.inputs, current.outputs):
            for digest, users in stored.items():
                module = self.build_with(revised, self.load_tensors(digest))
                check_forward(revised, module, f"version {users[0]}")
        return self.classes.save(revised, stored)

    def state_dict(self, version: Version) -> dict[str, torch.Tensor]:
        """The version's tensors, after checking the blob against its digest."""
        from moduleserve.registry.formats import decode_tensor_file

        return decode_tensor_file(self.blobs.verified_path(version.digest))

    def module_class_of(self, version: Version) -> ModuleClass:
        """The registered class a version belongs to."""
        return self.classes.get(version.class_name)

    def build_version(self, version: Version, device: str | torch.device = "cpu") -> nn.Module:
        """Build the version's class and load its verified state_dict strictly, in eval mode."""
        return self.build_with(self.module_class_of(version), self.state_dict(version), device)

    def build_with(
        self,
        module_class: ModuleClass,
        tensors: Mapping[str, torch.Tensor],
        device: str | torch.device = "cpu",
    ) -> nn.Module:
        """Build a class and load `tensors` strictly (adopting them: one copy), in eval mode."""
        from moduleserve.registry.loading import load_copying, load_into

        skeleton = self.classes.build(module_class, device="meta")
        module = load_into(module_class.name, skeleton, tensors)
        if module is None:
            module = load_copying(
                module_class.name, self.classes.build(module_class, device="cpu"), tensors
            )
        return module.to(device).eval()

    def load_module(
        self, model: str, ref: str | int = "", device: str | torch.device = "cpu"
    ) -> nn.Module:
        """The model's version (number, alias, or "" for default) as a ready nn.Module."""
        return self.build_version(self.checkpoints.resolve(model, ref), device)

    def export(self, model: str, ref: str | int, path: Path) -> Version:
        """Write a version to `.safetensors` (as stored) or `.pth` (a torch.save state_dict)."""
        version = self.checkpoints.resolve(model, ref)
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".safetensors", ".pth", ".pt"):
            raise InvalidInputError(f"cannot export to {path.name}: use .safetensors or .pth")
        if not path.parent.is_dir():
            raise InvalidInputError(f"cannot export to {path}: folder {path.parent} does not exist")
        data = self.blobs.read(version.digest)
        if suffix == ".safetensors":
            path.write_bytes(data)
        else:
            import torch

            from moduleserve.registry.formats import decode_tensors

            torch.save(decode_tensors(data), path)
        return version

    # -- datasets --------------------------------------------------------------------------

    def push_dataset(
        self, name: str, tensors: Mapping[str, torch.Tensor], description: str = ""
    ) -> Dataset:
        """Store named tensors (e.g. `inputs`, `targets`) as a dataset."""
        from moduleserve.registry.formats import describe_tensors, encode_tensors

        if not tensors:
            raise InvalidInputError("a dataset needs at least one tensor")
        data = encode_tensors(tensors)
        digest = self.blobs.put(data)
        return self.datasets.add(name, digest, len(data), describe_tensors(tensors), description)

    def push_dataset_file(self, name: str, path: Path, description: str = "") -> Dataset:
        """`push_dataset` from a .safetensors, .pt or .npz file."""
        from moduleserve.registry.formats import DATASET_SUFFIXES, read_tensor_file
        from moduleserve.registry.torchfiles import SizeLimit

        check_name("dataset", name)
        path = Path(path)
        if path.suffix.lower() not in DATASET_SUFFIXES:
            raise InvalidInputError(f"cannot read {path.name}: use {', '.join(DATASET_SUFFIXES)}")
        limit = SizeLimit(int(self.settings.max_upload_mb * 2**20), "allowed (max_upload_mb)")
        return self.push_dataset(name, read_tensor_file(path, limit=limit), description)

    def load_dataset(self, name: str) -> dict[str, torch.Tensor]:
        """A dataset's tensors, verified against the digest."""
        return self.load_tensors(self.datasets.get(name).digest)

    def load_tensors(self, digest: str, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of a safetensors blob (a dataset or a job's epoch), memory-mapped;
        `verify` re-hashes the blob first (skip it only where nothing is trained or served)."""
        from moduleserve.registry.formats import decode_tensor_file

        path = self.blobs.verified_path(digest) if verify else self.blobs.path(digest)
        return decode_tensor_file(path)

    def start_dataset_upload(
        self, name: str, tensors: Sequence[DeclaredTensor], description: str = ""
    ) -> DatasetUpload:
        """A dataset that arrives in pieces (see `registry.uploads`)."""
        max_bytes = int(self.settings.max_upload_mb * 2**20)
        return DatasetUpload(self.blobs, self.datasets, name, tensors, description, max_bytes)

    # -- jobs ------------------------------------------------------------------------------

    def promote_job(
        self, job_id: str, epoch: int = 0, alias: str | None = None, actor: str | None = None
    ) -> tuple[Version, int]:
        """Register the checkpoint a job kept at `epoch` (0: its best, else its last epoch);
        returns the new version and the epoch taken."""
        if alias:
            check_alias(alias)
        job = self.jobs.get(job_id)
        if not job.epochs:
            raise JobStateError(f"job {job_id} has kept no epoch checkpoint yet")
        if epoch == 0:
            epoch = job.best_epoch or job.epochs[-1].epoch
        kept = self.jobs.epoch(job_id, epoch)
        self.blobs.verified_path(kept.digest)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": kept.train_loss}
        if kept.val_loss is not None:
            metrics["val_loss"] = kept.val_loss
        version = self.checkpoints.add_version(
            job.model,
            kept.digest,
            kept.size,
            self.checkpoints.get_model(job.model).class_name,
            parent=job.base_version,
            source=f"job {job_id} epoch {epoch}",
            description=f"epoch {epoch} of job {job_id}",
            tags={"dataset": job.dataset},
            metrics={**metrics, "hyperparameters": job.spec},
            alias=alias or None,
            actor=actor or f"promote of job {job_id}",
        )
        return version, epoch

    # -- maintenance -----------------------------------------------------------------------

    def referenced_digests(self) -> dict[str, list[str]]:
        """Every digest the database points at, with who points at it."""
        refs = self.checkpoints.referenced_digests()
        for more in (self.datasets.referenced_digests(), self.jobs.referenced_digests()):
            for digest, names in more.items():
                refs.setdefault(digest, []).extend(names)
        return refs

    def verify(self) -> list[BlobProblem]:
        """Re-hash every referenced blob; return the missing or corrupt ones."""
        problems = []
        for digest, users in sorted(self.referenced_digests().items()):
            problem = self.blobs.check(digest)
            if problem is not None:
                problems.append(BlobProblem(digest, problem, tuple(sorted(users))))
        return problems

    def gc(self, *, dry_run: bool = False, min_age_s: float = 3600.0) -> GcReport:
        """Remove blobs nothing points at, older than `min_age_s`.

        The age guard protects a push in flight: its blob is written before its row.
        """
        referenced = set(self.referenced_digests())
        orphans = [
            d
            for d in self.blobs.digests()
            if d not in referenced and self.blobs.age_seconds(d) >= min_age_s
        ]
        temps = self.blobs.stale_temp_files(min_age_s)
        freed = sum(self.blobs.path(d).stat().st_size for d in orphans)
        if not dry_run:
            still_referenced = set(self.referenced_digests())  # a push may have committed since
            for digest in orphans:
                if digest not in still_referenced and self.blobs.age_seconds(digest) >= min_age_s:
                    self.blobs.remove(digest)
            for temp in temps:
                temp.unlink(missing_ok=True)
        return GcReport(tuple(orphans), freed, tuple(str(t) for t in temps), dry_run)


def open_registry(
    settings: RegistrySettings | None = None,
    *,
    migrate_schema: bool = False,
    allowed_prefixes: Sequence[str] | None = None,
) -> Registry:
    """Open the registry, optionally migrating it first."""
    settings = settings or RegistrySettings()
    if allowed_prefixes is not None:
        settings = settings.model_copy(update={"allowed_class_prefixes": list(allowed_prefixes)})
    registry = Registry(settings)
    if migrate_schema:
        registry.init()
    return registry
