"""Serving logic that needs neither HTTP nor Ray, so unit tests run it in seconds: settings,
request checks (upload decoding with limits, the slide URI allow-list), the whole-slide job
store and the job runner. The job's outputs (pyramidal OME-TIFF, GeoJSON polygons) are
``foveation.inference.outputs``, shared with batch prediction. ``serve/`` holds the thin Ray
Serve deployments over it. Nothing here has side effects at import."""
