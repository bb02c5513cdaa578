"""Save and load fused models as a folder that loads without unpickling code.

Layout of an artifact folder::

    manifest.json          tasks, models, cuts, AKF settings, versions
    stages/NAME.stageK.pt2 each model's stages as torch.export programs
    fusion.safetensors     the AKF modules and head mixers (the trained part)
    example_inputs.pt      a small batch of inputs (tensors only, weights_only)

Saving writes a complete new folder next to the target and then swaps it in with one
atomic rename, so an interrupted save leaves the previous artifact as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.fx as fx
from safetensors.torch import load_file, save_file

from ._version import __version__
from .errors import ArtifactError, FuseError, LoadError
from .generate import FusionInfo, build, member_inputs, stages_of, unfreeze
from .load import read_archive

FORMAT = "fxfuse-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def save(
    fused: fx.GraphModule,
    directory: str | os.PathLike,
    example_inputs: tuple | None = None,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    """Write a fused model to `directory`.

    Args:
        fused: a model from `fxfuse.fuse` or `fxfuse.load`.
        directory: the artifact folder to write.
        example_inputs: inputs to export the stages with; defaults to the ones the
            model was fused with.
        overwrite: replace an existing artifact (never half-way).
        extra: more JSON-serialisable entries for the manifest (training records).

    Raises:
        ArtifactError: the folder exists and `overwrite` is false, or it is not an
            artifact and would be replaced.
    """
    target = Path(directory)
    check_target(target, overwrite)
    info: FusionInfo = fused.fusion_info
    inputs = tuple(example_inputs or fused.example_inputs)

    staging = _staging_folder(target)
    try:
        stage_files = _save_stages(fused, info, inputs, staging)
        _save_fusion_weights(fused, staging / "fusion.safetensors")
        torch.save(inputs, staging / "example_inputs.pt")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": {"fxfuse": __version__, "torch": torch.__version__},
            "fusion": info.to_json(),
            "stages": stage_files,
            "unfrozen": getattr(fused, "unfrozen", None),
            **(extra or {}),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def save_weights(
    fused: fx.GraphModule, directory: str | os.PathLike, record: dict | None = None
) -> None:
    """Replace the trained part of an artifact (after `fit`), all at once.

    A copy of the folder is made beside it with hard links (no stage is copied),
    the new weights and manifest are written into the copy, and the copy is swapped
    in with one atomic rename, so weights and manifest always belong together.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    if record is not None:
        manifest["training"] = record
    manifest["unfrozen"] = getattr(fused, "unfrozen", None)

    staging = _staging_folder(root)
    try:
        shutil.rmtree(staging)
        shutil.copytree(root, staging, copy_function=_link_or_copy)
        weights = staging / "fusion.safetensors"
        weights.unlink(missing_ok=True)  # a link to the old file: never write into it
        _save_fusion_weights(fused, weights)
        (staging / MANIFEST).unlink()
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_into_place(staging, root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _save_fusion_weights(fused: fx.GraphModule, path: Path) -> None:
    save_file(_fusion_state(fused), path)
    # safetensors writes the file readable by its owner alone; give it the mode
    # any other file of the artifact gets.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# Folders being written sit beside the target under this infix until they are
# swapped in; one left by a killed process is removed by the next save.
_PARTIAL = ".fxfuse-partial-"


def _staging_folder(target: Path) -> Path:
    """A new empty folder beside `target`, after removing any left by a killed save."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}{_PARTIAL}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}{_PARTIAL}", dir=target.parent)
    )
    staging.chmod(0o755)
    return staging


def load(directory: str | os.PathLike) -> fx.GraphModule:
    """Read a fused model written by `save`. No pickled code is loaded.

    Raises:
        ArtifactError: the folder is missing, not an artifact, or damaged.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    try:
        info = FusionInfo.from_json(manifest["fusion"])
        stage_files = {m.name: list(manifest["stages"][m.name]) for m in info.models}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ArtifactError(
            f"{root / MANIFEST} lacks or garbles an entry ({type(error).__name__}: "
            f"{error}); the artifact is damaged, fuse again"
        ) from None
    inside = root.resolve()
    for files in stage_files.values():
        for file in files:
            if not (root / file).resolve().is_relative_to(inside):
                raise ArtifactError(
                    f"{root / MANIFEST} names a stage outside the artifact ({file}); "
                    "the artifact is damaged, fuse again"
                )
    stages = {
        name: [_load_program(root / f) for f in files]
        for name, files in stage_files.items()
    }
    try:
        fused = build(info, stages)
    except (FuseError, ValueError, KeyError, TypeError) as error:
        raise ArtifactError(
            f"{root / MANIFEST} describes a model that cannot be built ("
            f"{str(error)[:200]}); the artifact is damaged, fuse again"
        ) from None
    state = _read_file(root / "fusion.safetensors", lambda p: load_file(str(p)))
    try:
        missing, unexpected = fused.load_state_dict(state, strict=False)
    except RuntimeError as error:  # the same names, with other shapes
        shapes = [line.strip() for line in str(error).splitlines()[1:2]]
        raise ArtifactError(
            f"{root}/fusion.safetensors does not match the manifest "
            f"({'; '.join(shapes)[:200] or 'other shapes'}); the artifact is "
            "damaged, fuse again"
        ) from None
    missing = [k for k in missing if _is_fusion_key(k)]
    if missing or unexpected:
        raise ArtifactError(
            f"{root}/fusion.safetensors does not match the manifest (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}); the artifact is damaged, "
            "fuse again"
        )
    if manifest.get("unfrozen"):
        unfreeze(fused, manifest["unfrozen"])
    inputs = _read_file(
        root / "example_inputs.pt",
        lambda p: torch.load(p, map_location="cpu", weights_only=True),
    )
    fused.keep("example_inputs", inputs)
    return fused


def _read_file(path: Path, read):
    """`read(path)`, with a missing or unreadable file reported as damage."""
    if not path.is_file():
        raise ArtifactError(f"'{path}' is missing; the artifact is damaged, fuse again")
    try:
        return read(path)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArtifactError(
            f"cannot read '{path}' ({first[:150]}); the artifact is damaged, fuse again"
        ) from None


def read_manifest(root: Path) -> dict:
    """The manifest of an artifact folder, checked for format."""
    path = root / MANIFEST
    if root.is_file():
        raise ArtifactError(
            f"'{root}' is a file, not an artifact folder; give the folder written by "
            "fxfuse fuse"
        )
    if not root.is_dir():
        raise ArtifactError(f"artifact folder '{root}' does not exist; run fxfuse fuse")
    if not path.is_file():
        raise ArtifactError(
            f"'{root}' is not an fxfuse artifact (no {MANIFEST}); give the folder "
            "written by fxfuse fuse"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an fxfuse manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} was written by a newer fxfuse (format "
            f"{manifest['format_version']}); upgrade fxfuse"
        )
    return manifest


def check_target(target: Path, overwrite: bool) -> None:
    """Raise an ArtifactError if `save` would refuse to write to `target`."""
    if target.is_file():
        raise ArtifactError(
            f"'{target}' is a file; an artifact is a folder, so give a folder path "
            "(an existing file is never replaced)"
        )
    if not target.exists() or not any(target.iterdir()):
        return  # nothing there to lose
    if not (target / MANIFEST).is_file():
        raise ArtifactError(
            f"'{target}' is a folder with other files, not an fxfuse artifact; "
            "fxfuse never replaces it, so choose another folder"
        )
    if not overwrite:
        raise ArtifactError(
            f"'{target}' already exists; pass --force (overwrite=True) to replace it, "
            "or choose another folder"
        )


def _save_stages(fused, info: FusionInfo, inputs: tuple, folder: Path) -> dict:
    """Export every stage with a dynamic batch dimension, fed by its real input."""
    (folder / "stages").mkdir()
    files: dict[str, list[str]] = {}
    for model in info.models:
        value_args = member_inputs(info, model.name, inputs)  # keys it renames too
        files[model.name] = []
        for k, stage in enumerate(stages_of(fused, model.name)):
            dynamic = torch.utils._pytree.tree_map(
                lambda v: (
                    {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) else None
                ),
                value_args,
            )
            with torch.no_grad():
                program = torch.export.export(
                    stage, value_args, dynamic_shapes=dynamic, strict=False
                )
                value_args = (stage(*value_args),)
            name = f"stages/{model.name}.stage{k}.pt2"
            torch.export.save(program, folder / name)
            files[model.name].append(name)
    return files


def _load_program(path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise ArtifactError(f"stage file '{path}' is missing; the artifact is damaged")
    try:
        return read_archive(path).module()
    except LoadError as error:
        reason = error.reason or "it holds pickled objects"
        raise ArtifactError(
            f"cannot read stage '{path}' ({reason}); the artifact is damaged, fuse "
            "again"
        ) from None


def _is_fusion_key(key: str) -> bool:
    return key.startswith(("fusion", "mix_"))


def _fusion_state(fused: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained part: fusion modules, mixers, and any unfrozen stage weights."""
    trained = {name for name, p in fused.named_parameters() if p.requires_grad}
    return {
        k: v.detach().contiguous().clone()
        for k, v in fused.state_dict().items()
        if _is_fusion_key(k) or k in trained
    }


def _swap_into_place(staging: Path, target: Path) -> None:
    """Move the finished folder to `target`, replacing an old one atomically."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        _remove_old(staging, target)  # staging now holds the old artifact
        return
    # Without an atomic exchange: move the old one aside first, then the new in.
    aside = staging.with_name(staging.name + ".old")
    os.rename(target, aside)
    os.rename(staging, target)
    _remove_old(aside, target)


def _remove_old(old: Path, target: Path) -> None:
    """Remove the replaced artifact. The new one is in place already, so a file that
    cannot be removed is worth a warning, not a failure."""
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        warnings.warn(
            f"{target} was written, but the folder it replaced could not be removed "
            f"entirely; delete {old} yourself",
            stacklevel=4,
        )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(
        at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange
    )
    return result == 0
