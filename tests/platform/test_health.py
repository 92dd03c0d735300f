"""The health probes (`/livez`, `/readyz`) and the Prometheus `/metrics` page."""

from __future__ import annotations

import re

from broker import create_app


def test_livez_touches_nothing(client):
    response = client.get("/livez")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_reports_database(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["database"] == "ok"


def test_readyz_503_when_database_unreachable(tmp_path):
    app = create_app(
        {
            "ENV": "testing",
            "SECRET_KEY": "x",
            "INSTANCE_PATH": str(tmp_path),
            # a folder that does not exist: SQLite cannot open the file
            "DATABASE_URL": f"sqlite:///{tmp_path}/missing/dir/db.sqlite3",
        }
    )
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "unavailable",
        "reason": "database unreachable",
        "database": "unreachable",
    }


def test_metrics_is_off_without_a_token(client):
    assert client.get("/metrics").status_code == 404


def test_metrics_needs_its_token_and_reports_gauges(make_app, make_user, bearer):
    app = make_app(METRICS_TOKEN="scrape-me-0123456789")
    client = app.test_client()
    user = make_user("alice")
    created = client.post("/api/v1/uploads", json={}, headers=bearer(app, user))
    assert created.status_code == 201

    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    page = client.get("/metrics", headers={"Authorization": "Bearer scrape-me-0123456789"})
    assert page.status_code == 200
    assert page.mimetype == "text/plain"
    text = page.get_data(as_text=True)
    assert 'broker_uploads{status="pending"} 1' in text
    assert 'broker_uploads{status="ready"} 0' in text
    # the create above paid one upstream call from the shared budget
    assert re.search(r"^broker_upstream_budget_used [1-9]\d*$", text, re.M)
    assert "broker_upstream_budget_limit 1000" in text
