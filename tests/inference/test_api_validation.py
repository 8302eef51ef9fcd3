"""Every bad chat-completion request is answered with a 4xx in OpenAI's error shape before any
worker is asked (no worker runs in these tests)."""

import json

import pytest

from inference.models import Conversation, Message

URL = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]


def post(client, body, **extra):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(URL, data=data, content_type="application/json", **extra)


@pytest.mark.parametrize("body, param", [
    ({"messages": OK_MESSAGES, "temperatur": 0.5}, "temperatur"),
    ({"messages": OK_MESSAGES, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": OK_MESSAGES, "max_tokens": True}, "max_tokens"),
    ({"messages": OK_MESSAGES, "stream": "yes"}, "stream"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 16001}]}, "messages[0].content"),
    ({"messages": OK_MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": OK_MESSAGES, "max_tokens": 100000}, "max_tokens"),
    ({"messages": OK_MESSAGES, "temperature": -0.1}, "temperature"),
    ({"messages": OK_MESSAGES, "top_p": 0}, "top_p"),
    ({"messages": OK_MESSAGES, "presence_penalty": -2.5}, "presence_penalty"),
    ({"messages": OK_MESSAGES, "frequency_penalty": "lots"}, "frequency_penalty"),
    ({"messages": OK_MESSAGES, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": OK_MESSAGES, "repetition_penalty": 3}, "repetition_penalty"),
    ({"messages": OK_MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": OK_MESSAGES, "n": 3}, "n"),
    ({"model": "gpt-4o", "messages": OK_MESSAGES}, "model"),
    ({"messages": OK_MESSAGES, "r3mes": {"experts": ["astrology"]}}, "experts"),
    ({"messages": OK_MESSAGES, "r3mes": {"experts": {"coding": -1}}}, "experts"),
    ({"messages": OK_MESSAGES, "r3mes": {"vibes": 1}}, "r3mes.vibes"),
    ({"messages": OK_MESSAGES, "r3mes": {"rag": "on"}}, "rag"),
])
def test_bad_chat_requests_are_400_in_openai_shape(api_client, body, param):
    response = post(api_client, body)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_malformed_json_is_400(api_client):
    response = post(api_client, "{not json")
    assert response.status_code == 400 and "Malformed JSON" in response.json()["error"]["message"]


def test_missing_token_is_401(client, db):
    response = post(client, {"messages": OK_MESSAGES})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_wrong_method_is_405(api_client):
    assert api_client.get(URL).status_code == 405


def test_rate_limit_answers_429_with_retry_after(api_client, settings):
    settings.R3MES_RATE_API = (2, 60)
    statuses = [post(api_client, {"messages": []}).status_code for _ in range(3)]
    assert statuses == [400, 400, 429]
    response = post(api_client, {"messages": []})
    assert response.status_code == 429 and int(response["Retry-After"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_no_worker_is_a_clear_503(api_client, settings, fresh_channel_layers):
    """Nothing listens on the `inference` channel here, so the request times out quickly."""
    settings.R3MES_WORKER_ACCEPT_TIMEOUT = 0.5
    settings.CHANNEL_LAYERS = {"default": {**settings.CHANNEL_LAYERS["default"],
                                           "CONFIG": {**settings.CHANNEL_LAYERS["default"]["CONFIG"],
                                                      "prefix": "r3mes-no-worker"}}}
    response = post(api_client, {"messages": OK_MESSAGES, "max_tokens": 2})
    assert response.status_code == 503 and response.json()["error"]["code"] == "worker_timeout"
    assert "Retry-After" in response
    assert not Conversation.objects.exists() and not Message.objects.exists()
