"""Studies: what a ``ddpt`` command runs, without Ray (the backends are handed in,
:mod:`pipeline.studies.backends`): the comparison harness, the main job, comparing trained
prompt models, execution-based evaluation, experiments (specs, runs, tables), sweep specs,
charts, the HTML report and interpretability."""
