"""OpenRouter's model endpoints beyond ``GET /models`` (OPENROUTER.md §5.2), as the official SDKs call them.

``/models/count``, ``/models/user`` (the caller's own view: the key's data policy hides
``emulator/data-policy``, as OpenRouter hides models the account's privacy settings
refuse), ``/model/{author}/{slug}`` (variant suffixes such as ``:free`` allowed) and
``/models/{author}/{slug}/endpoints`` (one endpoint per model: the emulator is its only
provider). Rows carry every field the SDKs require, nulls where unknown.
"""

from __future__ import annotations

from typing import Any

from openrouter_emulator.catalogue import DATA_POLICY_MODEL, Catalogue, CatalogueModel
from openrouter_emulator.state import EmulatorError

MODEL_PREFIX = "/model/"
MODELS_PREFIX = "/models/"
ENDPOINTS_SUFFIX = "/endpoints"


def route_of(path: str) -> str:
    """The route template of a model path (``/model/{author}/{slug}`` …), or the path itself."""
    parts = path.split("/")
    if path.startswith(MODEL_PREFIX) and len(parts) == 4:
        return "/model/{author}/{slug}"
    if path.startswith(MODELS_PREFIX) and path.endswith(ENDPOINTS_SUFFIX) and len(parts) == 5:
        return "/models/{author}/{slug}/endpoints"
    return path


def user_rows(catalogue: Catalogue, output_modalities: str | None) -> list[dict[str, Any]]:
    return [row for row in catalogue.rows(output_modalities) if row["id"] != DATA_POLICY_MODEL]


def find(catalogue: Catalogue, path: str, *, endpoints: bool) -> CatalogueModel:
    parts = path.split("/")
    model_id = f"{parts[2]}/{parts[3]}"
    entry = catalogue.get(model_id)
    if entry is None and not endpoints:  # `/model/` takes a variant suffix: `:free` of a listed base id
        entry = next((m for m in catalogue.models if m.id.split(":")[0] == model_id.split(":")[0]), None)
    if entry is None and endpoints:  # endpoints are listed per base model
        entry = next((m for m in catalogue.models if m.id.split(":")[0] == model_id), None)
    if entry is None:
        raise EmulatorError(404, f"Model {model_id} not found")
    return entry


def endpoint_row(model: CatalogueModel) -> dict[str, Any]:
    row = model.row
    top = row["top_provider"]
    return {
        "name": f"{model.provider} | {model.id}", "model_id": model.id, "model_name": row["name"],
        "provider_name": model.provider, "tag": model.provider.lower().replace(" ", "-"),
        "context_length": row["context_length"], "max_prompt_tokens": None,
        "max_completion_tokens": top["max_completion_tokens"], "pricing": dict(row["pricing"]),
        "quantization": None, "status": 0, "service_tier": None,
        "supported_parameters": list(row["supported_parameters"]), "native_tools": {},
        "supports_implicit_caching": False, "supports_diarization": False,
        "supports_tool_choice": {"auto": True, "function": True, "none": True, "required": True},
        "uptime_last_5m": 100.0, "uptime_last_30m": 100.0, "uptime_last_1d": 100.0,
        "latency_last_30m": {"p50": 1.0, "p75": 1.0, "p90": 1.0, "p99": 1.0},
        "throughput_last_30m": {"p50": 1000.0, "p75": 1000.0, "p90": 1000.0, "p99": 1000.0},
    }


def endpoints_payload(catalogue: Catalogue, path: str) -> dict[str, Any]:
    model = find(catalogue, path, endpoints=True)
    base = model.id.split(":")[0]
    variants = [m for m in catalogue.models if m.id.split(":")[0] == base]
    row = model.row
    return {"data": {"id": base, "name": row["name"], "created": row["created"], "description": row["description"],
                     "architecture": row["architecture"], "endpoints": [endpoint_row(m) for m in variants]}}
