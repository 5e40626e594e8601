"""The stream observer: the same facts however the bytes are cut, money exact, nothing altered.

The property tests take a recorded OpenRouter-style stream (keep-alive comment, non-ASCII
content, a usage chunk with Decimal-only costs, [DONE]) and cut it at every byte
boundary, including inside `data:` prefixes and inside multi-byte UTF-8 characters.
"""

from __future__ import annotations

import random
from decimal import Decimal

import orjson
import pytest

from gateway.proxy.sse import Observation, StreamObserver, observe_body, parse_usage

GEN = "gen-1732000000-AbCdEfGhIjKlMnOpQrSt"


def chunk(*, choices, **extra) -> bytes:
    base = {"id": GEN, "provider": "Zürich AI", "model": "openai/gpt-4o", "object": "chat.completion.chunk",
            "created": 1732000000, "choices": choices}
    return b"data: " + orjson.dumps({**base, **extra}) + b"\n\n"


def delta(content: str, finish: str | None = None) -> dict:
    return {"index": 0, "delta": {"content": content}, "finish_reason": finish, "native_finish_reason": finish}


USAGE = (
    b'{"prompt_tokens":194,"completion_tokens":2,"total_tokens":196,'
    b'"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0},'
    b'"cost":0.00014,"is_byok":false,"cost_details":{"upstream_inference_cost":null,'
    b'"upstream_inference_prompt_cost":1.1e-7,"upstream_inference_completions_cost":0.0000399}}'
)
RECORDED = b"".join([
    b": OPENROUTER PROCESSING\n\n",
    chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
    chunk(choices=[delta("Grüße, 世界 😀")]),
    b": OPENROUTER PROCESSING\n\n",
    chunk(choices=[delta(' he said "usage": {"cost": 99} data: [DONE]')]),
    chunk(choices=[delta("", "stop")]),
    chunk(choices=[])[:-2].replace(b'"choices":[]}', b'"choices":[],"usage":' + USAGE + b"}") + b"\n\n",
    b"data: [DONE]\n\n",
])
EXPECTED_USAGE = {
    "prompt_tokens": 194, "completion_tokens": 2, "total_tokens": 196,
    "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0},
    "cost": Decimal("0.00014"), "is_byok": False,
    "cost_details": {"upstream_inference_cost": None, "upstream_inference_prompt_cost": Decimal("1.1e-7"),
                     "upstream_inference_completions_cost": Decimal("0.0000399")},
}
MIDSTREAM_ERROR = b"".join([
    chunk(choices=[delta("Hel")]),
    chunk(choices=[{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
          error={"code": 502, "message": "Provider disconnected", "metadata": {"error_type": "provider_unavailable"}}),
])


def observe(*pieces: bytes) -> Observation:
    observer = StreamObserver()
    for piece in pieces:
        observer.feed(piece)
    return observer.finish()


def whole() -> Observation:
    return observe(RECORDED)


# ---------------------------------------------------------------- what it reads


def test_reads_id_model_provider_finish_and_exact_usage():
    obs = whole()
    assert (obs.generation_id, obs.model, obs.provider) == (GEN, "openai/gpt-4o", "Zürich AI")
    assert obs.finish_reason == "stop" and obs.error is None
    assert obs.usage == EXPECTED_USAGE
    assert type(obs.usage["cost"]) is Decimal and str(obs.usage["cost"]) == "0.00014"
    assert obs.bytes == len(RECORDED)


def test_reads_a_midstream_error_chunk():
    obs = observe(MIDSTREAM_ERROR)
    assert obs.error == {"code": 502, "message": "Provider disconnected",
                         "metadata": {"error_type": "provider_unavailable"}}
    assert obs.finish_reason == "error" and obs.generation_id == GEN and obs.usage is None


def test_an_error_word_in_content_is_not_an_error():
    obs = observe(chunk(choices=[delta('the "error": {"code": 1} you saw')]), b"data: [DONE]\n\n")
    assert obs.error is None and obs.finish_reason is None


def test_header_generation_id_wins_over_the_body():
    observer = StreamObserver(Observation(generation_id="gen-from-header"))
    observer.feed(RECORDED)
    assert observer.finish().generation_id == "gen-from-header"


@pytest.mark.parametrize("stream", [b"", b"data: [DONE]\n\n", b": keep-alive\n\n: still here\n\n", b"\n\n\n"])
def test_streams_without_events_observe_nothing(stream):
    obs = observe(stream)
    assert obs == Observation(bytes=len(stream))


def test_crlf_framing_and_data_without_a_space():
    stream = RECORDED.replace(b"\n", b"\r\n").replace(b"data: ", b"data:")
    obs = observe(stream)
    assert obs.generation_id == GEN and obs.usage == EXPECTED_USAGE and obs.finish_reason == "stop"
    assert obs.bytes == len(stream)


def test_last_line_without_a_newline_is_read_at_finish():
    stream = RECORDED[: RECORDED.rindex(b"data: [DONE]")].rstrip(b"\n")
    obs = observe(stream)
    assert obs.usage == EXPECTED_USAGE and obs.bytes == len(stream)


def test_usage_after_non_ascii_text_on_the_same_line():
    """Usage follows content on one line; byte and character offsets differ before it."""
    line = chunk(choices=[delta("ünïcødé 😀 " * 20, "stop")], usage={"total_tokens": 3, "cost": 1})
    line = line.replace(b'"cost":1}', b'"cost":0.000123456789012345678901}')
    obs = observe(line)
    assert obs.usage == {"total_tokens": 3, "cost": Decimal("0.000123456789012345678901")}


def test_an_overlong_line_is_skipped_but_later_events_are_read():
    huge = b"data: " + b'{"pad":"' + b"x" * (1 << 21) + b'"}\n\n'
    obs = observe(huge[:700_000], huge[700_000:1_500_000], huge[1_500_000:], RECORDED)
    assert obs.generation_id == GEN and obs.usage == EXPECTED_USAGE
    assert obs.bytes == len(huge) + len(RECORDED)


# ---------------------------------------------------------------- however it is cut


def test_every_single_cut_gives_the_same_observation():
    expected = whole()
    for cut in range(len(RECORDED) + 1):
        assert observe(RECORDED[:cut], RECORDED[cut:]) == expected, f"cut at byte {cut}"


def test_cuts_inside_utf8_characters_and_data_prefixes_are_covered():
    starts = [i for i, b in enumerate(RECORDED) if b >= 0x80 and (b & 0xC0) == 0x80]  # continuation bytes
    prefixes = [i + k for i in range(len(RECORDED)) if RECORDED.startswith(b"data:", i) for k in (1, 3, 5)]
    assert starts and prefixes
    expected = whole()
    for cut in starts + prefixes:
        assert observe(RECORDED[:cut], RECORDED[cut:]) == expected


def test_every_midstream_error_cut_gives_the_same_observation():
    expected = observe(MIDSTREAM_ERROR)
    for cut in range(len(MIDSTREAM_ERROR) + 1):
        assert observe(MIDSTREAM_ERROR[:cut], MIDSTREAM_ERROR[cut:]) == expected


def test_random_many_piece_splits_and_byte_by_byte():
    expected = whole()
    rng = random.Random(20240601)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(RECORDED)), rng.randint(2, 40)))
        pieces = [RECORDED[a:b] for a, b in zip([0, *cuts], [*cuts, len(RECORDED)])]
        assert observe(*pieces) == expected
    assert observe(*(RECORDED[i : i + 1] for i in range(len(RECORDED)))) == expected


