"""``nanoseek ablate``: small-scale matched runs that test DeepSeek's claims (pre-training, and RL algorithms).

``suites.py`` defines each claim and derives its matched arms, ``runner.py`` sizes the runs to a
budget and trains them through the shared loop (``parallel.py``: several at once, ``--jobs``), ``results.py`` reads the run folders back and
compares arms, ``report.py`` turns them into tables, plots and markdown, ``cli.py`` is the
subcommand. ``rl.py`` is the one post-training suite (GRPO variants as ``nanoseek grpo`` stage
configs, judged on held-out pass@1 paired per problem), ``rl_report.py`` its report. Results at this repository's scale are in ``docs/ablations.md``.
"""
