from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GpuInfo(_message.Message):
    __slots__ = ("index", "uuid", "name", "pci_bus_id", "serial", "memory_total_bytes", "driver_version", "cuda_version", "power_limit_watts", "sm_clock_max_mhz", "mem_clock_max_mhz")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEM_CLOCK_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    serial: str
    memory_total_bytes: int
    driver_version: str
    cuda_version: str
    power_limit_watts: float
    sm_clock_max_mhz: float
    mem_clock_max_mhz: float
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., serial: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., driver_version: _Optional[str] = ..., cuda_version: _Optional[str] = ..., power_limit_watts: _Optional[float] = ..., sm_clock_max_mhz: _Optional[float] = ..., mem_clock_max_mhz: _Optional[float] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node", "boot_id", "agent_version", "gpus", "sampling_interval_seconds", "t", "nvml_available", "batch_interval_seconds")
    NODE_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    NVML_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    BATCH_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node: str
    boot_id: str
    agent_version: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    sampling_interval_seconds: float
    t: float
    nvml_available: bool
    batch_interval_seconds: float
    def __init__(self, node: _Optional[str] = ..., boot_id: _Optional[str] = ..., agent_version: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., sampling_interval_seconds: _Optional[float] = ..., t: _Optional[float] = ..., nvml_available: _Optional[bool] = ..., batch_interval_seconds: _Optional[float] = ...) -> None: ...

