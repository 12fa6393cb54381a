"""Which device to run on and which precision to compute in — decided from the hardware.

bf16 halves memory traffic and, on hardware with native bf16 matrix units (NVIDIA Ampere+, CPUs
with AVX512_BF16 or AMX), speeds up matmuls several times. On a CPU without them PyTorch emulates
bf16 and the same autocast is many times *slower* than fp32 (BENCHMARKS.md), so the precision is
read from the hardware, never assumed.
"""

import functools

import torch


def pick_device(requested="auto"):
    """cuda -> mps -> cpu, or the device the user asked for."""
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16():
    """True when the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16) and PyTorch
    runs its AVX-512 kernels on it (ATEN_CPU_CAPABILITY=avx2 makes such a CPU behave like an
    AVX2-only one, and then bf16 is emulated there too)."""
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # macOS/Windows: no cpuinfo; Apple silicon runs bf16 fine but only on mps
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(device, requested="auto"):
    """'bf16', 'fp16' or 'fp32' for autocast on this device."""
    if requested and requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"  # mps autocast coverage is still patchy; fp32 is the safe default there


def available_memory(device=None):
    """Bytes a new allocation can still get on `device` (default: the CPU), or None when the
    system does not say. On Linux that is MemAvailable (free memory plus the page cache the
    kernel can drop), not MemFree, which a busy disk cache makes look almost full."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_kind(device):
    """The kind of machine a speed measurement holds for, in words: the CPU's model and the
    vector instructions PyTorch uses on it, or the GPU's name; the threads and torch version."""
    if device.type == "cuda":
        kind = torch.cuda.get_device_name(device)
    else:
        kind = "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                kind = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        kind += f", {torch.backends.cpu.get_cpu_capability()}{', native bf16' if cpu_has_native_bf16() else ''}"
    return f"{kind}, {torch.get_num_threads()} threads, torch {torch.__version__}"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # each precision's torch dtype


def autocast(device, precision):
    """A context manager that runs the forward pass in `precision`, a name ('bf16') or its torch
    dtype; for fp32, no autocast at all."""
    dtype = DTYPES.get(precision, precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
