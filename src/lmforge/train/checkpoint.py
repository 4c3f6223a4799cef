"""Training checkpoints: written atomically, verified on load, resumable exactly.

Layout of one checkpoint::

    checkpoints/step_00000400/
      model.safetensors      trainable + frozen weights (tied duplicates dropped)
      optimizer.pt           optimizer state (tensors and plain containers only)
      rng.pt                 torch CPU (and CUDA) RNG states
      trainer_state.json     step, tokens seen, data-loader position, early-stopping state
      config.json            the model's shape (HF format), so `lmforge sample --model` takes it
      checksums.json         sha256 of every file above; written last

A checkpoint is assembled in a hidden temporary folder and renamed into place only once every
file and `checksums.json` are on disk, so a crash mid-write never leaves a folder that looks
complete. Loading verifies the checksums and names the file that does not match.
`.pt` files are read with `torch.load(weights_only=True)` and the metadata of sharded (DCP)
checkpoints with an allow-list unpickler: no arbitrary unpickling anywhere.

A save that fails on a full disk, a file-size limit or a read-only file system removes its
temporary folder and raises `StorageError` naming the file; the older checkpoints are pruned
only after the new one is in place, so the last good one always survives; a resumed run
prunes too (`prune_checkpoints`), so a kill between placing and pruning leaves no extra. The crash harness
kills the process at the points marked `fault_point("checkpoint:<step>:...")`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..model.hf import model_state_for_saving, to_hf_config
from ..runs import _fsync_dir, atomic_write_json, fault_point, file_sha256, storage_error

STEP_RE = re.compile(r"^step_(\d{8})$")


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    keep: int | None = None,
) -> Path:
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp{os.getpid()}"
    current = tmp
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        current = tmp / "model.safetensors"
        save_file(model_state_for_saving(model), str(current))
        fault_point(f"checkpoint:{step}:weights", final)
        if optimizer is not None:
            current = tmp / "optimizer.pt"
            _torch_save(optimizer.state_dict(), current)
        rng: dict[str, torch.Tensor | list[torch.Tensor]] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        current = tmp / "rng.pt"
        _torch_save(rng, current)
        current = tmp / "trainer_state.json"
        current.write_text(json.dumps(trainer_state, indent=2))
        cfg = getattr(model, "cfg", None)
        if cfg is not None:  # makes the checkpoint folder loadable as a model folder on its own
            current = tmp / "config.json"
            current.write_text(json.dumps(to_hf_config(cfg), indent=2))
        sums = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        current = tmp / "checksums.json"
        atomic_write_json(current, sums)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; older checkpoints are untouched
        err = storage_error(e, current)
        if err is not None:
            raise err from e
        raise
    fault_point(f"checkpoint:{step}:assembled", final)
    _put_in_place(tmp, final)
    fault_point(f"checkpoint:{step}:renamed", final)
    prune_checkpoints(root, keep)
    return final


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the assembled folder to `final`. When `final` exists (a re-run, or a rollback,
    reached the same step again) it is first renamed aside to ``.step_<n>.old<pid>`` and
    deleted only after the new one is in place; `list_checkpoints` puts it back if a crash
    falls between the two renames, so some complete copy of the step always survives."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(root: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (None/0: keep all); return those
    deleted. Called after each save and when a run resumes: a process killed between placing a
    checkpoint and pruning (or a re-run with a smaller `keep_checkpoints`) leaves extras that a
    resumed run with no further save would otherwise never remove."""
    if not keep:
        return []
    old = list_checkpoints(root)[:-keep]
    for path in old:
        _remove_checkpoint(path)
    return old


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint; its completion marker goes first, so a crash mid-delete leaves a
    folder that `list_checkpoints` ignores rather than a half-deleted one that looks complete."""
    (path / "checksums.json").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file object, so a full disk raises an OSError (chained
    to torch's RuntimeError) that names the errno instead of only "unexpected pos 704 vs 598"."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first: ``step_<n>`` folders holding ``checksums.json``, the
    marker written last (a folder without it is a save or a delete cut short, and is never
    picked). Leftovers of a crashed save are removed; a complete copy renamed aside while its
    step was being replaced is put back when the replacement never arrived."""
    root = Path(root)
    if not root.is_dir():
        return []
    for junk in root.glob(".step_*.tmp*"):
        shutil.rmtree(junk, ignore_errors=True)
    for aside in root.glob(".step_*.old*"):
        final = root / aside.name[1:].split(".old")[0]
        if not (final / "checksums.json").exists() and (aside / "checksums.json").exists():
            if final.exists():
                shutil.rmtree(final)
            os.replace(aside, final)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    found = [
        p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / "checksums.json").is_file()
    ]
    return sorted(found, key=_step_number)