class GpuMetrics(_message.Message):
    __slots__ = ("gpu_util_percent", "mem_util_percent", "mem_used_bytes", "mem_total_bytes", "temp_gpu_celsius", "temp_mem_celsius", "temp_slowdown_celsius", "power_watts", "power_limit_watts", "energy_joules", "sm_clock_mhz", "sm_clock_max_mhz", "mem_clock_mhz", "clock_event_reasons", "fan_percent", "pcie_replay_total", "pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second", "pcie_link_gen", "pcie_link_gen_max", "pcie_link_width", "pcie_link_width_max", "ecc_sbe_volatile_total", "ecc_dbe_volatile_total", "ecc_sbe_aggregate_total", "ecc_dbe_aggregate_total", "retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending", "remapped_rows_correctable", "remapped_rows_uncorrectable", "remap_pending", "remap_failure", "nvlink_links_up", "nvlink_links_total", "nvlink_crc_flit_errors_total", "nvlink_crc_data_errors_total", "nvlink_replay_errors_total", "nvlink_recovery_errors_total", "temp_shutdown_celsius", "graphics_active_percent", "sm_active_percent", "sm_occupancy_percent", "tensor_active_percent", "dram_active_percent", "fp64_active_percent", "fp32_active_percent", "fp16_active_percent", "nvlink_tx_bytes_per_second", "nvlink_rx_bytes_per_second")
    GPU_UTIL_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEM_UTIL_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEMP_GPU_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    TEMP_MEM_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    TEMP_SLOWDOWN_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    POWER_WATTS_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    CLOCK_EVENT_REASONS_FIELD_NUMBER: _ClassVar[int]
    FAN_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PCIE_REPLAY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PCIE_TX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PCIE_RX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PCIE_LINK_GEN_FIELD_NUMBER: _ClassVar[int]
    PCIE_LINK_GEN_MAX_FIELD_NUMBER: _ClassVar[int]
    PCIE_LINK_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PCIE_LINK_WIDTH_MAX_FIELD_NUMBER: _ClassVar[int]
    ECC_SBE_VOLATILE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ECC_DBE_VOLATILE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ECC_SBE_AGGREGATE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ECC_DBE_AGGREGATE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RETIRED_PAGES_SBE_FIELD_NUMBER: _ClassVar[int]
    RETIRED_PAGES_DBE_FIELD_NUMBER: _ClassVar[int]
    RETIRED_PAGES_PENDING_FIELD_NUMBER: _ClassVar[int]
    REMAPPED_ROWS_CORRECTABLE_FIELD_NUMBER: _ClassVar[int]
    REMAPPED_ROWS_UNCORRECTABLE_FIELD_NUMBER: _ClassVar[int]
    REMAP_PENDING_FIELD_NUMBER: _ClassVar[int]
    REMAP_FAILURE_FIELD_NUMBER: _ClassVar[int]
    NVLINK_LINKS_UP_FIELD_NUMBER: _ClassVar[int]
    NVLINK_LINKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NVLINK_CRC_FLIT_ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NVLINK_CRC_DATA_ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NVLINK_REPLAY_ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NVLINK_RECOVERY_ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TEMP_SHUTDOWN_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    GRAPHICS_ACTIVE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SM_ACTIVE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SM_OCCUPANCY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_ACTIVE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DRAM_ACTIVE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    FP64_ACTIVE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    FP32_ACTIVE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    FP16_ACTIVE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    NVLINK_TX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    NVLINK_RX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    gpu_util_percent: float
    mem_util_percent: float
    mem_used_bytes: int
    mem_total_bytes: int
    temp_gpu_celsius: float
    temp_mem_celsius: float
    temp_slowdown_celsius: float
    power_watts: float
    power_limit_watts: float
    energy_joules: float
    sm_clock_mhz: float
    sm_clock_max_mhz: float
    mem_clock_mhz: float
    clock_event_reasons: int
    fan_percent: float
    pcie_replay_total: int
    pcie_tx_bytes_per_second: float
    pcie_rx_bytes_per_second: float
    pcie_link_gen: int
    pcie_link_gen_max: int
    pcie_link_width: int
    pcie_link_width_max: int
    ecc_sbe_volatile_total: int
    ecc_dbe_volatile_total: int
    ecc_sbe_aggregate_total: int
    ecc_dbe_aggregate_total: int
    retired_pages_sbe: int
    retired_pages_dbe: int
    retired_pages_pending: int
    remapped_rows_correctable: int
    remapped_rows_uncorrectable: int
    remap_pending: int
    remap_failure: int
    nvlink_links_up: int
    nvlink_links_total: int
    nvlink_crc_flit_errors_total: int
    nvlink_crc_data_errors_total: int
    nvlink_replay_errors_total: int
    nvlink_recovery_errors_total: int
    temp_shutdown_celsius: float
    graphics_active_percent: float
    sm_active_percent: float
    sm_occupancy_percent: float
    tensor_active_percent: float
    dram_active_percent: float
    fp64_active_percent: float
    fp32_active_percent: float
    fp16_active_percent: float
    nvlink_tx_bytes_per_second: float
    nvlink_rx_bytes_per_second: float
    def __init__(self, gpu_util_percent: _Optional[float] = ..., mem_util_percent: _Optional[float] = ..., mem_used_bytes: _Optional[int] = ..., mem_total_bytes: _Optional[int] = ..., temp_gpu_celsius: _Optional[float] = ..., temp_mem_celsius: _Optional[float] = ..., temp_slowdown_celsius: _Optional[float] = ..., power_watts: _Optional[float] = ..., power_limit_watts: _Optional[float] = ..., energy_joules: _Optional[float] = ..., sm_clock_mhz: _Optional[float] = ..., sm_clock_max_mhz: _Optional[float] = ..., mem_clock_mhz: _Optional[float] = ..., clock_event_reasons: _Optional[int] = ..., fan_percent: _Optional[float] = ..., pcie_replay_total: _Optional[int] = ..., pcie_tx_bytes_per_second: _Optional[float] = ..., pcie_rx_bytes_per_second: _Optional[float] = ..., pcie_link_gen: _Optional[int] = ..., pcie_link_gen_max: _Optional[int] = ..., pcie_link_width: _Optional[int] = ..., pcie_link_width_max: _Optional[int] = ..., ecc_sbe_volatile_total: _Optional[int] = ..., ecc_dbe_volatile_total: _Optional[int] = ..., ecc_sbe_aggregate_total: _Optional[int] = ..., ecc_dbe_aggregate_total: _Optional[int] = ..., retired_pages_sbe: _Optional[int] = ..., retired_pages_dbe: _Optional[int] = ..., retired_pages_pending: _Optional[int] = ..., remapped_rows_correctable: _Optional[int] = ..., remapped_rows_uncorrectable: _Optional[int] = ..., remap_pending: _Optional[int] = ..., remap_failure: _Optional[int] = ..., nvlink_links_up: _Optional[int] = ..., nvlink_links_total: _Optional[int] = ..., nvlink_crc_flit_errors_total: _Optional[int] = ..., nvlink_crc_data_errors_total: _Optional[int] = ..., nvlink_replay_errors_total: _Optional[int] = ..., nvlink_recovery_errors_total: _Optional[int] = ..., temp_shutdown_celsius: _Optional[float] = ..., graphics_active_percent: _Optional[float] = ..., sm_active_percent: _Optional[float] = ..., sm_occupancy_percent: _Optional[float] = ..., tensor_active_percent: _Optional[float] = ..., dram_active_percent: _Optional[float] = ..., fp64_active_percent: _Optional[float] = ..., fp32_active_percent: _Optional[float] = ..., fp16_active_percent: _Optional[float] = ..., nvlink_tx_bytes_per_second: _Optional[float] = ..., nvlink_rx_bytes_per_second: _Optional[float] = ...) -> None: ...

