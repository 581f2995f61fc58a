"""Export a trained architecture to ONNX: ``export_onnx(architecture, state_dict) -> bytes``.

The model takes ``images`` (batch, channels, size, size) with a dynamic batch dimension and
returns ``logits`` (batch, classes). The architecture's canonical JSON is stored in the model's
metadata under ``"architecture"``.

Exporter: torch's default, ``torch.export``-based exporter (``dynamo=True``; the TorchScript
exporter is deprecated). CBAM runs its plain definition while being exported (``CBAM.forward``
takes it whenever ``torch.compiler.is_compiling()``), so the graph holds ordinary operators.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from search.build import INPUT_NAME, OUTPUT_NAME, build_model
from search.space import Architecture

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "export_onnx",
]

# The example batch for tracing; not 0 or 1, which torch.export would specialise on.
_EXAMPLE_BATCH = 2
_LISTED = 5  # names shown per kind of mismatch in an ExportError


class ExportError(Exception):
    """The weights do not fit the architecture, or the model could not be exported."""


def export_onnx(
    architecture: Architecture,
    state_dict: Mapping[str, Tensor],
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_size: int | None = None,
    opset: int | None = None,
) -> bytes:
    """The serialized ONNX model of ``architecture`` with ``state_dict`` loaded (eval mode).

    ``num_classes`` and ``in_channels`` default to the shapes of the weights, ``input_size`` to
    the backbone's design size, ``opset`` to the exporter's default. The result passes
    ``onnx.checker.check_model(..., full_check=True)``. Raises :class:`ExportError` when the
    weights do not fit the architecture (missing or unexpected tensors, wrong shapes), and when
    the export fails or cannot produce the requested opset.
    """
    import onnx  # here, not at the top: 0.6 s of import for every process that imports us

    info = architecture.info
    if num_classes is None:
        num_classes = _dim(architecture, state_dict, info.classifier_weight, 0, "num_classes")
    if in_channels is None:
        in_channels = _dim(architecture, state_dict, info.stem_weight, 1, "in_channels")
    if input_size is None:
        input_size = info.input_size
    if input_size < 1:
        raise ExportError(f"input_size must be at least 1, got {input_size}")

    model = build_model(architecture, num_classes, in_channels)
    _load(model, state_dict, architecture)
    model.eval()

    example = torch.zeros(_EXAMPLE_BATCH, in_channels, input_size, input_size)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except Exception as exc:
        raise ExportError(f"exporting {_label(architecture)} failed: {exc}") from exc
    proto = program.model_proto
    produced = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and produced != opset:
        # Below its own minimum the exporter tries a version conversion and, when that fails,
        # only logs it and keeps its own opset.
        raise ExportError(
            f"opset {opset} is not available for {_label(architecture)}: the exporter produced "
            f"opset {produced}"
        )
    onnx.helper.set_model_props(proto, {"architecture": architecture.to_json()})
    data = proto.SerializeToString()
    try:
        onnx.checker.check_model(data, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the ONNX model of {_label(architecture)} is invalid: {exc}") from exc
    return data


def _label(architecture: Architecture) -> str:
    return f"{architecture.backbone} with {architecture.describe()}"


def _dim(
    architecture: Architecture, state_dict: Mapping[str, Tensor], key: str, axis: int, what: str
) -> int:
    """Axis ``axis`` of ``state_dict[key]``: the default of ``what``."""
    tensor = state_dict.get(key)
    if not isinstance(tensor, Tensor) or tensor.dim() <= axis:
        raise ExportError(
            f"the weights do not fit {_label(architecture)}: no {key!r} tensor to read {what} from"
        )
    return int(tensor.shape[axis])


def _names(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown} and {len(names) - _LISTED} more"


def _load(model: nn.Module, state_dict: Mapping[str, Tensor], architecture: Architecture) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, with every mismatch in one message."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    not_tensors = [k for k in state_dict if k in expected and not isinstance(state_dict[k], Tensor)]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if isinstance(state_dict.get(k), Tensor) and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{label} {_names(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("not tensors:", not_tensors),
            ("wrong shapes:", wrong_shape),
        )
        if items
    ]
    if not problems:
        try:
            model.load_state_dict(state_dict, strict=True)
            return
        except (RuntimeError, TypeError) as exc:
            problems = [str(exc)]
    raise ExportError(f"the weights do not fit {_label(architecture)}: {'; '.join(problems)}")
