"""megablocks (Gale et al. 2023, arXiv:2211.15841) as a compute backend: our routers decide,
megablocks' dropless grouped kernels compute. GPU only; imported lazily so that the base
install never needs it.
"""

from __future__ import annotations

import torch

from .experts import ExpertBank
from .routing import Routing


def require_megablocks() -> None:
    """Raise a clear error unless CUDA and the megablocks package are both available."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "backend='megablocks' needs a CUDA device, and torch.cuda.is_available() is False; "
            "use backend 'grouped' on CPU"
        )
    try:
        import megablocks  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "backend='megablocks' needs the megablocks package: "
            "pip install --no-deps megablocks==0.10.0 (see the 'gpu' extra)"
        ) from err


def megablocks_forward(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    require_megablocks()
    raise NotImplementedError("the megablocks backend is not built yet (issue 8)")
