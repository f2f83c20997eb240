"""Where a simulation computes: the config's ``device`` and ``precision`` (docs/devices.md).

Everything a run builds is built on the host (data loaders, the model's initialization, the
counter-based draws), so a run starts from the same bits on every device; the builder then
places the data, the initial model and the trainer's and evaluator's buffers on the device,
and every tensor the simulator makes after that names its device (tests/test_devices.py runs
the supported patterns with the default device set to ``meta``: a factory that forgot its
device fails or changes the metrics there).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import numpy as np
import torch

from gossamer.config import ConfigError

# every pattern's simulator keeps its tensors on the configured device but these (one line
# each says why); tests/test_devices.py checks the others
CPU_ONLY = {"grank": "G-Rank scores click logs in numpy and trains no model"}


def resolve(name: str) -> torch.device:
    """The torch device a config's ``device`` names: ``auto`` is ``cuda`` when torch sees a GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{name}: torch sees no CUDA device (a CPU build of torch, "
                              "or no GPU): use cpu, or auto to take a GPU when there is one")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError("device", f"{name}: torch sees {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
        if device.index is None:       # the current GPU, named (environment.json); asking
            # an uninitialized CUDA for it would start it here (the launcher forks its roles)
            device = torch.device("cuda", _local_gpu(count))
    return device


def _local_gpu(count: int) -> int:
    """The GPU ``cuda`` means here: a rank of a sharded run (``LOCAL_RANK`` set by torchrun or
    ``--ranks``, ``WORLD_SIZE`` > 1) takes its local rank's, one GPU a rank; any other process
    the current one."""
    import os

    try:
        local, world = int(os.environ.get("LOCAL_RANK", "-1")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        local, world = -1, 1
    if world > 1 and local >= 0:
        return local % count
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def check(device: torch.device, precision: str, pattern: str) -> None:
    """Refuse, in one line naming the field, what a device or precision does not support."""
    if device.type != "cpu" and pattern in CPU_ONLY:
        raise ConfigError("device", f"{CPU_ONLY[pattern]}: set device: cpu")
    if precision == "tf32" and device.type != "cuda":
        raise ConfigError("precision", "tf32 is a CUDA matmul format; on the CPU use fp32 or bf16")


def from_host(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array (indices, a mask, weights) as a tensor on ``device`` (``index_select`` and
    ``index_copy_`` want their index beside the data)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def spare_bytes(device: torch.device, reserved: int = 0) -> int | None:
    """A GPU's free memory less ``reserved`` bytes (what a run will still allocate there);
    None on the CPU, whose budgets are fixed."""
    if device.type != "cuda":
        return None
    return max(0, torch.cuda.mem_get_info(device)[0] - reserved)


def computes_here(method: Callable) -> Callable:
    """For a trainer's or evaluator's method ``method(self, params, ...)``: rows ``params`` that
    live elsewhere (a runtime process keeps them on the host while it computes on its GPU) move
    to ``self.x``'s device, and the tensor results (one, or a tuple) come back to theirs."""
    @functools.wraps(method)
    def wrapper(self, params: torch.Tensor, *args, **kwargs):
        home, here = params.device, self.x.device
        if home == here:
            return method(self, params, *args, **kwargs)
        out = method(self, params.to(here), *args, **kwargs)
        return tuple(t.to(home) for t in out) if isinstance(out, tuple) else out.to(home)
    return wrapper


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype training and evaluation autocast to, or None (full fp32)."""
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s kind, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def cuda_settings(device: torch.device, precision: str) -> Iterator[None]:
    """For one run on ``device``: CUDA's TF32 switches (on with ``tf32``, off otherwise, so
    ``fp32`` is full fp32 on every GPU) and the current GPU (``device``'s: its libraries'
    handles and a sharded run's NCCL communicators are made there), restored afterwards;
    nothing changes on the CPU."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.cuda.device(device):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
