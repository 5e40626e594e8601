"""The assembled app: unexpected errors still answer in the error envelope, with the request id."""

from pathlib import Path

from cryptography.fernet import Fernet
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.core.config import Config


def _config(tmp_path: Path) -> Config:
    key_file = tmp_path / "master.key"
    key_file.write_text(Fernet.generate_key().decode())
    return Config.model_validate(
        {
            "database": {"url": f"sqlite:///{tmp_path}/gw.db"},
            "security": {"master_key_file": str(key_file), "admin_token": "admin-secret-token"},
            "upstream": {"base_url": "http://127.0.0.1:9/api/v1"},
            "logging": {"access_log": False},
        }
    )


def test_an_unhandled_error_answers_500_in_the_envelope(tmp_path: Path) -> None:
    app = create_app(_config(tmp_path))

    async def boom(request):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret sk-or-v1-abcdef internals")

    app.api.router.routes.append(Route("/boom", boom))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"x-request-id": "req-test-1"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == 500 and "req-test-1" in error["message"]
    assert "sk-or" not in response.text and "internals" not in response.text
    assert response.headers["x-request-id"] == "req-test-1"


def test_unknown_route_is_404_in_the_envelope(tmp_path: Path) -> None:
    with TestClient(create_app(_config(tmp_path))) as client:
        response = client.get("/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
