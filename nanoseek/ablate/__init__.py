"""``nanoseek ablate``: small-scale matched pre-training runs that test DeepSeek's claims.

``suites.py`` defines each claim and derives its matched arms, ``runner.py`` sizes the runs to a
budget and trains them through the shared loop, ``results.py`` reads the run folders back and
compares arms, ``report.py`` turns them into tables, plots and markdown, ``cli.py`` is the
subcommand. Results at this repository's scale are in ``docs/ablations.md``.
"""
