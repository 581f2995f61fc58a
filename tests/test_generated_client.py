"""A client generated from the published OpenAPI document builds valid specs.

``datamodel-code-generator`` (the well-kept generator of pydantic models from OpenAPI) turns
``/openapi.json`` into a module, as a user's client would; that module's ``SearchSpec`` then
builds specs the server accepts, refuses what the server refuses, and reads every spec the server
writes. This is the contract: the schema says all a client needs to know.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from datamodel_code_generator import DataModelType, Formatter, InputFileType, generate
from fastapi.testclient import TestClient
from pydantic import ValidationError

from search.settings import Settings
from search.spec import EXAMPLE, SearchSpec
from search.store.engine import Database
from service.app import create_app
from service.auth import create_token

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture
def api(sqlite_db: Database, settings: Settings) -> TestClient:
    client = TestClient(create_app(settings, db=sqlite_db))
    client.headers["Authorization"] = f"Bearer {create_token(sqlite_db, 'client')}"
    return client


@functools.cache
def _client_source(document: str) -> str:
    """The client module generated from ``document`` (about a second; the tests that import it
    get the same document, so it is generated once per process)."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "cbam_nas_client.py"
        generate(
            document,
            input_file_type=InputFileType.OpenAPI,
            output=output,
            output_model_type=DataModelType.PydanticV2BaseModel,
            formatters=[Formatter.BUILTIN],
            set_default_enum_member=True,
        )
        return output.read_text()


@pytest.fixture
def generated(api: TestClient, tmp_path: Path) -> ModuleType:
    """The models generated from the app's OpenAPI document, imported."""
    document = api.get("/openapi.json")
    assert document.status_code == 200
    output = tmp_path / "cbam_nas_client.py"
    output.write_text(_client_source(document.text))
    spec = importlib.util.spec_from_file_location("cbam_nas_client", output)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic's generic models look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _body(model: Any) -> dict[str, Any]:
    return json.loads(model.model_dump_json(exclude_unset=True))


def test_the_generated_spec_builds_a_search_the_server_accepts(
    api: TestClient, generated: ModuleType
) -> None:
    built = generated.SearchSpec(
        name="from a generated client",
        backbone="cifar_resnet20",
        dataset=generated.DatasetSpec(name="synthetic", options={"num_samples": 64}),
        space=generated.SearchSpace(
            arrangements=["channel-spatial", "spatial"], kernel_sizes=[3, 7], blocks=["last"]
        ),
        training=generated.TrainingSpec(epochs=2, batch_size=32, optimizer="adamw"),
        budget=generated.BudgetSpec(trials=3),
        confirm=generated.ConfirmSpec(max_seeds=3, alpha=0.1),
        early_stopping=generated.EarlyStoppingSpec(policy="none"),
    )
    body = _body(built)
    answer = api.post("/api/v1/searches", json=body)
    assert answer.status_code == 201, answer.text
    stored = answer.json()["spec"]
    assert stored == SearchSpec.from_dict(body).to_dict()
    assert stored["space"]["kernel_sizes"] == [3, 7] and stored["training"]["optimizer"] == "adamw"
    # and the generated models read back what the server stored, defaults filled in
    assert generated.SearchSpec.model_validate(stored).training.epochs == 2


def test_the_generated_spec_refuses_what_the_server_refuses(generated: ModuleType) -> None:
    bad: list[tuple[str, dict[str, Any]]] = [
        ("TrainingSpec", {"epochs": 0}),
        ("TrainingSpec", {"momentum": 1.0}),
        ("TrainingSpec", {"optimizer": "lion"}),
        ("TrainingSpec", {"epoch": 3}),
        ("SearchSpace", {"kernel_sizes": [4]}),
        ("SearchSpace", {"arrangements": []}),
        ("SearchSpec", {"sampler": "cmaes"}),
        ("SearchSpec", {"backbone": "resnet9"}),
        ("SearchSpec", {"seed": -1}),
        ("ObjectivesSpec", {"overheads": ["flops"]}),
        ("DatasetSpec", {"val_fraction": 1.0}),
        ("DatasetSpec", {"name": "imagenet"}),
        ("ConfirmSpec", {"alpha": 0.5}),
    ]
    for model, data in bad:
        with pytest.raises(ValidationError):
            getattr(generated, model).model_validate(data)
        section = {
            "TrainingSpec": "training",
            "SearchSpace": "space",
            "ObjectivesSpec": "objectives",
            "DatasetSpec": "dataset",
            "ConfirmSpec": "confirm",
        }.get(model)
        with pytest.raises(ValueError):
            SearchSpec.from_dict({section: data} if section else data)


