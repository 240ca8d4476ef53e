"""What this process can tell about its GPU and its peers' GPUs, for the CUDA IPC all-reduce's predicate
(tp_kernels.comm.ipc_plan.group_fallback_reason): PCI addresses, peer access, and NVLink.

NVLink is asked of NVML (the driver's management library, libnvidia-ml.so.1, present wherever the driver
is) through ctypes: nvmlDeviceGetP2PStatus(.., NVML_P2P_CAPS_INDEX_NVLINK) answers for a pair of GPUs,
NVSwitch systems included. Without NVML the answer is None (unknown).
"""
from __future__ import annotations

import ctypes
from typing import List, Optional, Sequence

import torch

# nvml.h: nvmlGpuP2PCapsIndex_t NVML_P2P_CAPS_INDEX_NVLINK, nvmlGpuP2PStatus_t NVML_P2P_STATUS_OK, NVML_SUCCESS
_NVML_P2P_CAPS_INDEX_NVLINK = 2
_NVML_P2P_STATUS_OK = 0
_NVML_SUCCESS = 0
NVML_LIBRARY = "libnvidia-ml.so.1"


def pci_id(device_index: int) -> str:
    """domain:bus:device of a visible GPU, the same string in every process whatever CUDA_VISIBLE_DEVICES."""
    props = torch.cuda.get_device_properties(device_index)
    return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}"


def peer_access_row(my_device: Optional[int], peer_pci_ids: Sequence[Optional[str]]) -> List[bool]:
    """Whether this rank's GPU can reach each rank's GPU. A peer GPU this process cannot see (another
    CUDA_VISIBLE_DEVICES) cannot be mapped, so it counts as unreachable."""
    if my_device is None:
        return [False] * len(peer_pci_ids)
    local = {pci_id(i): i for i in range(torch.cuda.device_count())}
    row = []
    for pci in peer_pci_ids:
        peer_device = local.get(pci) if pci is not None else None
        if peer_device is None:
            row.append(False)
        elif peer_device == my_device:
            row.append(True)  # itself, or a rank sharing this GPU (ipc_plan.group_fallback_reason decides)
        else:
            row.append(bool(torch.cuda.can_device_access_peer(my_device, peer_device)))
    return row


def nvlink_row(my_pci: Optional[str], peer_pci_ids: Sequence[Optional[str]],
               library: str = NVML_LIBRARY) -> List[Optional[bool]]:
    """Whether this rank's GPU reaches each rank's GPU over NVLink (True on the same GPU); None where NVML
    cannot tell (no NVML, an unknown GPU)."""
    if my_pci is None:
        return [None] * len(peer_pci_ids)
    try:
        nvml = ctypes.CDLL(library)
    except OSError:
        nvml = None
    if nvml is None or nvml.nvmlInit_v2() != _NVML_SUCCESS:
        return [None if pci != my_pci else True for pci in peer_pci_ids]
    try:
        mine = _nvml_device(nvml, my_pci)
        row: List[Optional[bool]] = []
        for pci in peer_pci_ids:
            if pci == my_pci:
                row.append(True)
                continue
            peer = _nvml_device(nvml, pci) if pci is not None else None
            status = ctypes.c_int(-1)
            if mine is None or peer is None or nvml.nvmlDeviceGetP2PStatus(
                    mine, peer, _NVML_P2P_CAPS_INDEX_NVLINK, ctypes.byref(status)) != _NVML_SUCCESS:
                row.append(None)
            else:
                row.append(status.value == _NVML_P2P_STATUS_OK)
        return row
    finally:
        nvml.nvmlShutdown()


def _nvml_device(nvml, pci: str) -> Optional[ctypes.c_void_p]:
    handle = ctypes.c_void_p()
    # NVML takes "domain:bus:device.function"; a GPU is function 0
    if nvml.nvmlDeviceGetHandleByPciBusId_v2(f"{pci}.0".encode(), ctypes.byref(handle)) != _NVML_SUCCESS:
        return None
    return handle
