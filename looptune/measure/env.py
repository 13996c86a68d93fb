"""Where a measurement ran: `environment(device, dtype)` is the fingerprint every result carries
(profile, score and pareto reuse it); `fingerprint(env)` is the part that keys result caches.

On NVIDIA GPUs it adds the clocks, power and throttle state from NVML (`pynvml` when it can be
imported, else one `nvidia-smi --query-gpu` call); where neither works, `gpu_state` is None.
"""

from __future__ import annotations

import os
import platform
import subprocess

import torch

THROTTLE_BITS = {  # nvmlClocksEventReasons / clocks_event_reasons.active
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that mean the GPU ran slower than it could (idle and boost-sync are not slowdowns).
SLOWDOWNS = {
    "sw_power_cap",
    "hw_slowdown",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def throttle_reasons(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit]


def _nvml_id(device: torch.device) -> str:
    """The NVML / nvidia-smi id of a torch CUDA device: its UUID when torch knows it, else the
    physical index through CUDA_VISIBLE_DEVICES."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
    visible = [
        v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()
    ]
    return visible[index] if index < len(visible) else str(index)


def _state_pynvml(ident: str) -> dict | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = (
                pynvml.nvmlDeviceGetHandleByUUID(ident)
                if ident.startswith(("GPU-", "MIG-"))
                else pynvml.nvmlDeviceGetHandleByIndex(int(ident))
            )
            reasons = (
                getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
            )
            driver = pynvml.nvmlSystemGetDriverVersion()
            return {
                "source": "pynvml",
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
                "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(
                    handle, pynvml.NVML_TEMPERATURE_GPU
                ),
                "pstate": f"P{pynvml.nvmlDeviceGetPerformanceState(handle)}",
                "throttle_reasons": throttle_reasons(int(reasons(handle))),
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001  (NVML missing, no permission, MIG slice: record why)
        return {"source": "pynvml", "error": f"{type(e).__name__}: {e}"}


_SMI_FIELDS = [
    "driver_version",
    "clocks.sm",
    "clocks.mem",
    "clocks.max.sm",
    "power.draw",
    "power.limit",
    "temperature.gpu",
    "pstate",
]


def _state_smi(ident: str) -> dict | None:
    for reasons_field in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    f"--query-gpu={','.join(_SMI_FIELDS + [reasons_field])}",
                    "--format=csv,noheader,nounits",
                    "-i",
                    ident,
                ],
                check=False,  # a failure is read from returncode below
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0:
            break
    else:
        return {"source": "nvidia-smi", "error": out.stderr.strip()[:200]}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]

    def num(v):
        try:
            return float(v)
        except ValueError:
            return None  # "[N/A]"

    driver, sm, mem, max_sm, power, limit, temp, pstate, mask = values
    return {
        "source": "nvidia-smi",
        "driver": driver,
        "sm_clock_mhz": num(sm),
        "mem_clock_mhz": num(mem),
        "max_sm_clock_mhz": num(max_sm),
        "power_w": num(power),
        "power_limit_w": num(limit),
        "temperature_c": num(temp),
        "pstate": pstate,
        "throttle_reasons": throttle_reasons(int(mask, 16)) if mask.startswith("0x") else None,
    }


def gpu_state(device) -> dict | None:
    """Clocks, power, temperature and throttle reasons of an NVIDIA GPU now; None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    ident = _nvml_id(device)
    return _state_pynvml(ident) or _state_smi(ident)


def environment(device, dtype) -> dict:
    """Device name, torch / CUDA versions, dtype, threads, CPU, load and (NVIDIA) GPU state."""
    from looptune import __version__

    device = torch.device(device)
    dtype = str(dtype).removeprefix("torch.")
    env = {
        "device": str(device),
        "device_type": device.type,
        "dtype": dtype,
        "device_name": cpu_model(),
        "torch": str(torch.__version__),  # TorchVersion is a str subclass YAML cannot write
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "looptune": __version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            gpu_memory_bytes=props.total_memory,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            gpu_state=gpu_state(device),
        )
    return env


def fingerprint(env: dict) -> dict:
    """What makes two measurements comparable: hardware, software versions, dtype, threads.
    Clocks, load and temperature vary from minute to minute and are recorded, not keyed on."""
    keys = ["device_type", "device_name", "dtype", "torch", "cuda", "hip", "looptune"]
    if env["device_type"] == "cpu":
        keys += ["threads", "cpu_affinity"]
    return {k: env.get(k) for k in keys}
