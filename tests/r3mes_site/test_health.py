import pytest

pytestmark = pytest.mark.django_db


def test_healthz_answers_while_the_process_runs(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_is_503_naming_the_inference_worker_when_none_answers(client, settings, fresh_channel_layers):
    settings.R3MES_WORKER_PING_TIMEOUT = 0.3
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"]["ok"] and checks["redis"]["ok"]
    assert not checks["inference_worker"]["ok"]
    assert "no inference worker answered" in checks["inference_worker"]["error"]


def test_readyz_is_503_naming_redis_when_redis_is_down(client, settings, fresh_channel_layers):
    from tests.services import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings.REDIS_URL = dead
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [dead]}}}
    settings.R3MES_WORKER_PING_TIMEOUT = 0.5
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert not body["checks"]["redis"]["ok"]
    assert "redis unreachable" in body["checks"]["redis"]["error"]
    assert not body["checks"]["inference_worker"]["ok"]
    assert body["checks"]["database"]["ok"]


def test_startupz_is_200_once_migrations_are_applied(client):
    response = client.get("/startupz")
    assert response.status_code == 200
    assert response.json() == {"status": "started"}


def test_metrics_lists_r3mes_and_django_series(client):
    client.get("/healthz")
    response = client.get("/metrics")
    assert response.status_code == 200
    text = response.content.decode()
    for name in ("r3mes_time_to_first_token_seconds", "r3mes_generated_tokens_total", "r3mes_requests_running",
                 "r3mes_adapter_cache_hits_total", "django_http_requests_total_by_method"):
        assert name in text


def test_every_response_carries_a_request_id_and_a_good_incoming_one_is_kept(client):
    generated = client.get("/healthz")["X-Request-ID"]
    assert len(generated) == 32
    assert client.get("/healthz", HTTP_X_REQUEST_ID="trace-1234abcd")["X-Request-ID"] == "trace-1234abcd"
    assert client.get("/healthz", HTTP_X_REQUEST_ID="bad id with spaces")["X-Request-ID"] != "bad id with spaces"


def test_unknown_page_gets_the_404_page(client):
    response = client.get("/no/such/page/")
    assert response.status_code == 404
    assert b"Not found" in response.content
