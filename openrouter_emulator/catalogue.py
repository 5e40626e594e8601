"""The emulator's model catalogue, prices and exact-money JSON.

OpenRouter publishes prices as decimal strings in USD per token and reports costs as
JSON numbers. The gateway settles money with ``Decimal``, so the emulator must report
costs that parse back *exactly* (``0.00014``, never ``1.4000000000000001e-4``): every
amount here is a ``Decimal`` and ``dumps`` writes it as a plain JSON number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

ZERO = Decimal(0)


def money_text(amount: Decimal) -> str:
    """A Decimal as a JSON number literal in plain notation (no exponent, exact)."""
    if not amount:
        return "0"
    text = format(amount.normalize(), "f")
    return text


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return orjson.Fragment(money_text(obj).encode())
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def dumps(obj: Any) -> bytes:
    """orjson with Decimals written as exact JSON numbers."""
    return orjson.dumps(obj, default=_default)


@dataclass(frozen=True, slots=True)
class CatalogueModel:
    """One model: the prices used for cost, and the OpenRouter ``/models`` row."""

    id: str
    provider: str
    prompt_price: Decimal
    completion_price: Decimal
    request_price: Decimal
    output_modalities: tuple[str, ...]
    row: dict[str, Any] = field(compare=False)

    @property
    def is_free(self) -> bool:
        return not (self.prompt_price or self.completion_price or self.request_price)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> tuple[Decimal, Decimal, Decimal]:
        """(total, prompt part, completion part) in USD, exact."""
        prompt_cost = self.prompt_price * prompt_tokens
        completion_cost = self.completion_price * completion_tokens
        return prompt_cost + completion_cost + self.request_price, prompt_cost, completion_cost


_CHAT_PARAMETERS = [
    "max_tokens", "temperature", "top_p", "stop", "frequency_penalty", "presence_penalty",
    "seed", "tools", "tool_choice", "response_format", "structured_outputs",
]


def _model(
    id: str, name: str, *, created: int, context: int, max_out: int | None, prompt: str,
    completion: str, provider: str, tokenizer: str, inputs: tuple[str, ...] = ("text",),
    outputs: tuple[str, ...] = ("text",), canonical: str | None = None, cache_read: str | None = None,
    image: str = "0", description: str = "", hugging_face_id: str | None = None,
    moderated: bool = False,
) -> CatalogueModel:
    modality = "+".join(inputs) + "->" + "+".join(outputs)
    pricing = {
        "prompt": prompt, "completion": completion, "request": "0", "image": image,
        "web_search": "0", "internal_reasoning": "0",
        "input_cache_read": cache_read if cache_read is not None else prompt,
    }
    row = {
        "id": id,
        "canonical_slug": canonical or id,
        "hugging_face_id": hugging_face_id,
        "name": name,
        "created": created,
        "description": description or f"{name}, served by the local OpenRouter emulator.",
        "context_length": context,
        "architecture": {
            "modality": modality,
            "input_modalities": list(inputs),
            "output_modalities": list(outputs),
            "tokenizer": tokenizer,
            "instruct_type": None,
        },
        "pricing": pricing,
        "top_provider": {"context_length": context, "max_completion_tokens": max_out, "is_moderated": moderated},
        "per_request_limits": None,
        "supported_parameters": [] if "embeddings" in outputs else list(_CHAT_PARAMETERS),
        "default_parameters": None,
        "supported_voices": None,
        "expiration_date": None,
        "knowledge_cutoff": None,
        "links": {"details": f"/api/v1/models/{id.split(':')[0]}/endpoints"},
    }
    return CatalogueModel(
        id=id, provider=provider, prompt_price=Decimal(prompt), completion_price=Decimal(completion),
        request_price=ZERO, output_modalities=outputs, row=row,
    )


DATA_POLICY_MODEL = "emulator/data-policy"


def default_models() -> list[CatalogueModel]:
    """Real-looking paid models (prices as OpenRouter listed them), free ones, and test oddities."""
    return [
        _model("openai/gpt-4o-mini", "OpenAI: GPT-4o-mini", created=1721260800, context=128000, max_out=16384,
               prompt="0.00000015", completion="0.0000006", cache_read="0.000000075", provider="OpenAI",
               tokenizer="GPT", inputs=("text", "image", "file"), canonical="openai/gpt-4o-mini-2024-07-18",
               image="0.000217", moderated=True),
        _model("openai/gpt-4o", "OpenAI: GPT-4o", created=1715367049, context=128000, max_out=16384,
               prompt="0.0000025", completion="0.00001", cache_read="0.00000125", provider="OpenAI",
               tokenizer="GPT", inputs=("text", "image", "file"), canonical="openai/gpt-4o-2024-05-13",
               image="0.003613", moderated=True),
        _model("anthropic/claude-3.5-sonnet", "Anthropic: Claude 3.5 Sonnet", created=1729555200, context=200000,
               max_out=8192, prompt="0.000003", completion="0.000015", cache_read="0.0000003",
               provider="Anthropic", tokenizer="Claude", inputs=("text", "image", "file"),
               canonical="anthropic/claude-3.5-sonnet-20241022", image="0.0048", moderated=True),
        _model("anthropic/claude-3.5-haiku", "Anthropic: Claude 3.5 Haiku", created=1730678400, context=200000,
               max_out=8192, prompt="0.0000008", completion="0.000004", cache_read="0.00000008",
               provider="Anthropic", tokenizer="Claude", canonical="anthropic/claude-3-5-haiku", moderated=True),
        _model("google/gemini-2.0-flash-001", "Google: Gemini 2.0 Flash", created=1738769413, context=1048576,
               max_out=8192, prompt="0.0000001", completion="0.0000004", cache_read="0.000000025",
               provider="Google AI Studio", tokenizer="Gemini", inputs=("text", "image", "file", "audio", "video"),
               canonical="google/gemini-2.0-flash-001", image="0.0000258"),
        _model("deepseek/deepseek-chat", "DeepSeek: DeepSeek V3", created=1735241320, context=163840, max_out=163840,
               prompt="0.00000038", completion="0.00000089", provider="DeepInfra", tokenizer="DeepSeek",
               canonical="deepseek/deepseek-chat-v3", hugging_face_id="deepseek-ai/DeepSeek-V3"),
        _model("meta-llama/llama-3.1-8b-instruct", "Meta: Llama 3.1 8B Instruct", created=1721692800,
               context=131072, max_out=16384, prompt="0.00000002", completion="0.00000005", provider="DeepInfra",
               tokenizer="Llama3", canonical="meta-llama/llama-3.1-8b-instruct",
               hugging_face_id="meta-llama/Meta-Llama-3.1-8B-Instruct"),
        _model("openai/text-embedding-3-small", "OpenAI: Text Embedding 3 Small", created=1706140800, context=8192,
               max_out=None, prompt="0.00000002", completion="0", provider="OpenAI", tokenizer="GPT",
               outputs=("embeddings",)),
        _model("meta-llama/llama-3.3-70b-instruct:free", "Meta: Llama 3.3 70B Instruct (free)", created=1733506137,
               context=131072, max_out=2048, prompt="0", completion="0", provider="DeepInfra", tokenizer="Llama3",
               canonical="meta-llama/llama-3.3-70b-instruct",
               hugging_face_id="meta-llama/Llama-3.3-70B-Instruct"),
        _model("google/gemma-2-9b-it:free", "Google: Gemma 2 9B (free)", created=1719532800, context=8192,
               max_out=8192, prompt="0", completion="0", provider="DeepInfra", tokenizer="Gemma",
               canonical="google/gemma-2-9b-it", hugging_face_id="google/gemma-2-9b-it"),
        _model("emulator/zero-priced", "Emulator: Zero-priced (no :free suffix)", created=1700000000,
               context=32768, max_out=4096, prompt="0", completion="0", provider="Emulator", tokenizer="Other"),
        _model(DATA_POLICY_MODEL, "Emulator: Refused by data policy", created=1700000001, context=32768,
               max_out=4096, prompt="0.000001", completion="0.000002", provider="Emulator", tokenizer="Other",
               description="Every request answers OpenRouter's 404 'No endpoints found matching your data policy'."),
    ]


def synthetic_model(n: int) -> CatalogueModel:
    """A paid filler model, so that paging past 500 rows can be exercised."""
    return _model(f"emulator/synthetic-{n:04d}", f"Emulator: Synthetic {n:04d}", created=1600000000 - n,
                  context=8192, max_out=1024, prompt="0.000001", completion="0.000002", provider="Emulator",
                  tokenizer="Other")


class Catalogue:
    """The models the emulator serves: lookup by id, and the filtered ``/models`` list."""

    def __init__(self, extra_models: int = 0) -> None:
        self._base = default_models()
        self.set_extra(extra_models)

    def set_extra(self, extra: int) -> None:
        models = self._base + [synthetic_model(i) for i in range(1, extra + 1)]
        models.sort(key=lambda m: m.row["created"], reverse=True)  # OpenRouter lists newest first
        self.extra = extra
        self.models = models
        self.by_id = {m.id: m for m in models}

    def get(self, model_id: str) -> CatalogueModel | None:
        return self.by_id.get(model_id)

    def rows(self, output_modalities: str | None) -> list[dict[str, Any]]:
        """Rows filtered like OpenRouter's ``output_modalities`` (default ``text``; ``all`` = everything)."""
        wanted = {m.strip() for m in (output_modalities or "text").split(",") if m.strip()}
        if "all" in wanted:
            return [m.row for m in self.models]
        return [m.row for m in self.models if wanted.intersection(m.output_modalities)]
