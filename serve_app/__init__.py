"""Serve a partitioned model on Ray Serve: one deployment per stage behind an Open Inference Protocol entrance.

* :mod:`serve_app.tensors`: checks of request tensors against the plan (datatypes: :mod:`partitions.dtypes`).
* :mod:`serve_app.codecs`: request/response bodies (OIP JSON and binary, ``.npy``, Arrow IPC).
* :mod:`serve_app.stage`: the per-stage deployment with dynamic batching.
* :mod:`serve_app.entrance`: the HTTP / Python-handle ingress that chains the stages.
* :mod:`serve_app.app`: the application builder and Serve config writer.
* :mod:`serve_app.config`: the typed, validated configs the entrance and each stage replica are built with.
* :mod:`serve_app.serve_types`: Serve's decorated classes and batch methods as the type checker should see them.
* :mod:`cluster.local`: start a local Ray + Serve and wait for it.
* :mod:`serve_app.batching`: payload batches sized in samples (concat, split, run together).
* :mod:`serve_app.cache`: the entrance's opt-in result cache.
* :mod:`serve_app.retry`: retries when a stage replica dies; 503 with ``Retry-After`` when it cannot answer.
* :mod:`serve_app.auth`: optional bearer-token auth on the HTTP entrance.
* :mod:`serve_app.metrics`: per-stage Prometheus metrics (latency, batch sizes, queue, busy time).
* :mod:`serve_app.loadgen`, :mod:`serve_app.baselines`, :mod:`serve_app.bench`: ``partserve bench``.
* :mod:`serve_app.ports`: a free local port for a Serve proxy (bench, benchmarks, tests).
* :mod:`serve_app.stop_signals`: SIGINT and SIGTERM stop a long-running command through its clean-up.
"""
