"""Serve a partitioned model on Ray Serve: one deployment per stage behind an Open Inference Protocol entrance.

* :mod:`serve_app.tensors`: datatype names and checks of request tensors against the plan.
* :mod:`serve_app.codecs`: request/response bodies (OIP JSON and binary, ``.npy``, Arrow IPC).
* :mod:`serve_app.stage`: the per-stage deployment with dynamic batching.
* :mod:`serve_app.entrance`: the HTTP / Python-handle ingress that chains the stages.
* :mod:`serve_app.app`: the application builder and Serve config writer.
* :mod:`serve_app.local`: start a local Ray + Serve and wait for it.
"""