def _step_number(p: Path) -> int:
    m = STEP_RE.match(p.name)
    assert m is not None  # called on step_NNNNNNNN folders only
    return int(m.group(1))


def verify_checkpoint(path: Path) -> dict:
    path = Path(path)
    sums_file = path / "checksums.json"
    try:
        sums = json.loads(sums_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: not a complete checkpoint (no checksums.json); delete it to fall back to an earlier one"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{sums_file}: corrupt ({e})") from None
    for name, digest in sums.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing from checkpoint {path.name}")
        if file_sha256(f) != digest:
            raise CheckpointError(
                f"{f}: checksum mismatch (file truncated or corrupt); delete "
                f"{path} to resume from an earlier checkpoint"
            )
    return sums


def load_weights(model: torch.nn.Module, file: Path, strict: bool = True) -> None:
    """Load a safetensors state dict into `model`, naming the file on any problem."""
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read weights ({e})") from None
    own = model.state_dict()
    cfg = getattr(model, "cfg", None)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_embeddings", False) else set()
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{file}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(
                f"{file}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(state, strict=False)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimizer and RNG from `path`; returns the trainer state."""
    path = Path(path)
    verify_checkpoint(path)
    load_weights(model, path / "model.safetensors")
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())


# ----------------------------------------------------------------------------- sharded (FSDP2)
def save_sharded_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    *,
    is_main: bool,
    keep: int | None = None,
) -> Path:
    """Collective save with `torch.distributed.checkpoint`: every rank writes its shards into
    `dcp/`; rank 0 adds the trainer state and checksums and renames the folder into place.
    The result loads on any number of processes (DCP reshards)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    dist.barrier()
    if is_main:
        rng = {"cpu": torch.get_rng_state()}
        _torch_save(rng, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sums = {str(f.relative_to(tmp)): file_sha256(f) for f in files}
        for f in files:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        atomic_write_json(tmp / "checksums.json", sums)
        _put_in_place(tmp, final)
        prune_checkpoints(root, keep)
    dist.barrier()
    return final


_DCP_CLASSES = {
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "MetadataIndex",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
    "_StorageInfo",
}


class _MetadataUnpickler(pickle.Unpickler):
    """torch DCP writes a checkpoint's ``.metadata`` with pickle and its reader loads it with
    plain `pickle.load`, i.e. arbitrary code execution for whoever can write that file. This
    unpickler admits only the plain data classes DCP's metadata is made of (as of torch 2.13;
    a newer torch that adds one gets a clear refusal, not a silent load), torch sizes, dtypes,
    layouts and paths; anything else is refused."""

    def find_class(self, module: str, name: str):
        ok = (
            (module.startswith("torch.distributed.checkpoint.") and name in _DCP_CLASSES)
            or (
                module == "pathlib"
                and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
            )
            or (module == "collections" and name == "OrderedDict")
            or (module == "torch.serialization" and name == "_get_layout")
        )  # maps "torch.strided" to a layout
        if module == "torch":
            obj = getattr(torch, name, None)
            ok = name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's DCP metadata")
        return super().find_class(module, name)


def _load_dcp_metadata(file) -> object:
    try:
        return _MetadataUnpickler(file).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{getattr(file, 'name', 'DCP metadata')}: refused to load ({e}); this is not "
            f"a checkpoint lmforge wrote"
        ) from None


def _safe_dcp_reader(folder: Path):
    """A DCP `FileSystemReader` whose metadata goes through `_MetadataUnpickler`. The metadata
    is also checked up front, because `dcp.load` swallows a failing `read_metadata()` and retries
    with per-rank metadata, which would hide the refusal behind a FileNotFoundError."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    meta = Path(folder) / ".metadata"
    if meta.is_file():
        with open(meta, "rb") as f:
            _load_dcp_metadata(f)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _load_dcp_metadata(f)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def load_sharded_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict:
    """Restore a DCP checkpoint into `model` (sharded or not, any world size); its metadata is
    read with a restricted unpickler (`_MetadataUnpickler`), never plain pickle."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    verify_checkpoint(path)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state: dict[str, Any] = (
        {"model": model_sd, "optim": optim_sd} if optimizer is not None else {"model": model_sd}
    )
    dcp.load(state, storage_reader=_safe_dcp_reader(path / "dcp"))
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
    )
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    return json.loads((path / "trainer_state.json").read_text())