class GpuSample(_message.Message):
    __slots__ = ("gpu", "t", "metrics", "uuid", "job", "rank", "k8s_namespace", "k8s_pod", "k8s_container")
    GPU_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    K8S_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    K8S_POD_FIELD_NUMBER: _ClassVar[int]
    K8S_CONTAINER_FIELD_NUMBER: _ClassVar[int]
    gpu: int
    t: float
    metrics: GpuMetrics
    uuid: str
    job: str
    rank: int
    k8s_namespace: str
    k8s_pod: str
    k8s_container: str
    def __init__(self, gpu: _Optional[int] = ..., t: _Optional[float] = ..., metrics: _Optional[_Union[GpuMetrics, _Mapping]] = ..., uuid: _Optional[str] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ..., k8s_namespace: _Optional[str] = ..., k8s_pod: _Optional[str] = ..., k8s_container: _Optional[str] = ...) -> None: ...

class HostMetrics(_message.Message):
    __slots__ = ("cpu_percent", "load1", "mem_used_bytes", "mem_total_bytes", "disk_used_bytes", "disk_total_bytes", "net_rx_bytes_total", "net_tx_bytes_total")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    MEM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NET_RX_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NET_TX_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    load1: float
    mem_used_bytes: int
    mem_total_bytes: int
    disk_used_bytes: int
    disk_total_bytes: int
    net_rx_bytes_total: int
    net_tx_bytes_total: int
    def __init__(self, cpu_percent: _Optional[float] = ..., load1: _Optional[float] = ..., mem_used_bytes: _Optional[int] = ..., mem_total_bytes: _Optional[int] = ..., disk_used_bytes: _Optional[int] = ..., disk_total_bytes: _Optional[int] = ..., net_rx_bytes_total: _Optional[int] = ..., net_tx_bytes_total: _Optional[int] = ...) -> None: ...

class IbPortMetrics(_message.Message):
    __slots__ = ("device", "port", "ib_state", "ib_rate_gbps", "ib_link_downed_total", "ib_symbol_error_total", "ib_rcv_errors_total", "ib_link_error_recovery_total")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    IB_STATE_FIELD_NUMBER: _ClassVar[int]
    IB_RATE_GBPS_FIELD_NUMBER: _ClassVar[int]
    IB_LINK_DOWNED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    IB_SYMBOL_ERROR_TOTAL_FIELD_NUMBER: _ClassVar[int]
    IB_RCV_ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    IB_LINK_ERROR_RECOVERY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    device: str
    port: int
    ib_state: str
    ib_rate_gbps: float
    ib_link_downed_total: int
    ib_symbol_error_total: int
    ib_rcv_errors_total: int
    ib_link_error_recovery_total: int
    def __init__(self, device: _Optional[str] = ..., port: _Optional[int] = ..., ib_state: _Optional[str] = ..., ib_rate_gbps: _Optional[float] = ..., ib_link_downed_total: _Optional[int] = ..., ib_symbol_error_total: _Optional[int] = ..., ib_rcv_errors_total: _Optional[int] = ..., ib_link_error_recovery_total: _Optional[int] = ...) -> None: ...

