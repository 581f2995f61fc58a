"""Every backbone a search may name, answered in one place: ours from the pure-data catalogue
(:mod:`search.backbones`, no torch), a timm or torchvision model (``timm:resnet50``) from
:mod:`search.nn.library`, which builds it on the meta device once to find its attention slots
(torch and the library are imported only then)."""

from __future__ import annotations

from typing import Any

from search.backbones import BACKBONES, BackboneInfo, catalogue_info, library_of
from search.errors import InvalidValue


def backbone_info(value: Any, field: str = "backbone") -> BackboneInfo:
    """The info of backbone ``value``; InvalidValue at ``field`` naming what is accepted."""
    if isinstance(value, str) and value not in BACKBONES and library_of(value) is not None:
        from search.nn.library import discover

        try:
            return discover(value)[0]
        except InvalidValue as exc:
            raise InvalidValue(field, value, exc.allowed) from None
    return catalogue_info(value, field)
