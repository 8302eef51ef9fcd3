"""Our C++ kernels (int4mm.cpp, ternary.cpp): compiled with the system's g++ on first use into
PyTorch's extensions directory (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), one build
per machine shared by instances side by side, keyed by the source's and torch's versions. A build
that fails is logged once and the caller keeps PyTorch's kernels."""

import hashlib
import logging
import os
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def build_dir() -> Path:
    # get_default_build_root ignores TORCH_EXTENSIONS_DIR, so it is read here first.
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "r3mes"


def _compile(source: Path, library: Path, flags: list[str]) -> None:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    tmp = library.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["g++", "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-I{torch_dir / 'include'}", str(source), "-o", str(tmp), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
           "-ltorch", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    tmp.replace(library)  # atomic: another process never loads a half-written file


def load(source: Path, flags: list[str], label: str) -> bool:
    """Build `source` if this machine has no build of it yet and load its ops; False (logged) when
    either fails."""
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()[:16]
    library = build_dir() / f"{source.stem}_{key}.so"
    try:
        if not library.exists():
            log.info("building the %s into %s (once per machine, ~10 s)", label, library)
            library.parent.mkdir(parents=True, exist_ok=True)
            _compile(source, library, flags)
        torch.ops.load_library(str(library))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("%s unavailable, using PyTorch's: %s", label, str(detail)[-2000:])
        return False
    return True
