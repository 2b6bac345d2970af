"""Inference: the batched latent-cache engine, sampling, streaming, MTP speculative decoding.

* ``engine.py``: :class:`~nanoseek.infer.engine.Engine` (``generate`` / ``stream`` / ``submit``), the
  preallocated MLA latent KV cache, continuous batching for the server;
* ``request.py``: ``RequestHandle``, ``Completion``, ``TokenEvent`` and the per-sample token pipeline;
* ``sampling.py``: :class:`~nanoseek.infer.sampling.SamplingParams` and the per-row seeded sampler;
* ``streaming.py`` / ``reasoning.py``: incremental detokenisation, stop strings, the ``<think>`` split;
* ``speculative.py``: MTP self-speculative decoding (draft with the MTP module, verify in the model);
* ``loading.py``: a run folder or checkpoint plus its tokenizer;
* ``generate_cli.py`` / ``chat_cli.py``: ``nanoseek generate`` / ``chat``.

Importing this package is cheap (no torch); import the submodules you need.
"""
