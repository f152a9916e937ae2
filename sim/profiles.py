"""GPU board profiles for the simulator: the static facts a real board reports through NVML.

Every value comes from the `nvidia-smi -q` captures in tests/fixtures/nvidia-smi/ (copied from
nvidia_gpu_exporter's captures, MIT) unless its comment says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import pynvml

_MIB = 1024 * 1024

# NVML functions that answer NVML_ERROR_NOT_SUPPORTED on Hopper SXM boards: the captures print
# "Fan Speed : N/A" (liquid/chassis cooled, no board fan) and "Retired Pages ... : N/A" (Hopper
# replaced page retirement by row remapping).
_HOPPER_NOT_SUPPORTED = frozenset(
    {
        "nvmlDeviceGetFanSpeed",
        "nvmlDeviceGetRetiredPages",
        "nvmlDeviceGetRetiredPagesPendingStatus",
    }
)

# The field-value twins of what a Hopper board reports N/A: page retirement counts and status.
_HOPPER_FIELDS_NOT_SUPPORTED = frozenset(
    {
        pynvml.NVML_FI_DEV_RETIRED_SBE,
        pynvml.NVML_FI_DEV_RETIRED_DBE,
        pynvml.NVML_FI_DEV_RETIRED_PENDING,
        pynvml.NVML_FI_DEV_RETIRED_PENDING_SBE,
        pynvml.NVML_FI_DEV_RETIRED_PENDING_DBE,
    }
)

# NVLink 4 (Hopper) keeps per-link replay, recovery, flit-CRC and ECC counters but no data-CRC
# counter: `nvidia-smi nvlink -e` on Hopper lists replay/recovery/CRC(flit)/ECC (the set
# DataDog/datadog-agent#55966 reads per link), and DCGM reports the data-CRC total as
# not supported on H100 HGX (NVIDIA/DCGM#173).
_HOPPER_NVLINK_COUNTERS_NOT_SUPPORTED = frozenset({"crc_data"})


@dataclass(frozen=True)
class GpuProfile:
    """What one GPU model reports; units are in the names, NVML's own units where NVML has them."""

    model: str  # short key used by SimNode(model=...)
    name: str  # nvmlDeviceGetName
    capture: str  # the capture file these values come from
    memory_total_bytes: int
    memory_reserved_bytes: int  # driver bookkeeping, reported by nvmlDeviceGetMemoryInfo v2
    power_limit_watts: float  # enforced = default = max limit on these boards
    power_min_limit_watts: float
    power_idle_watts: float  # P0 with no work (idle capture)
    power_load_watts: float  # average draw under the capture's gpu-burn load
    sm_clock_max_mhz: int
    sm_clock_idle_mhz: int
    mem_clock_max_mhz: int
    video_clock_max_mhz: int
    video_clock_idle_mhz: int
    # nvmlDeviceGetTemperatureThreshold answers absolute degrees; see the comment on each profile.
    temp_shutdown_celsius: int
    temp_slowdown_celsius: int
    temp_gpu_max_celsius: int
    temp_mem_max_celsius: int
    temp_idle_celsius: int
    temp_load_celsius: int
    # How much cooler the HBM runs than the GPU core under load (core minus memory temperature).
    mem_temp_below_gpu_celsius: int
    mem_util_load_percent: int
    pcie_link_gen_max: int
    pcie_link_width_max: int
    pcie_device_id: int  # nvmlPciInfo_t.pciDeviceId (device << 16 | vendor)
    pcie_subsystem_id: int
    nvlink_links: int  # `nvidia-smi nvlink -s` lists links 0..17 on both boards
    clock_event_reasons_supported: int  # clocks_event_reasons.supported
    not_supported: frozenset[str] = _HOPPER_NOT_SUPPORTED  # NVML functions answering NOT_SUPPORTED
    fields_not_supported: frozenset[int] = _HOPPER_FIELDS_NOT_SUPPORTED  # NVML_FI_* ids likewise
    # Per-link nvmlDeviceGetNvLinkErrorCounter counters (node.NVLINK_COUNTERS names) the links lack.
    nvlink_counters_not_supported: frozenset[str] = _HOPPER_NVLINK_COUNTERS_NOT_SUPPORTED
    # The legacy all-lane totals (NVML_FI_DEV_NVLINK_*_ERROR_COUNT_TOTAL) answer SUCCESS with 0 on
    # Hopper whatever the links saw; nvidia-smi reads the per-link counters instead
    # (DataDog/datadog-agent#55966). False: they sum the per-link counters, as on older boards.
    nvlink_legacy_totals_read_zero: bool = True

    @property
    def power_limit_milliwatts(self) -> int:
        return round(self.power_limit_watts * 1000)


