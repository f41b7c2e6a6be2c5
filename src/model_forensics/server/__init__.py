"""The inspection console: a FastAPI server with a JSON API over a directory of bundles,
analyses and inspections, and the built React dashboard (``static/``).

``data`` and ``responses`` compute and describe what is shown (no FastAPI needed: the
offline report uses them too); ``app`` is the server (``create_app``, ``serve``); ``jobs``
runs analyses in the background; ``worker`` runs replays (influence, interventions) in a
child process; ``security`` holds the path, token and request checks.
"""
