"""Load torch checkpoints without running arbitrary code, tolerating Lightning's pickled class keys.

Nothing is unpickled with the full pickle machinery: the pickle is first scanned for the globals it
references (without executing it), anything outside torch's weights-only allowlist is refused with
:class:`UnsafeCheckpointError`, and the file is then read by torch's ``weights_only`` unpickler.
Lightning 1.4 keys its ``callbacks`` dict by the class object
``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``; Lightning callback classes are mapped
to inert stand-ins, so such files load without Lightning installed.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import deque
from pathlib import Path
from typing import Any

import torch

# Class objects that Lightning pickles as dict keys get an inert stand-in; its AttributeDict
# (hyper-parameters in some versions) becomes a plain dict. Nothing else is let through.
_LIGHTNING_CLASS = re.compile(r"^pytorch_lightning\.callbacks(\.[A-Za-z_]\w*)+$")
_LIGHTNING_DICT = "pytorch_lightning.utilities.parsing.AttributeDict"
_TORCH_EXTRAS = {"collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.bytearray"}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file references Python globals that a weights-only checkpoint must not contain."""


class LightningStandIn:
    """Inert placeholder for a Lightning class object found in a checkpoint (``official_path``)."""

    official_path: str = ""



def pickle_globals(path: str | Path) -> list[str]:
    """Every global (``module.name``) referenced by the pickle(s) of a ``torch.save`` file.

    Static disassembly only (``pickletools``): nothing is imported or executed. Handles the zip
    format (``data.pkl``) and the legacy format (a sequence of pickles).
    """
    path = Path(path)
    if _is_zip(path):
        try:
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith(".pkl")]
                return sorted({g for n in pickles for g in _scan_pickle(io.BytesIO(archive.read(n)))})
        except Exception as err:  # noqa: BLE001 - whatever is wrong, the file cannot be vetted
            raise UnsafeCheckpointError(f"{path}: cannot inspect the checkpoint's pickle ({err})") from None
    found: set[str] = set()
    with open(path, "rb") as stream:
        # legacy: magic number, protocol, sys info, the object, storage keys (then raw storage bytes)
        for _ in range(5):
            try:
                found.update(_scan_pickle(stream))
            except Exception:  # noqa: BLE001 - past the last pickle or not a pickle: stop scanning
                break
    return sorted(found)


def _scan_pickle(stream: io.IOBase) -> set[str]:
    found: set[str] = set()
    proto = 0
    pushed: deque[Any] = deque([None, None], maxlen=2)  # last pushes: STACK_GLOBAL's operands
    memo: dict[int, Any] = {}
    for op, arg, _ in pickletools.genops(stream):
        if op.name == "PROTO":
            proto = arg
        elif op.name in ("GLOBAL", "INST"):
            module, name = arg.split(" ", 1)
            if proto < 3:  # protocol 2 writes Python-2 names (e.g. __builtin__)
                module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
            found.add(f"{module}.{name}")
        elif op.name == "STACK_GLOBAL":
            module, name = pushed
            found.add(
                f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else "<STACK_GLOBAL>"
            )
        elif "UNICODE" in op.name or "STRING" in op.name:
            pushed.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1]
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        else:
            pushed.append(None)
    return found


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as stream:  # the test torch.load uses: a local-file-header magic at offset 0
        return stream.read(4) == b"PK\x03\x04"


def _torch_allows(name: str) -> bool:
    """Whether torch's weights_only unpickler allows this global by default (tensors, dtypes, ...)."""
    from torch import _weights_only_unpickler as wo

    if hasattr(wo, "_get_allowed_globals"):
        return name in wo._get_allowed_globals()
    return name.startswith("torch.") or name in _TORCH_EXTRAS  # private API gone: torch still checks


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (+ Lightning class stand-ins).

    Raises :class:`UnsafeCheckpointError` naming the offending globals, before anything is loaded,
    when the file references any other Python global. CPU tensors; memory-mapped for zip files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    referenced = pickle_globals(path)
    stand_ins = [(_stand_in(g), g) for g in referenced if g == _LIGHTNING_DICT or _LIGHTNING_CLASS.match(g)]
    unsafe = sorted(set(referenced) - {g for _, g in stand_ins} - {g for g in referenced if _torch_allows(g)})
    if unsafe:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it references the Python global(s) {', '.join(unsafe)}, which a "
            "weights-only checkpoint never needs (loading could run arbitrary code). Nothing was executed. "
            "Only load files from sources you trust; official Diff-AE checkpoints contain no such globals."
        )
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as err:  # torch's own allowlist is the second line of defence
        raise UnsafeCheckpointError(f"refusing to load {path}: {err}") from None


def _stand_in(official_path: str) -> type:
    if official_path == _LIGHTNING_DICT:
        return dict
    name = official_path.rsplit(".", 1)[1]
    return type(name, (LightningStandIn,), {"official_path": official_path, "__module__": __name__})
