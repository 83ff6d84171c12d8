"""Linear layers and matrix products through oneDNN on the CPU, where that is faster.

PyTorch hands float32 matrix products on the CPU to MKL. On AMD processors MKL does not
take its AVX-512 kernels, while oneDNN (which PyTorch also ships, and uses for bfloat16)
does: measured on a 2-core AMD EPYC with AVX-512, a ViT-B linear layer (4096 x 768 ->
3072) took 145 ms through ``F.linear`` and 100 ms through oneDNN, and the
prompt-by-image products of the mask decoder (56 x 256 by 256 x 4096) 0.95 ms against
0.69 ms. oneDNN also applies GELU or ReLU to the output as it is written, which saves
a pass over large activations.

The entry point is ``torch.ops.mkldnn._linear_pointwise``, the kernel PyTorch's own
compiler emits for CPU linear layers. It has no backward pass and knows nothing of
autocast, so it is used only when no gradient is being recorded for its inputs and CPU
autocast is off; and since it is not a public API, it is checked once against
``F.linear`` before first use and never used if the check fails or raises. Products of
fewer than about a million multiply-adds (a few prompt tokens through a 256-wide layer)
stay with ``F.linear``, whose call costs less. Results agree with ``F.linear`` to
float32 rounding (summation order).

The route is off until something turns it on: :data:`enabled`, which
:func:`napari_sam.core.runtime.configure_runtime` sets (``load_model`` calls it) to
:func:`faster_here` unless ``NAPARI_SAM_ONEDNN`` says otherwise. It was measured faster on
AMD x86-64 processors only; on Intel processors MKL is at its best, and elsewhere nothing
was measured. Importing this module changes nothing.
"""

from __future__ import annotations

import platform
import threading
import warnings
from collections.abc import Callable
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["activate", "activation_of", "available", "enabled", "faster_here", "linear", "matmul_nt"]


def faster_here() -> bool:
    """Whether the route was measured faster on this kind of processor: AMD x86-64 (the
    vendor is read on Linux; elsewhere it is unknown, so no)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return "AuthenticAMD" in line
    except OSError:
        pass
    return False


#: Route large CPU products through oneDNN (off until configured; see the module docstring).
enabled: bool = False

# Below this many multiply-adds the call overhead of oneDNN outweighs its faster kernel
# (measured: 7 x 256 -> 256 is a tie, 7 x 256 -> 2048 twice as fast).
_MIN_MACS = 1 << 20
_ACTIVATIONS = (None, "gelu", "relu")
_working: bool | None = None
_scripted: Callable[..., torch.Tensor] | None = None
_probe_lock = threading.Lock()


def _kernel(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], attr: str, algorithm: str) -> torch.Tensor:
    # The tracer cannot record the op's empty ``Scalar?[]`` argument, but it can record
    # a call to this function compiled by TorchScript, which types the list.
    scalars: List[Optional[Union[int, float, complex]]] = []
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, scalars, algorithm)


def available() -> bool:
    """Whether the oneDNN route works in this process (checked once, on first call).

    Call it before tracing a graph that should use the route: the check itself must not
    run while a tracer is recording, so until it has run, traces use ``F.linear``.
    """
    return _onednn_works()


def _onednn_works() -> bool:
    global _working, _scripted
    if _working is not None:
        return _working
    if torch.jit.is_tracing():
        return False
    with _probe_lock:
        if _working is None:
            _working, _scripted = _probe()
    return _working


def _probe():
    """Compile the traceable wrapper and compare both calls with ``F.linear``, on fixed
    float32 CPU tensors whatever the defaults, autocast or global random state."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False, None
        g = torch.Generator(device="cpu").manual_seed(0)
        x, w, b = (
            torch.randn(*shape, generator=g, dtype=torch.float32, device="cpu") for shape in ((8, 16), (4, 16), (4,))
        )
        with torch.no_grad(), torch.autocast("cpu", enabled=False), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.compile, which needs a
            # compiler at run time; should scripting go, the route stays off.
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(_kernel)
            want = F.gelu(F.linear(x, w, b))
            works = all(
                got.dtype == want.dtype and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
                for got in (_kernel(x, w, b, "gelu", "none"), scripted(x, w, b, "gelu", "none"))
            )
        return works, scripted if works else None
    except Exception:  # noqa: BLE001 - any failure means: keep to F.linear
        return False, None


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    call: Callable[..., torch.Tensor] = _kernel
    if torch.jit.is_tracing():
        # _use_onednn let us here, so the probe has run and compiled the wrapper.
        if _scripted is None:
            raise RuntimeError("the oneDNN route was taken while tracing, before its probe compiled the wrapper")
        call = _scripted
    return call(x, w, b, activation or "none", "none" if activation == "gelu" else "")


def _autocast_on_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    return (
        enabled
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and x.ndim >= 2
        and weight.ndim == 2
        and x.numel() * weight.shape[0] >= _MIN_MACS
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
        and not _autocast_on_cpu()
        and _onednn_works()
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)``, as ``F.linear`` followed by the activation.

    Parameters
    ----------
    x
        (..., in) input.
    weight
        (out, in) weights.
    bias
        (out,) or None.
    activation
        None, ``"gelu"`` (exact, erf) or ``"relu"``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: gelu, relu")
    if _use_onednn(x, weight, bias):
        return _onednn(x, weight, bias, activation)
    return activate(F.linear(x, weight, bias), activation)


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Apply ``activation`` (None, ``"gelu"``, ``"relu"``) to a tensor the caller has just
    computed and owns: in place unless autograd needs ``y``, so that no second tensor as
    large is allocated (large allocations cost page faults on every forward)."""
    if activation is None:
        return y
    if torch.is_grad_enabled() and y.requires_grad:
        return F.gelu(y) if activation == "gelu" else F.relu(y)
    return torch.ops.aten.gelu_(y) if activation == "gelu" else y.relu_()


def activation_of(module: torch.nn.Module) -> str | None:
    """The name :func:`linear` knows for an activation module (exact GELU, ReLU), or None."""
    if isinstance(module, torch.nn.GELU):
        return "gelu" if module.approximate == "none" else None
    return "relu" if isinstance(module, torch.nn.ReLU) else None


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for a (..., k) by a 2D (n, k): the right side is used as weights."""
    if _use_onednn(a, b):
        return _onednn(a, b, None, None)
    return a @ b.transpose(-1, -2)
