"""Loading the golden vectors produced by the official ProxyGML code.

``tests/data/proxygml_public.npz`` is always used; set ``PROXYGML_GOLDEN_FILES`` to a
``os.pathsep``-separated list of more files with the same layout to check them too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pml_proxygml import ProxyGMLLoss

PUBLIC_FILE = Path(__file__).parent / "data" / "proxygml_public.npz"


def golden_files() -> list[Path]:
    extra = os.environ.get("PROXYGML_GOLDEN_FILES", "")
    return [PUBLIC_FILE] + [Path(p) for p in extra.split(os.pathsep) if p]


def load_cases() -> list[dict]:
    cases = []
    for path in golden_files():
        archive = np.load(path)
        for name in archive["config_names"]:
            prefix = f"{name}/"
            case = {
                key[len(prefix) :]: archive[key] for key in archive.files if key.startswith(prefix)
            }
            case["name"] = f"{path.stem}:{name}"
            cases.append(case)
    return cases


CASES = load_cases()
CASE_IDS = [case["name"] for case in CASES]


def tensor(case: dict, field: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(case[field]).to(dtype)


def loss_for_case(case: dict, dtype: torch.dtype = torch.float64, **kwargs) -> ProxyGMLLoss:
    """A ProxyGMLLoss configured as the case, holding the case's proxies (rows = columns)."""
    loss = ProxyGMLLoss(
        num_classes=int(case["C"]),
        embedding_size=int(case["dim"]),
        proxies_per_class=int(case["N"]),
        r=float(case["r"]),
        weight_lambda=float(case["weight_lambda"]),
        **kwargs,
    ).to(dtype)
    with torch.no_grad():
        loss.proxies.copy_(tensor(case, "proxies", dtype).T)
    return loss
