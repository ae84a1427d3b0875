"""``redrafter-serve``: an OpenAI-compatible HTTP server over the in-flight scheduler.

:mod:`.app` holds the routes (it needs the 'serve' extra: fastapi, uvicorn, prometheus-client),
:mod:`.state` loads an engine for them, :mod:`.schema` and :mod:`.metrics` the request schema and
the Prometheus metrics."""