def test_feeding_never_changes_the_bytes():
    pieces = [RECORDED[:37], b"", RECORDED[37:400], RECORDED[400:]]
    snapshot = [bytes(p) for p in pieces]
    observe(*pieces)
    assert pieces == snapshot


# ---------------------------------------------------------------- whole bodies


def test_observe_body_reads_a_non_streamed_completion():
    body = orjson.dumps({
        "id": GEN, "provider": "OpenAI", "model": "openai/gpt-4o", "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant", "content": "Grüße 😀 \"usage\": {\"cost\": 5}"}}],
    })[:-1] + b',"usage":' + USAGE + b"}"
    obs = observe_body(body)
    assert (obs.generation_id, obs.model, obs.provider, obs.finish_reason) == (GEN, "openai/gpt-4o", "OpenAI", "length")
    assert obs.usage == EXPECTED_USAGE and obs.bytes == len(body) and obs.error is None


def test_observe_body_reads_errors_in_a_200_body():
    partial = orjson.dumps({"id": GEN, "choices": [{"index": 0, "finish_reason": "error",
                                                     "error": {"code": 502, "message": "cut off"}}]})
    assert observe_body(partial).error == {"code": 502, "message": "cut off"}
    top = orjson.dumps({"error": {"code": 400, "message": "bad"}, "user_id": "u"})
    assert observe_body(top).error == {"code": 400, "message": "bad"}


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"'])
def test_observe_body_tolerates_non_objects(raw):
    assert observe_body(raw) == Observation(bytes=len(raw))


@pytest.mark.parametrize(
    ("raw", "usage"),
    [
        (b'{"usage": {"cost": 0.1}}', {"cost": Decimal("0.1")}),
        (b'{"a": {"usage": {"cost": 1}}, "usage": {"cost": 2E-3}}', {"cost": Decimal("0.002")}),
        (b'{"usage": null}', None),
        (b'{"usage": {"cost": 0.1', None),
        (b'{"text": "\\"usage\\": {\\"cost\\": 1}"}', None),
    ],
)
def test_parse_usage(raw, usage):
    assert parse_usage(raw) == usage
