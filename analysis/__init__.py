"""Reading a study back from MLflow: runs -> tidy pandas frame -> figures, tables, statistics -> HTML/Markdown.

Entry point: ``python analysis/report.py`` (see its docstring). Modules: ``store`` (opening the tracking store
safely), ``runs`` (experiments, runs and certification rows into frames; what each run is), ``arms`` (the arms of
a paper's study or a search's confirmation: seed-averaged accuracy with image-level intervals, epochs, budget),
``studies`` (each such study's section: table, figure, paired tests), ``tables``, ``figures``, ``stats`` (paired
tests on the test images, Holm, ``paired_radii``), ``objective`` (OLS regression and Optuna's importance of the
search), ``timing`` (where a study's time went), ``render`` (HTML and Markdown), ``report`` (the command).
Nothing here writes to MLflow except the report's own artifacts.
"""
