"""Serving: an OpenAI-compatible HTTP API and a web chat over the inference engine.

``protocol.py`` request schemas and OpenAI error objects; ``api.py`` the FastAPI app
(``create_app``) with its limits and body-size middleware; ``static/index.html`` the web chat;
``cli.py`` the ``nanoseek serve`` subcommand. The tests' fake engine and background server are
``tests/serve_helpers.py``, outside the package.
"""
