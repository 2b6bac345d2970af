"""Accelerator table for ``nanoseek estimate``: peak FLOP/s, HBM, NVLink and network per GPU.

Every figure is a *dense* (no 2:4 sparsity) per-GPU peak from the vendor's public datasheet, or,
where no datasheet exists (H20), from the figures NVIDIA gave partners as widely reported; the
source is on the line above each entry. NVIDIA quotes NVLink as the total of both directions
(900 GB/s on an H100 is 450 GB/s each way); we store the quoted figure and use half of it for
transfer times. ``network_gb_s`` is the scale-out NIC per GPU, one direction, in GB/s
(a 400 Gb/s InfiniBand NDR port is 50 GB/s).

The H800 is the case that motivated this table: the same die and FLOP/s as the H100 SXM, but
NVLink cut from 900 to 400 GB/s. DeepSeek-V3's report (arXiv 2412.19437, section 3.2.2) measures
about 160 GB/s of usable NVLink and 50 GB/s of InfiniBand per H800.

Other accelerators come from ``--gpu-spec FILE`` (JSON or TOML with the same field names).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class GPUSpecError(ValueError):
    """An unknown GPU name or a malformed ``--gpu-spec`` file."""


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_tflops: float            # dense BF16 tensor-core peak, TFLOP/s
    fp8_tflops: float | None      # dense FP8 tensor-core peak, TFLOP/s; None: no FP8 tensor cores
    hbm_gb: float                 # HBM capacity, GB (1e9 bytes)
    hbm_tb_s: float               # HBM bandwidth, TB/s
    nvlink_gb_s: float            # NVLink, GB/s, both directions added (as NVIDIA quotes it)
    network_gb_s: float           # scale-out network per GPU, GB/s, one direction
    gpus_per_node: int = 8        # GPUs sharing one NVLink domain
    source: str = ""

    @property
    def bf16_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def fp8_flops(self) -> float | None:
        return None if self.fp8_tflops is None else self.fp8_tflops * 1e12

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 1e9

    @property
    def hbm_bytes_s(self) -> float:
        return self.hbm_tb_s * 1e12

    @property
    def nvlink_bytes_s_per_direction(self) -> float:
        return self.nvlink_gb_s / 2 * 1e9

    @property
    def network_bytes_s(self) -> float:
        return self.network_gb_s * 1e9


GPUS: dict[str, GPUSpec] = {
    # NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): BF16 312 TFLOPS dense (624 sparse),
    # no FP8, 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s. DGX A100 datasheet: 8x 200 Gb/s HDR IB.
    "a100": GPUSpec("A100 SXM4 80GB", 312.0, None, 80, 2.039, 600, 25,
                    source="NVIDIA A100 datasheet; DGX A100 datasheet"),
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): BF16 1,979 and FP8 3,958 TFLOPS *with
    # sparsity*, i.e. 989.5 / 1,979 dense; 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s.
    # DGX H100 datasheet: 8x 400 Gb/s ConnectX-7 (NDR) for the compute fabric.
    "h100": GPUSpec("H100 SXM5 80GB", 989.5, 1979.0, 80, 3.35, 900, 50,
                    source="NVIDIA H100 datasheet; DGX H100 datasheet"),
    # NVIDIA H800 SXM5: the H100 SXM die and tensor FLOP/s with NVLink limited to 400 GB/s
    # (NVIDIA H800 product brief). DeepSeek-V3 report sec. 3.2.2: 50 GB/s InfiniBand per GPU,
    # about 160 GB/s achievable NVLink.
    "h800": GPUSpec("H800 SXM5 80GB", 989.5, 1979.0, 80, 3.35, 400, 50,
                    source="NVIDIA H800 product brief; DeepSeek-V3 report (arXiv 2412.19437) 3.2.2"),
    # NVIDIA H20 (China export part, no public NVIDIA datasheet): BF16 148 and FP8 296 TFLOPS
    # dense, 96 GB HBM3 at 4.0 TB/s, NVLink 900 GB/s, as reported from NVIDIA's partner spec.
    "h20": GPUSpec("H20 96GB", 148.0, 296.0, 96, 4.0, 900, 50,
                   source="NVIDIA H20 partner specification as publicly reported (no datasheet)"),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): same tensor FLOP/s as H100 SXM
    # (1,979 / 3,958 sparse), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    "h200": GPUSpec("H200 SXM 141GB", 989.5, 1979.0, 141, 4.8, 900, 50,
                    source="NVIDIA H200 datasheet"),
    # NVIDIA DGX B200 datasheet (8 GPUs): 72 PFLOPS FP8 training with sparsity -> 4.5 PFLOPS FP8,
    # 2.25 PFLOPS BF16 dense per GPU; 1,440 GB HBM3e at 64 TB/s -> 180 GB at 8 TB/s per GPU;
    # NVLink 5 at 1.8 TB/s per GPU; 8x 400 Gb/s ConnectX-7 for the compute fabric.
    "b200": GPUSpec("B200 180GB", 2250.0, 4500.0, 180, 8.0, 1800, 50,
                    source="NVIDIA DGX B200 datasheet; HGX B200 specifications"),
}


def gpu_names() -> list[str]:
    return list(GPUS)


def get_gpu(name: str) -> GPUSpec:
    """A built-in accelerator by (case-insensitive) name; the error lists the valid names."""
    key = name.strip().lower().replace("-", "").replace(" ", "")
    if key not in GPUS:
        raise GPUSpecError(f"unknown GPU '{name}'. Built-in GPUs: {', '.join(GPUS)} "
                           f"(or describe another with --gpu-spec FILE.json|FILE.toml)")
    return GPUS[key]


_REQUIRED = ("name", "bf16_tflops", "hbm_gb", "hbm_tb_s", "nvlink_gb_s", "network_gb_s")


def gpu_spec_from_dict(d: dict[str, Any], source: str = "gpu spec") -> GPUSpec:
    """Validate a user GPU description; unknown, missing or non-positive fields are named."""
    if not isinstance(d, dict):
        raise GPUSpecError(f"{source}: expected a JSON object / TOML table, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(GPUSpec)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise GPUSpecError(f"{source}: unknown field(s) {unknown}. Valid fields: {', '.join(fields)}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise GPUSpecError(f"{source}: missing field(s) {missing}. Required: {', '.join(_REQUIRED)}")
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key in ("name", "source"):
            if not isinstance(value, str):
                raise GPUSpecError(f"{source}: field '{key}' must be a string, got {value!r}")
            out[key] = value
        elif key == "fp8_tflops" and value is None:
            out[key] = None
        elif key == "gpus_per_node":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GPUSpecError(f"{source}: field 'gpus_per_node' must be an integer >= 1, got {value!r}")
            out[key] = value
        else:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise GPUSpecError(f"{source}: field '{key}' must be a positive number, got {value!r}")
            out[key] = float(value)
    out.setdefault("fp8_tflops", None)        # optional: no FP8 tensor cores
    out.setdefault("source", source)
    return GPUSpec(**out)


def load_gpu_spec(path: str | Path) -> GPUSpec:
    """Read a GPU description from ``.json`` or ``.toml``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GPUSpecError(f"{path}: no such file") from None
    if path.suffix.lower() == ".toml":
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise GPUSpecError(f"{path}: invalid TOML: {e}") from None
    elif path.suffix.lower() == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise GPUSpecError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    else:
        raise GPUSpecError(f"{path}: a GPU spec must be a .json or .toml file")
    return gpu_spec_from_dict(d, source=str(path))