def test_every_spec_the_server_writes_is_valid_by_the_published_schema(
    generated: ModuleType,
) -> None:
    constrained = {
        "backbone": "resnet18",
        "dataset": {"name": "cifar10", "options": {"root": "/data/cifar"}, "val_fraction": 0.2},
        "space": {"pool_types": ["avg+max", ["lse"]], "stages": [[3, 4], [1, 2, 3, 4]]},
        "objectives": {
            "overheads": ["macs", "latency"],
            "constraint_overhead": "params",
            "constraint_max_pct": 5,
        },
        "budget": {"trials": 12, "wall_clock_s": 3600, "max_retries": 0},
        "training": {"epochs": 3, "lr": 1, "label_smoothing": 0.1, "schedule": "step"},
        "sampler": "nsga2",
        "early_stopping": {"policy": "median", "min_epochs": 2},
        "confirm": {"top_k": 2, "epochs": 8, "trials": 20},
        "seed": 7,
    }
    specs = [SearchSpec(), SearchSpec.from_dict(EXAMPLE), SearchSpec.from_dict(constrained)]
    specs += [SearchSpec.from_yaml(path) for path in sorted(EXAMPLES.glob("*.yaml"))]
    for spec in specs:
        client_side = generated.SearchSpec.model_validate(spec.to_dict())
        assert SearchSpec.from_dict(_body(client_side)) == spec
    # the published defaults are the server's defaults
    assert (
        SearchSpec.from_dict(json.loads(generated.SearchSpec().model_dump_json())) == SearchSpec()
    )


def test_the_document_publishes_the_whole_spec(api: TestClient) -> None:
    """What ``/docs`` renders: the submit body is the SearchSpec schema, with enums, bounds,
    defaults, descriptions and the example."""
    document = api.get("/openapi.json").json()
    body = document["paths"]["/api/v1/searches"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/SearchSpec"}
    assert body["application/json"]["example"] == EXAMPLE
    schemas = document["components"]["schemas"]
    spec = schemas["SearchSpec"]
    assert spec["additionalProperties"] is False and spec["examples"] == [EXAMPLE]
    ours, library = spec["properties"]["backbone"]["anyOf"]
    assert "cifar_resnet20" in ours["enum"]
    assert library["pattern"].startswith("^(timm|torchvision):")
    assert spec["properties"]["sampler"]["enum"] == ["tpe", "nsga2", "random", "grid"]
    training = schemas["TrainingSpec"]["properties"]
    assert training["epochs"] == {
        "default": 10,
        "description": "Epochs of an exploration trial.",
        "minimum": 1,
        "title": "Epochs",
        "type": "integer",
    }
    assert training["momentum"]["exclusiveMaximum"] == 1
    space = schemas["SearchSpace"]["properties"]
    assert space["kernel_sizes"]["items"]["enum"] == [1, 3, 5, 7, 9]
    assert space["arrangements"]["minItems"] == 1
    assert "imagefolder: root" in schemas["DatasetSpec"]["properties"]["options"]["description"]
    assert api.get("/docs").status_code == 200


def test_a_stranger_gets_401_before_any_validation(api: TestClient) -> None:
    del api.headers["Authorization"]
    answer = api.post("/api/v1/searches", json={"sampler": "cmaes", "training": {"epochs": 0}})
    assert answer.status_code == 401
    assert "sampler" not in answer.text
