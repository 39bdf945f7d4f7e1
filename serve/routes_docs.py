"""`GET /openapi.json` (the OpenAPI 3.1 document, built once per worker) and `GET /docs` (Swagger UI rendering it).

Swagger UI's files come from the flask-swagger-ui package and are served from here: SageMaker hosts (and many
private networks) have no internet, so the page loads nothing from a CDN.
"""

from __future__ import annotations

import importlib.resources
from functools import cache

from flask import Blueprint, Response, send_from_directory

from serve.context import current_state, json_response
from serve.errors import ApiError, ErrorKind
from serve.openapi import build_openapi
from serve.settings import Settings

blueprint = Blueprint("docs", __name__)

_ASSETS = str(importlib.resources.files("flask_swagger_ui") / "dist")
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>SageMaker LLM container API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.onload = () => {
      window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
    };
  </script>
</body>
</html>
"""


@cache
def _document(settings: Settings) -> dict:
    return build_openapi(settings)


@blueprint.get("/openapi.json")
def openapi_document() -> Response:
    return json_response(_document(current_state().settings))


@blueprint.get("/docs")
def docs_page() -> Response:
    return Response(_PAGE, content_type="text/html; charset=utf-8")


@blueprint.get("/docs/<path:asset>")
def docs_asset(asset: str) -> Response:
    if asset not in ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"):
        raise ApiError(ErrorKind.NOT_FOUND, f"No route GET /docs/{asset}")
    return send_from_directory(_ASSETS, asset, max_age=86400)
