"""A float32 CPU kernel for ViTDet attention with the decomposed relative-position bias.

torch's CPU ``scaled_dot_product_attention`` takes the relative-position bias
only as a dense ``queries x keys`` mask, which must be built (``rel_h + rel_w``
broadcast, 800 MB for a ViT-B global block) and read back from memory.
``rel_attention.c`` (beside this file) computes each query's products with the
layer's two relative-position tables itself, adds them while a tile of scores
is in cache, and multiplies in register-blocked AVX-512 micro-kernels: a ViT-B
global block's attention takes about 210 ms on a 2-core Xeon against about
330 ms for SDPA plus its bias (``bench/attention_kernel.py``). Windowed blocks
are read window by window straight from the qkv projection: the kernel stands
in for keras-hub's padding (its tokens' keys and values are the projection's
bias) and computes no padding query, so no padded copy is made or cropped.

The C file is compiled at first use with the system's C compiler (``CC``, or
``cc``) into a cache directory (``SAM_KERNEL_DIR``, default
``~/.cache/sam-backend/kernels``), named by a hash of its source and flags, so
that every worker and restart reuses one build. It runs on the caller's
behalf in ``torch.get_num_threads()`` Python threads (ctypes releases the GIL),
so no second OpenMP runtime competes with torch's.

Nothing requires it: without AVX-512, a compiler, or with
``SAM_ATTENTION_KERNEL=0``, :func:`kernel` returns ``None`` (logged once) and
the attention stays on SDPA. Only float32 CPU tensors with a head size of 16
to 80 (a multiple of 16) and no gradient are its to take (:func:`handles`).

Example:
    >>> import torch
    >>> from sam_backend.accel.attention_kernel import kernel, rel_attention_windows
    >>> qkv = torch.randn(1, 64, 64, 3 * 768)          # a ViT-B block's qkv projection
    >>> table = torch.randn(27, 64)                    # 2 x 14 - 1 relative positions
    >>> if kernel() is not None:                       # doctest: +SKIP
    ...     out = rel_attention_windows(qkv, 12, 14, table, table, scale=0.125)  # (1, 64, 64, 768)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

#: Environment variable: ``0``, ``false``, ``off`` or ``no`` keep SDPA for every attention.
ENV_VAR = "SAM_ATTENTION_KERNEL"
#: Environment variable: where the compiled kernel is kept.
DIR_ENV_VAR = "SAM_KERNEL_DIR"

#: Head sizes the kernel takes: SAM's ViT-B and ViT-L have 64, ViT-H 80.
HEAD_SIZES = frozenset({16, 32, 48, 64, 80})
_SOURCE = Path(__file__).with_name("rel_attention.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-mavx512f", "-mfma", "-std=c11")
#: Queries per work item; must match TQ in rel_attention.c.
_TILE = 64
_OFF_VALUES = {"0", "false", "off", "no"}

_lock = threading.Lock()
_loaded: dict[str, object] = {}
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool)


def kernel_enabled() -> bool:
    """Whether ``SAM_ATTENTION_KERNEL`` allows the kernel (default yes).

    Example:
        >>> os.environ["SAM_ATTENTION_KERNEL"] = "off"
        >>> kernel_enabled()
        False
        >>> del os.environ["SAM_ATTENTION_KERNEL"]
    """
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF_VALUES


def kernel():
    """The compiled kernel's ctypes function, or ``None`` when it cannot run here (reason logged once).

    Example:
        >>> kernel() is None or callable(kernel())
        True
    """
    if not kernel_enabled():
        return None
    with _lock:
        if "fn" not in _loaded:
            _loaded["fn"] = _load()
        return _loaded["fn"]


def kernel_status() -> str:
    """One word for logs and benchmarks: ``avx512`` when the kernel runs, else ``off``/``unavailable``.

    Example:
        >>> kernel_status() in ("avx512", "off", "unavailable")
        True
    """
    if not kernel_enabled():
        return "off"
    return "avx512" if kernel() is not None else "unavailable"


def handles(queries, key_dim: int) -> bool:
    """Whether the kernel can take these queries: float32 on the CPU, no autocast, a head size it knows, no autograd."""
    import torch

    if queries.dtype != torch.float32 or queries.device.type != "cpu" or key_dim not in HEAD_SIZES:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False  # reduced precision was asked for; the kernel computes in float32
    if torch.is_grad_enabled():
        return False  # the kernel has no backward pass: weights may need gradients even when the input does not
    return kernel() is not None


def rel_attention(queries, keys, values, table_h, table_w, scale: float, out=None):
    """Attention of 6-D views ``(outer, inner, heads, H, W, d)`` with keras-hub's decomposed relative positions.

    ``queries``, ``keys``, ``values`` and ``out`` may be any strided views with
    the head size contiguous (for example heads of a fused qkv projection):
    the kernel reads and writes them in place. ``table_h`` (``2H - 1`` rows of
    ``d``) and ``table_w`` (``2W - 1`` rows) are the layer's relative-position
    tables: the score of query ``(qy, qx)`` against key ``(y, x)`` is
    ``scale * q . k + q . table_h[qy - y + H - 1] + q . table_w[qx - x + W - 1]``,
    softmax over all keys. Returns ``out`` (a new contiguous
    ``(outer, inner, heads, H, W, d)`` tensor when not given).
    """
    import torch

    outer, inner, heads, height, width, size = queries.shape
    if out is None:
        out = torch.empty(queries.shape, dtype=torch.float32)
    tensors = (queries, keys, values, out)
    for tensor in tensors:
        if (tuple(tensor.shape) != tuple(queries.shape) or tensor.dtype != torch.float32
                or tensor.device.type != "cpu" or tensor.stride(-1) != 1):
            raise ValueError("queries, keys, values and out must be float32 CPU views of one shape, "
                             "head size contiguous")
    # (image, window row, window column, head, row, column): each (outer, inner) pair is one window.
    strides = [(t.stride(0), 0, t.stride(1), t.stride(2), t.stride(3), t.stride(4)) for t in tensors]
    _run([t.data_ptr() for t in tensors], strides, (outer, 1, inner), (height, width), (height, inner * width),
         None, table_h, table_w, heads, size, scale)
    return out


def rel_attention_windows(qkv, heads: int, window: int, table_h, table_w, scale: float, padding=None):
    """Attention of a fused qkv projection ``(B, H, W, 3 * heads * d)`` in windows: ``(B, H, W, heads * d)``.

    keras-hub's ViTDet attention after the qkv projection: ``window`` 0 for a
    global block (the whole grid attends), else windows of ``window x window``
    tokens over the grid padded to a multiple of ``window``, where a padding
    token's key and value are those of ``padding`` (the projection's bias,
    ``3 * heads * d``; zeros when None). The kernel reads each window of
    ``qkv`` in place, never builds the padded grid, and writes only the real
    tokens' outputs, in the layout the output projection reads.
    """
    import torch

    batch, grid_h, grid_w, columns = qkv.shape
    channels = columns // 3
    size = channels // heads
    if qkv.dtype != torch.float32 or qkv.device.type != "cpu" or qkv.stride(-1) != 1 or columns != 3 * heads * size:
        raise ValueError("qkv must be a float32 CPU (B, H, W, 3 * heads * d) projection, channels contiguous")
    height, width = (window, window) if window else (grid_h, grid_w)
    rows, cols = -(-grid_h // height), -(-grid_w // width)
    out = torch.empty((batch, grid_h, grid_w, channels), dtype=torch.float32)
    pointers = [qkv.data_ptr() + part * channels * 4 for part in range(3)] + [out.data_ptr()]
    strides = [(t.stride(0), height * t.stride(1), width * t.stride(2), size, t.stride(1), t.stride(2))
               for t in (qkv, qkv, qkv, out)]
    if rows * height != grid_h or cols * width != grid_w:
        pad = torch.zeros(3 * channels) if padding is None else padding.detach().to(torch.float32).contiguous()
        padding = (pad[channels:2 * channels], pad[2 * channels:])
    else:
        padding = None
    _run(pointers, strides, (batch, rows, cols), (height, width), (grid_h, grid_w), padding, table_h, table_w,
         heads, size, scale)
    return out


def _run(pointers, strides, windows, window_shape, valid, padding, table_h, table_w, heads: int, size: int,
         scale: float) -> None:
    """The kernel over threads, for ``windows`` = (images, rows, columns) of ``window_shape`` tokens.

    ``valid``: the real rows and columns of an image's token grid; ``padding``:
    the (keys, values) of the others. See rel_attention.c.
    """
    import torch

    fn = kernel()
    if fn is None:
        raise RuntimeError("the relative-position attention kernel is not available here")
    if size not in HEAD_SIZES:
        raise ValueError(f"head size {size}; the kernel handles {sorted(HEAD_SIZES)}")
    images, rows, cols = windows
    height, width = window_shape
    table_h, table_w = (t.detach().to(torch.float32).contiguous() for t in (table_h, table_w))
    if tuple(table_h.shape) != (2 * height - 1, size) or tuple(table_w.shape) != (2 * width - 1, size):
        raise ValueError(f"relative-position tables of {tuple(table_h.shape)} and {tuple(table_w.shape)} do not "
                         f"match a {height}x{width} grid of head size {size}")
    flat = (ctypes.c_int64 * 24)(*(int(s) for layout in strides for s in layout))
    pad_k, pad_v = (p.data_ptr() for p in padding) if padding is not None else (None, None)
    args = (*pointers, flat, rows, cols, valid[0], valid[1], pad_k, pad_v, table_h.data_ptr(), table_w.data_ptr(),
            heads, height, width, size, float(scale))
    items = images * rows * cols * heads * -(-(height * width) // _TILE)
    threads = max(1, min(torch.get_num_threads(), items))
    if threads == 1:
        codes = [fn(*args, 0, items)]
    else:
        bounds = [items * i // threads for i in range(threads + 1)]
        pool = _thread_pool(threads)
        futures = [pool.submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(threads)]
        codes = [future.result() for future in futures]
    if any(codes):
        raise MemoryError("the attention kernel could not allocate its scratch memory")  # -2 is ruled out above


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    global _pool
    pid = os.getpid()
    with _lock:
        # A pool's threads do not survive fork (gunicorn workers): one per process.
        if _pool is None or _pool[0] != pid or _pool[1] != threads:
            _pool = (pid, threads, ThreadPoolExecutor(threads, thread_name_prefix="sam-attention"))
        return _pool[2]


def build_kernel(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Path:
    """Compile ``rel_attention.c`` (if not already there) into ``directory`` and return the library's path.

    ``directory`` defaults to the first usable kernel cache (``SAM_KERNEL_DIR``,
    or ``~/.cache/sam-backend/kernels``). The library is named by a hash of the
    source and flags, so a later version of this file is built anew. Any x86-64
    machine can build it (for an image that runs elsewhere); only AVX-512 CPUs
    run it. Raises ``OSError`` or ``subprocess.SubprocessError`` on failure.

    Example:
        >>> build_kernel("/opt/sam-kernels")  # doctest: +SKIP
        PosixPath('/opt/sam-kernels/rel_attention-1f0c3a5e9b2d4c67.so')
    """
    directories = [Path(directory)] if directory is not None else _cache_dirs()
    cached = _cached(directories)
    if cached is not None:
        return cached
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler (set CC, or install gcc)")
    refused = []
    for folder in directories:
        try:
            _usable_dir(folder, create=True)
            fd, partial = tempfile.mkstemp(prefix=_library_name(), suffix=".tmp", dir=folder)
            os.close(fd)
        except OSError as exc:
            refused.append(str(exc))
            continue
        try:
            subprocess.run([compiler, *_FLAGS, "-o", partial, str(_SOURCE)], check=True, capture_output=True,
                           text=True, timeout=120)
            os.chmod(partial, 0o755)
            # Built beside its final name and renamed: workers building at once never load half a file.
            os.replace(partial, folder / _library_name())
        except subprocess.CalledProcessError as exc:
            raise subprocess.SubprocessError(exc.stderr.strip()[-500:] or f"exit status {exc.returncode}") from exc
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return folder / _library_name()
    raise OSError(f"no directory for the compiled kernel ({'; '.join(refused)}); set {DIR_ENV_VAR}")


def _load():
    import torch

    if not sys.platform.startswith("linux"):
        logger.info("Attention kernel: built on Linux only; attention stays on SDPA on %s.", sys.platform)
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        logger.info("Attention kernel: this CPU runs torch at %s, not AVX-512; attention stays on SDPA.", capability)
        return None
    try:
        library = build_kernel()
        fn = ctypes.CDLL(str(library)).sam_rel_attention
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("Attention kernel unavailable (%s); attention stays on SDPA, about 1.3x slower on a CPU "
                       "(docs/speed.md: Attention kernel).", exc)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, ptr, ptr, ctypes.POINTER(ctypes.c_int64), i64, i64, i64, i64, ptr, ptr, ptr, ptr,
                   i64, i64, i64, i64, ctypes.c_float, i64, i64]
    fn.restype = ctypes.c_int
    logger.info("Attention kernel: %s (AVX-512, float32).", library)
    return fn


def _library_name() -> str:
    digest = hashlib.sha256(_SOURCE.read_bytes() + "\0".join(_FLAGS).encode()).hexdigest()[:16]
    return f"rel_attention-{digest}.so"


def _cached(directories: list[Path]) -> Path | None:
    for folder in directories:
        library = folder / _library_name()
        if library.is_file() and _usable_dir(folder, create=False):
            return library
    return None


def _usable_dir(folder: Path, create: bool) -> bool:
    """Whether code may be loaded from ``folder``: not one that another user could have written into."""
    if create:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o022:
        if create:
            raise OSError(f"{folder} is writable by others or not ours")
        return False
    return True


def _cache_dirs() -> list[Path]:
    configured = os.environ.get(DIR_ENV_VAR, "").strip()
    if configured:
        return [Path(configured)]
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(base) / "sam-backend" / "kernels", Path(tempfile.gettempdir()) / f"sam-backend-kernels-{os.getuid()}"]


def main(argv: list[str] | None = None) -> int:
    """``python -m sam_backend.accel.attention_kernel [DIRECTORY]``: build the kernel ahead of time (Docker images)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        logger.info("%s", build_kernel(args[0] if args else None))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.error("Could not build the attention kernel: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
