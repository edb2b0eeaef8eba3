"""Partitioner: model -> graph -> costs -> plan -> shards.

Read top to bottom: ``source`` (load a model), ``capture`` (graph), ``costs`` (profile),
``planner`` (pure solver), ``stages`` (cut programs), ``artifacts`` (stage shards), ``storage`` (plan
directories through pyarrow.fs, plan.json; no torch, for the entrance),
``runtime`` (load and run a stage), ``verify``. ``build_plan`` in ``partition`` joins them.
``types`` holds the shared aliases and records (``Payload``, ``TensorSpec``); ``dtypes`` names element types
across torch, numpy, the Open Inference Protocol and Arrow (bfloat16 included); ``inputs`` draws random inputs
for tensor specs.
"""
