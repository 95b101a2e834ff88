"""The Ray Serve application: ``serve run serve.app:build_app checkpoint=...`` or
``serve deploy serve/serve.yaml``. The deployments are thin; the logic is in
``foveation.serving``."""