# From linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt (driver 590.48.01, CUDA 13.1).
# Driver 590 prints thresholds relative to T.Limit: at idle "GPU Current Temp 41 C" with
# "T.Limit Temp 46 C" puts max operating at 87 C, and "Slowdown T.Limit -2 C" at 89 C. The
# shutdown value NVML returns is absolute (92 C, as older drivers print it for the same H100/H800
# board); the capture's "Shutdown T.Limit -8 C" is on the hotter T.Limit sensor's scale.
H100_80GB_HBM3 = GpuProfile(
    model="H100",
    name="NVIDIA H100 80GB HBM3",
    capture="linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt",
    memory_total_bytes=81559 * _MIB,
    memory_reserved_bytes=479 * _MIB,
    power_limit_watts=700.0,
    power_min_limit_watts=200.0,
    power_idle_watts=69.85,
    power_load_watts=631.95,
    sm_clock_max_mhz=1980,
    sm_clock_idle_mhz=345,
    mem_clock_max_mhz=2619,
    video_clock_max_mhz=1545,
    video_clock_idle_mhz=765,
    temp_shutdown_celsius=92,
    temp_slowdown_celsius=89,
    temp_gpu_max_celsius=87,
    temp_mem_max_celsius=95,
    temp_idle_celsius=41,
    temp_load_celsius=59,
    mem_temp_below_gpu_celsius=5,
    mem_util_load_percent=10,
    pcie_link_gen_max=5,
    pcie_link_width_max=16,
    pcie_device_id=0x233010DE,
    pcie_subsystem_id=0x16C110DE,
    nvlink_links=18,
    clock_event_reasons_supported=0x1FF,
)

# From linux-x86_64__nvidia-h200__590.48.01.txt (driver 590.48.01, CUDA 13.1). Same T.Limit
# arithmetic as the H100 (28 C + 59 C margin = 87 C max operating, slowdown 2 C above it).
H200 = GpuProfile(
    model="H200",
    name="NVIDIA H200",
    capture="linux-x86_64__nvidia-h200__590.48.01.txt",
    memory_total_bytes=143771 * _MIB,
    memory_reserved_bytes=614 * _MIB,
    power_limit_watts=700.0,
    power_min_limit_watts=200.0,
    power_idle_watts=77.71,
    power_load_watts=627.40,
    sm_clock_max_mhz=1980,
    sm_clock_idle_mhz=345,
    mem_clock_max_mhz=3201,
    video_clock_max_mhz=1545,
    video_clock_idle_mhz=765,
    temp_shutdown_celsius=92,
    temp_slowdown_celsius=89,
    temp_gpu_max_celsius=87,
    temp_mem_max_celsius=95,
    temp_idle_celsius=28,
    temp_load_celsius=52,
    mem_temp_below_gpu_celsius=11,
    mem_util_load_percent=8,
    pcie_link_gen_max=5,
    pcie_link_width_max=16,
    pcie_device_id=0x233510DE,
    pcie_subsystem_id=0x18BE10DE,
    nvlink_links=18,
    clock_event_reasons_supported=0x1FF,
)

PROFILES: dict[str, GpuProfile] = {p.model: p for p in (H100_80GB_HBM3, H200)}


def profile_for(model: str) -> GpuProfile:
    """The profile for a model key ("H100", "h200") or its NVML name ("NVIDIA H200")."""
    wanted = model.strip().lower()
    for profile in PROFILES.values():
        if wanted in (profile.model.lower(), profile.name.lower()):
            return profile
    raise ValueError(f"unknown GPU model {model!r}; known: {', '.join(PROFILES)}")
