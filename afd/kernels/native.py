"""The C++ CPU kernels in csrc/cpu_kernels.cpp, built once per machine with its own compiler.

`make setup` builds them (`afd.kernels.native.main`); otherwise the first process that needs them
does. The build goes through torch.utils.cpp_extension into the cache (`~/.cache/afd/native-kernels/`, or
`$AFD_NATIVE_KERNELS_DIR`), in a folder named by the source, torch and Python, so a changed source or a new
torch rebuilds and processes on one machine share a build. A folder that already holds the built library is
imported directly, without a compiler or ninja: that is how an image built with a compiler (the CPU
Dockerfile) ships the kernels to a runtime without one. The instruction set is picked at run time inside the
library, so a cached build also runs on another x86-64 CPU.

When the build or the import fails (no compiler, no ninja, a CPU without AVX2) or `AFD_NATIVE_KERNELS=0`,
`load()` returns None and logs the reason once: every caller then keeps torch's own kernels.
`AFD_NATIVE_ISA=avx2` caps the instruction set (the tests run the AVX2 path on AVX512 CPUs with it), and
`AFD_NATIVE_ISA=avx512_bf16` keeps linears off the AMX tiles of a CPU that has them (`matrix_isa()` says
whether they serve; `AFD_NATIVE_AMX_MIN_ROWS`, default 4, the input rows from which they do).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
DISABLE_ENV = "AFD_NATIVE_KERNELS"
"""Set to 0 to run on torch's kernels only (the pure-torch fallback)."""
DIR_ENV = "AFD_NATIVE_KERNELS_DIR"
"""Root of the builds instead of ~/.cache/afd/native-kernels (an image's prebuilt kernels)."""
MODULE_NAME = "afd_cpu_kernels"

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failure: str | None = None
_tried = False


def _build_dir() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    root = os.environ.get(DIR_ENV)
    if root:
        return Path(root) / key
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "afd" / "native-kernels" / key


def _prebuilt(directory: Path) -> ModuleType | None:
    """The library already built in `directory`, imported as is; None where there is none or it does not import
    (e.g. half written by a build under way), and the build below then runs."""
    import importlib.machinery
    import importlib.util

    library = directory / f"{MODULE_NAME}.so"
    if not library.is_file():
        return None
    try:
        loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(library))
        spec = importlib.util.spec_from_file_location(MODULE_NAME, library, loader=loader)
        if spec is None:
            return None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except ImportError:
        return None


def switched_off(env: str) -> bool:
    """Whether the on/off setting `env` says off (0 / false / no / off); unset or anything else is on. The one
    reader of the kernels' switches (AFD_NATIVE_KERNELS, AFD_KERNEL_TUNING, AFD_PACKED_LINEAR)."""
    return os.environ.get(env, "on").strip().lower() in ("0", "false", "no", "off")


def disabled() -> bool:
    return switched_off(DISABLE_ENV)


def _build(verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    directory = _build_dir()
    prebuilt = _prebuilt(directory)
    if prebuilt is not None:
        return prebuilt
    directory.mkdir(parents=True, exist_ok=True)
    # cpp_extension runs `ninja` from PATH; the venv's own ninja (a dependency) is beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return load(
        name=MODULE_NAME,
        sources=[str(SOURCE)],
        # -fopenmp makes at::parallel_for split work across torch's threads; the library then resolves
        # libgomp.so.1 to the copy torch already loaded, so there is one thread pool.
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=verbose,
    )


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernels, or None (with the reason in `failure()`) where they cannot run here."""
    global _loaded, _failure, _tried
    if _tried:
        return _loaded
    with _lock:
        if _tried:
            return _loaded
        if disabled():
            _failure = f"{DISABLE_ENV}=0"
        else:
            try:
                module = _build(verbose)
                if module.available_isa():
                    _loaded = module
                else:
                    _failure = "this CPU has neither AVX512-BF16 nor AVX2+FMA"
            except Exception as exc:  # any build or import failure means: use torch's kernels
                _failure = f"build failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
        if _failure:
            log.warning("native CPU kernels not used (%s); torch's kernels serve instead", _failure)
        _tried = True
    return _loaded


def failure() -> str | None:
    """Why `load()` returned None, once it has been called."""
    return _failure


def describe() -> str:
    """What the kernels run on here, e.g. "avx512_bf16, amx_bf16 tiles from 4 input rows", or why they do not."""
    module = load()
    if module is None:
        return f"off ({failure()})"
    matrix = module.matrix_isa()
    tiles = f", {matrix} tiles from {module.matrix_min_rows()} input rows" if matrix else ""
    return f"{module.available_isa()}{tiles}"


def main() -> None:
    """Build now (at set-up) and say which instruction set the kernels will use."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = load(verbose="-v" in sys.argv)
    if module is None:
        print(f"native CPU kernels: not available ({failure()}); torch's kernels will be used")
        return
    print(f"native CPU kernels: built in {_build_dir()}, instruction set {describe()}")


if __name__ == "__main__":
    main()
