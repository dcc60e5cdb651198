"""``zreward serve`` publishes its OpenAPI schema: served without a token, every reference resolves, every error
documented with the JSON error model, and real responses match the schemas they are documented with."""
import copy

import pytest

pytest.importorskip("fastapi", reason="zreward serve needs the [serve] extra (fastapi, uvicorn, httpx)")
import httpx  # noqa: E402

from tests.deploy_helpers import save_tiny_student, uint8_images  # noqa: E402
from zreward.deploy.images import encode_image  # noqa: E402
from zreward.deploy.model_folder import load_model_folder  # noqa: E402
from zreward.deploy.serve import BackgroundServer  # noqa: E402
from zreward.deploy.service import (ErrorResponse, HealthResponse, ScoreRequest, ScoreResponse,  # noqa: E402
                                    ServeSettings, create_app)

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    scorer = load_model_folder(save_tiny_student(tmp_path_factory.mktemp("models")))
    with BackgroundServer(create_app(scorer, ServeSettings(max_batch=4, max_wait_ms=5), token=TOKEN)) as server:
        yield server


@pytest.fixture(scope="module")
def schema(running):
    response = httpx.get(f"{running.url}/openapi.json")  # no token: the schema holds nothing private
    assert response.status_code == 200
    return response.json()


def _resolve(document, ref):
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def _refs(node):
    if isinstance(node, dict):
        yield from ([node["$ref"]] if "$ref" in node else [])
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _schema_of(document, path, method, status, media="application/json"):
    return document["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]


def test_every_endpoint_and_error_is_documented_and_every_reference_resolves(schema):
    assert schema["openapi"].startswith("3.")
    assert {(path, method) for path, item in schema["paths"].items() for method in item} == {
        ("/score", "post"), ("/health", "get"), ("/metrics", "get")}
    refs = set(_refs(schema))
    for ref in refs:
        _resolve(schema, ref)
    score = schema["paths"]["/score"]["post"]
    body = _resolve(schema, score["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    assert body["required"] == ["images", "prompts"] and body["additionalProperties"] is False
    assert _schema_of(schema, "/score", "post", 200) == {"$ref": "#/components/schemas/ScoreResponse"}
    for status in (400, 401, 413, 500, 503):
        assert _schema_of(schema, "/score", "post", status) == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "Retry-After" in score["responses"]["503"]["headers"]
    assert _schema_of(schema, "/metrics", "get", 401) == {"$ref": "#/components/schemas/ErrorResponse"}
    assert _schema_of(schema, "/metrics", "get", 200, "text/plain") == {"type": "string"}
    # The token's rule is in the schema: /score and /metrics need the bearer, /health does not.
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert [name for name in ("/score", "/metrics", "/health")
            if "security" in next(iter(schema["paths"][name].values()))] == ["/score", "/metrics"]
    # The components are the service's pydantic models, so validating with them validates against the schema.
    for model in (ScoreRequest, ScoreResponse, ErrorResponse, HealthResponse):
        assert f"#/components/schemas/{model.__name__}" in refs
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        generated.pop("$defs", None)
        assert schema["components"]["schemas"][model.__name__] == generated


@pytest.fixture(scope="module")
def real(running):
    """``(path, method, status, response)`` of real calls: a score, each kind of /score error a client can cause
    without a full queue, and /health."""
    image = encode_image(uint8_images(1)[0])
    score = f"{running.url}/score"
    calls = [
        (200, dict(json={"images": [image, image], "prompts": ["a cat", "a dog"], "dimensions": ["realism"]},
                   headers=AUTH)),
        (401, dict(json={"images": [image], "prompts": ["a cat"]})),
        (400, dict(content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})),
        (413, dict(json={"images": [image], "prompts": ["a" * 600]}, headers=AUTH)),
    ]
    out = []
    for status, request in calls:
        response = httpx.post(score, timeout=60, **request)
        assert response.status_code == status, response.text
        out.append(("/score", "post", status, response.json()))
    out.append(("/health", "get", 200, httpx.get(f"{running.url}/health").json()))
    return out


def test_real_responses_match_their_models(real):
    for path, _, status, body in real:
        model = {"/health": HealthResponse}.get(path, ScoreResponse if status == 200 else ErrorResponse)
        model.model_validate(body, strict=True)
    results = real[0][3]["results"]
    assert [r["image"] for r in results] == [0, 1] and list(results[0]["dimensions"]) == ["realism"]


def test_schema_passes_the_openapi_validator_and_real_responses_match_it(schema, real):
    validator = pytest.importorskip("openapi_spec_validator", reason="the dev extra installs it")
    import jsonschema  # installed with openapi-spec-validator

    def check(body, path, method, status):
        # OpenAPI 3.1 schema objects are JSON Schema 2020-12; the components ride along for the $refs.
        target = _schema_of(schema, path, method, status)
        jsonschema.Draft202012Validator({**target, "components": schema["components"]}).validate(body)

    validator.validate(schema)
    for path, method, status, body in real:
        check(body, path, method, status)
    broken = copy.deepcopy(real[0][3])
    del broken["results"][0]["reward"]
    with pytest.raises(jsonschema.ValidationError, match="'reward' is a required property"):
        check(broken, "/score", "post", 200)
