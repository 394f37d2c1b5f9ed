"""jobbridge's REST API: ScientistCloud's upload API (chunked, resumable uploads with SHA-256).

``jobbridge api`` serves it (:mod:`jobbridge.api.server`); :func:`jobbridge.api.app.create_app` builds
the FastAPI app. Nothing is imported here, so that ``import jobbridge.api.<module>`` stays cheap.
"""
