"""``nanoseek estimate``: the arithmetic of a DeepSeek-scale run, for any config.

* :mod:`.attention`: the layer-kind registry (dense MLA, V3.2's MLA + lightning indexer, MHA):
  attention FLOPs per token at a context, KV-cache bytes and what a decode step reads.
* :mod:`.flops`: model FLOPs per token (``flops_per_token``, used by the training loop for MFU)
  and the ``EstimateError`` every section raises; the floor the other sections import.
* :mod:`.estimate`: parameters, GPU-hours, cost and the implied MFU; :func:`.estimate.estimate`
  runs every section.
* :mod:`.memory`: training memory per GPU for a dp / ep / pp / ZeRO-FSDP layout, a pipeline
  schedule and a recompute mode (:func:`.memory.estimate_for_layout`).
* :mod:`.activations`: the bytes per token a layer keeps for its backward, by tensor kind, per
  recompute mode, precision and kernel set (:func:`.activations.activation_breakdown`); the
  estimate's and the training loop's fit check's, held to nanoseek's measured bytes.
* :mod:`.pipeline`: the pipeline schedules by name (1F1B, GPipe, interleaved 1F1B, ZBV, DualPipeV,
  DualPipe): stage placement, activations in flight, bubble.
* :mod:`.search`: ``--layouts``, every layout of a GPU count that fits, fastest first.
* :mod:`.inference`: KV cache (MLA vs MHA / GQA / MQA) and a decode-speed upper bound, and the
  per-token attention cost at each of several context lengths.
* :mod:`.comm`: expert-parallel all-to-all bytes and time against compute.
* :mod:`.gpus`: the accelerator table (A100, H100, H800, H20, H200, B200) and ``--gpu-spec``.
* :mod:`.cli` / :mod:`.report`: the subcommand and its rich tables.

Nothing is imported here, so ``nanoseek --help`` stays fast.
"""
