"""The domain of cbam-nas: attention modules, backbones, the search space and overhead metrics.

``from search import load_model`` loads a downloaded model bundle (:mod:`search.bundle`);
imported on first use, so that ``import search.<module>`` does not pull in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from search.bundle import load_model

        return load_model
    raise AttributeError(f"module 'search' has no attribute {name!r}")
