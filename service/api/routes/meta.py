"""``/choices``: what a SearchSpec may hold, for forms and clients (the dashboard's new-search
form is built from it, so it never lists a value the server would refuse)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from search.backbones import BACKBONES
from search.catalogue import backbone_info
from search.knobs import ARRANGEMENTS, KERNEL_SIZES, POOL_TYPES, SPATIAL_POOLS
from search.space import BLOCK_CHOICES
from search.spec import DATASETS, EARLY_STOPPING, OVERHEADS, SAMPLERS, SearchSpec
from service.api.deps import AppSettings, Reader
from service.api.schemas import Out

router = APIRouter(tags=["searches"], dependencies=[Reader])


class BackboneOut(Out):
    family: str
    stages: list[int]
    stage_channels: list[int] = Field(description="The channels attention sees per stage.")
    input_size: int = Field(description="The image side the backbone is designed for.")


class ChoicesOut(Out):
    """The values each field of a SearchSpec allows (the published SearchSpec schema says the
    same with bounds), the backbones' stages, the defaults and the server's trial limit."""

    backbones: dict[str, BackboneOut]
    datasets: list[str]
    arrangements: list[str]
    pool_types: list[str]
    kernel_sizes: list[int]
    spatial_pools: list[str]
    blocks: list[str]
    overheads: list[str]
    samplers: list[str]
    early_stopping: list[str]
    max_trials: int
    defaults: dict[str, Any] = Field(description="A SearchSpec with every default.")


class BackboneSlotsOut(Out):
    """A backbone's attention slots: for a timm or torchvision model, as found by building it."""

    name: str
    family: str = Field(
        description="Ours: cifar_resnet, resnet, mobilenet_v1; a library "
        "model's: library:ModelClass, e.g. timm:ResNet."
    )
    stages: list[int]
    blocks_per_stage: list[int]
    stage_channels: list[int] = Field(description="The channels attention sees per stage.")
    block_channels: list[list[int]] = Field(
        description="The channels the attention of each block sees, per stage."
    )
    slots: int = Field(description="Blocks that can hold attention.")
    input_size: int = Field(description="The image side the backbone is designed for.")


@router.get("/backbones/{name}")
def backbone(name: str) -> BackboneSlotsOut:
    """A backbone's stages, blocks and channels: one of ours, or a timm or torchvision model
    (``timm:resnet50``), as a spec's ``space.stages`` may name them. 422 names what is accepted
    (for a library model without blocks cbam-nas can place into, the supported families)."""
    return BackboneSlotsOut.model_validate(backbone_info(name).to_dict())


@router.get("/choices")
def choices(settings: AppSettings) -> ChoicesOut:
    """Allowed values of the spec's fields, the backbones' stages, the defaults and the
    server's trial limit."""
    return ChoicesOut.model_validate(
        {
            "backbones": {
                name: {
                    "family": info.family,
                    "stages": list(info.stages),
                    "stage_channels": list(info.stage_channels),
                    "input_size": info.input_size,
                }
                for name, info in sorted(BACKBONES.items())
            },
            "datasets": list(DATASETS),
            "arrangements": list(ARRANGEMENTS),
            "pool_types": list(POOL_TYPES),
            "kernel_sizes": list(KERNEL_SIZES),
            "spatial_pools": list(SPATIAL_POOLS),
            "blocks": list(BLOCK_CHOICES),
            "overheads": list(OVERHEADS),
            "samplers": list(SAMPLERS),
            "early_stopping": list(EARLY_STOPPING),
            "max_trials": settings.max_trials_per_search,
            "defaults": SearchSpec().to_dict(),
        }
    )
