"""A new ensemble folder derived from another: adapted to a site (new member weights) or calibrated on its donors
(new operating points). The source folder is never changed; the new one is written beside its final place and
renamed into it once complete, so an interrupted write leaves nothing that looks like an ensemble."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..errors import AlldetectError
from ..models.folds import FoldAverage
from .build import check_bf16
from .card import write_model_card
from .folder import EnsembleFolder, sha256_file
from .spec import EnsembleSpec

logger = logging.getLogger(__name__)
REWRITTEN = {EnsembleFolder.SPEC, EnsembleFolder.CARD}  # written anew; graphs (*.onnx) are exported anew or dropped


@dataclass
class Derived:
    """What an adaptation or calibration changed, not yet written: the new spec (its ``site`` steps included) and,
    when adapted, the members with their new weights (in the spec's order)."""
    spec: EnsembleSpec
    members: list[nn.Module] | None = None


def write_derived(source: EnsembleFolder, derived: Derived, out: str | Path, *,
                  finish: Callable[[EnsembleFolder], None] | None = None) -> EnsembleFolder:
    """Write ``derived`` as a new folder ``out``: the source's files (graphs, spec and card excepted), the new
    weights and their hashes, the new spec, the bf16 check again for new weights, and the card; then ``finish``
    (the export) on the complete folder, and the rename into ``out``."""
    out = check_new_folder(out, source.path)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rewritten = {w for entry in derived.spec.members for w in entry.weights} if derived.members is not None else set()
    _copy_regular_files(source.path, partial, skip=rewritten)
    folder = EnsembleFolder(partial)
    spec = replace(derived.spec, graphs={})
    if derived.members is not None:
        spec = replace(spec, members=[_saved(entry, module, partial)
                                      for entry, module in zip(spec.members, derived.members)])
    folder.save_spec(spec)
    if derived.members is not None:
        check_bf16(folder)
    write_model_card(folder)
    if finish is not None:
        finish(folder)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return EnsembleFolder(out)


def check_new_folder(out: str | Path, source: Path) -> Path:
    """``out`` once it is known to be a place for a new ensemble folder: absent, or an empty folder, and not the
    source."""
    out = Path(out)
    if out.resolve() == Path(source).resolve():
        raise AlldetectError(f"{out}: is the source folder; write the new ensemble to a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlldetectError(f"{out}: exists and is not an empty folder; write the new ensemble to a new folder")
    return out


def _saved(entry, module: nn.Module, folder: Path):
    """The member's weights written in the new folder (one file per fold model), with their new hashes."""
    models = list(module.folds) if isinstance(module, FoldAverage) else [module]
    hashes = []
    for weights, model in zip(entry.weights, models):
        path = folder / weights
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
        hashes.append(sha256_file(path, kind="member weights"))
    return replace(entry, sha256=hashes)


def _copy_regular_files(source: Path, target: Path, *, skip: set[str]) -> None:
    """Every regular file under ``source`` but the graphs, the spec and card, and ``skip`` (paths relative to
    ``source``, written anew); links and special files are left behind with a warning (the folder vouches only for
    what lies inside it)."""
    for root, dirs, files in os.walk(source):
        relative = Path(root).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / name
            if relative == Path(".") and (name in REWRITTEN or name.endswith(".onnx") or name.endswith(".tmp")) \
                    or (relative / name).as_posix() in skip:
                continue
            if path.is_symlink() or not stat.S_ISREG(path.lstat().st_mode):
                logger.warning("%s: not copied (a link or not a regular file)", path)
                continue
            shutil.copy2(path, target / relative / name)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
