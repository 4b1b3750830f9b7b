"""The operator dashboard, served by the producer at ``/dashboard`` (see README "Operations")."""

from __future__ import annotations

from fastapi import FastAPI

from producer.dashboard import views


def mount(app: FastAPI) -> None:
    """Add the dashboard's routes to the producer app."""
    get, post = ["GET"], ["POST"]
    routes = [
        ("/dashboard", views.protected(views.overview), get),
        ("/dashboard/fragment/overview", views.protected(views.overview_fragment), get),
        ("/dashboard/login", views.login_form, get),
        ("/dashboard/login", views.login, post),
        ("/dashboard/logout", views.logout, post),
        ("/dashboard/static/{name}", views.static, get),
        ("/dashboard/workers", views.protected(views.workers), get),
        ("/dashboard/account", views.protected(views.account), get),
        ("/dashboard/serial", views.protected(views.serial), get),
        ("/dashboard/event", views.protected(views.event), get),
        ("/dashboard/dlq", views.protected(views.dlq_list), get),
        ("/dashboard/dlq/entry", views.protected(views.dlq_entry), get),
        ("/dashboard/dlq/replay", views.protected(views.dlq_replay_one), post),
        ("/dashboard/dlq/bulk", views.protected(views.dlq_bulk), post),
    ]
    for path, endpoint, methods in routes:
        app.add_route(path, endpoint, methods=methods, include_in_schema=False)