class HostSample(_message.Message):
    __slots__ = ("t", "metrics", "ib_ports")
    T_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    IB_PORTS_FIELD_NUMBER: _ClassVar[int]
    t: float
    metrics: HostMetrics
    ib_ports: _containers.RepeatedCompositeFieldContainer[IbPortMetrics]
    def __init__(self, t: _Optional[float] = ..., metrics: _Optional[_Union[HostMetrics, _Mapping]] = ..., ib_ports: _Optional[_Iterable[_Union[IbPortMetrics, _Mapping]]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("t", "kind", "gpu", "uuid", "pci_bus_id", "xid", "message", "source")
    T_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    XID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    t: float
    kind: str
    gpu: int
    uuid: str
    pci_bus_id: str
    xid: int
    message: str
    source: str
    def __init__(self, t: _Optional[float] = ..., kind: _Optional[str] = ..., gpu: _Optional[int] = ..., uuid: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., xid: _Optional[int] = ..., message: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("t", "job", "rank", "step", "seconds", "gpu", "dp_rank", "pp_stage", "tp_rank", "wall_seconds")
    T_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    PP_STAGE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    t: float
    job: str
    rank: int
    step: int
    seconds: float
    gpu: int
    dp_rank: int
    pp_stage: int
    tp_rank: int
    wall_seconds: float
    def __init__(self, t: _Optional[float] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., seconds: _Optional[float] = ..., gpu: _Optional[int] = ..., dp_rank: _Optional[int] = ..., pp_stage: _Optional[int] = ..., tp_rank: _Optional[int] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class GpuColumns(_message.Message):
    __slots__ = ("t", "gpu", "label", "labels", "fields", "values")
    T_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    t: _containers.RepeatedScalarFieldContainer[float]
    gpu: _containers.RepeatedScalarFieldContainer[int]
    label: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedCompositeFieldContainer[GpuLabels]
    fields: _containers.RepeatedScalarFieldContainer[int]
    values: bytes
    def __init__(self, t: _Optional[_Iterable[float]] = ..., gpu: _Optional[_Iterable[int]] = ..., label: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[_Union[GpuLabels, _Mapping]]] = ..., fields: _Optional[_Iterable[int]] = ..., values: _Optional[bytes] = ...) -> None: ...

class GpuLabels(_message.Message):
    __slots__ = ("uuid", "job", "rank", "k8s_namespace", "k8s_pod", "k8s_container")
    UUID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    K8S_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    K8S_POD_FIELD_NUMBER: _ClassVar[int]
    K8S_CONTAINER_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    job: str
    rank: int
    k8s_namespace: str
    k8s_pod: str
    k8s_container: str
    def __init__(self, uuid: _Optional[str] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ..., k8s_namespace: _Optional[str] = ..., k8s_pod: _Optional[str] = ..., k8s_container: _Optional[str] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("seq", "t", "gpus", "host", "events", "steps", "spool_bytes", "spool_batches", "boot_id", "gpu_columns", "hosts")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    t: float
    gpus: _containers.RepeatedCompositeFieldContainer[GpuSample]
    host: HostSample
    events: _containers.RepeatedCompositeFieldContainer[Event]
    steps: _containers.RepeatedCompositeFieldContainer[StepReport]
    spool_bytes: int
    spool_batches: int
    boot_id: str
    gpu_columns: GpuColumns
    hosts: _containers.RepeatedCompositeFieldContainer[HostSample]
    def __init__(self, seq: _Optional[int] = ..., t: _Optional[float] = ..., gpus: _Optional[_Iterable[_Union[GpuSample, _Mapping]]] = ..., host: _Optional[_Union[HostSample, _Mapping]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[StepReport, _Mapping]]] = ..., spool_bytes: _Optional[int] = ..., spool_batches: _Optional[int] = ..., boot_id: _Optional[str] = ..., gpu_columns: _Optional[_Union[GpuColumns, _Mapping]] = ..., hosts: _Optional[_Iterable[_Union[HostSample, _Mapping]]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "batch")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: Batch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("last_seq", "accepts_columns")
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    accepts_columns: bool
    def __init__(self, last_seq: _Optional[int] = ..., accepts_columns: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class Settings(_message.Message):
    __slots__ = ("sampling_interval_seconds",)
    SAMPLING_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    sampling_interval_seconds: float
    def __init__(self, sampling_interval_seconds: _Optional[float] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class CollectorMessage(_message.Message):
    __slots__ = ("welcome", "ack", "settings", "drain")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    settings: Settings
    drain: Drain
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., settings: _Optional[_Union[Settings, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ...) -> None: ...
