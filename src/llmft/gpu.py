"""Can the installed torch use this machine's GPU? The train stage's driver check and `make doctor`'s facts.

    from llmft.gpu import check_driver
    check_driver(log)   # raises UserError when torch's CUDA build is newer than the NVIDIA driver

PyPI's torch 2.11 is built for CUDA 13.0, which needs driver >= 580. On an older driver, torch.cuda.is_available()
is False with only a warning, and training would go on in fp32 on the CPU, for hours, unnoticed.
"""

from __future__ import annotations

import logging
import os

from llmft.common import UserError
from llmft.torch_build import BY_TAG, CUDA12_MINOR_COMPAT, PYPI_BUILD, Smi, Unsupported, choose, query_smi, vtext


def needed_driver(cuda: str) -> tuple[int, ...]:
    """The oldest Linux driver that runs a torch built for CUDA `cuda` (torch.version.cuda, e.g. "12.8").

    CUDA minor version compatibility (NVIDIA's release notes, Table 2): any 12.x build runs from the 12.0 GA driver
    on, any 13.x build from the 13.0 GA driver on.
    """
    return BY_TAG[PYPI_BUILD].min_driver if int(cuda.split(".")[0]) >= 13 else CUDA12_MINOR_COMPAT


def gpu_names(smi: Smi) -> str:
    names = [name for name, _ in smi.gpus or []]
    return ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))


def driver_problem(smi: Smi | None = None) -> tuple[str, bool] | None:
    """Why torch sees no GPU although nvidia-smi shows one, and whether that is the driver (fatal for training).

    None when torch sees the GPU, or there is none to see. Only a CUDA build of torch is checked: a CPU build
    (make setup TORCH_CUDA=cpu) on a GPU machine is a choice.
    """
    import torch

    if torch.version.cuda is None or torch.cuda.is_available():
        return None
    smi = smi or query_smi()
    if smi.problem:  # no nvidia-smi, or it cannot reach a driver: a CPU machine as far as anyone can tell
        return None
    need = needed_driver(torch.version.cuda)
    if smi.driver < need:
        try:
            fix = f"run `make setup TORCH_CUDA={choose('auto', smi)[0]}` (torch built for a CUDA this driver runs)"
        except Unsupported as e:
            fix = str(e)
        return (
            f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which needs NVIDIA driver >= "
            f"{vtext(need)}, but this machine's driver is {smi.driver_text} ({gpu_names(smi)}), so torch sees no "
            f"GPU and would train on the CPU: {fix}, or update the driver"
        ), True
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        f"nvidia-smi shows {gpu_names(smi)} (driver {smi.driver_text}, new enough for CUDA {torch.version.cuda}) "
        "but torch sees no GPU: "
        + (
            f"CUDA_VISIBLE_DEVICES={hidden!r} hides it"
            if hidden is not None
            else "can this process open /dev/nvidia* (in a container: --gpus all)?"
        )
    ), False


def check_driver(log: logging.Logger | None = None) -> str | None:
    """Before training: stop when the NVIDIA driver is too old for torch's CUDA; a warning when the GPU is hidden.

    Returns:
        The warning (also logged to `log`) when nvidia-smi shows a GPU that torch does not see for another reason.
    Raises:
        UserError: one line with the driver, the CUDA version torch needs and the `make setup TORCH_CUDA=...` fix.
    """
    found = driver_problem()
    if found and found[1]:
        raise UserError(found[0])
    if found and log:
        log.warning(found[0])
    return found[0] if found else None
