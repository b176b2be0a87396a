"""The runtime zipapp shipped to target hosts: ``roost.runtime`` as one file.

Built deterministically (sorted entries, fixed timestamps and modes), so the
same roost version always gives the same bytes and the same sha256; hosts
cache it under that hash and are sent nothing when they already hold it.

Each module is shipped as source and as bytecode for the controller's Python
(``.pyc`` beside the ``.py``, which ``zipimport`` prefers): Python cannot cache
bytecode of modules imported from a zip, so without it every start of the
runtime compiled it all again (50–110 ms of CPU, measured: about as much as
the rest of the start-up). A host with another Python version sees a foreign magic number in
the ``.pyc`` and compiles the source instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import marshal
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import roost

_FIXED_TIME = (2020, 1, 1, 0, 0, 0)
_MAIN = b"import roost.runtime.__main__\n"  # the runtime's own entry point runs on import


@dataclass(frozen=True)
class RuntimeBundle:
    data: bytes
    sha256: str

    @property
    def name(self) -> str:
        return f"roost-runtime-{roost.__version__}-{self.sha256[:16]}.pyz"


@lru_cache(maxsize=1)
def runtime_bundle() -> RuntimeBundle:
    """The zipapp of this roost's runtime (built once per process)."""
    package = Path(roost.__file__).resolve().parent
    sources = [package / "__init__.py", *sorted((package / "runtime").glob("*.py"))]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        _add_module(archive, "__main__.py", _MAIN)
        for path in sources:
            _add_module(archive, path.relative_to(package.parent).as_posix(), path.read_bytes())
    data = buffer.getvalue()
    return RuntimeBundle(data, hashlib.sha256(data).hexdigest())


def _add_module(archive: zipfile.ZipFile, name: str, source: bytes) -> None:
    _add(archive, name, source)
    _add(archive, name + "c", _bytecode(name, source))


def _bytecode(name: str, source: bytes) -> bytes:
    """A ``.pyc`` (PEP 552) whose validity is a hash of its source, never checked: the
    archive is immutable and named by its own hash, and no timestamp enters it."""
    code = compile(source, name, "exec", dont_inherit=True)
    unchecked_hash = (0b01).to_bytes(4, "little")
    return (
        importlib.util.MAGIC_NUMBER
        + unchecked_hash
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)
