"""Reading a study back from MLflow: runs -> tidy pandas frame -> figures, tables, statistics -> HTML/Markdown.

Entry point: ``python analysis/report.py`` (see its docstring). Modules: ``runs`` (store, experiments, runs and
certification rows into frames), ``tables``, ``figures``, ``stats`` (McNemar, OLS), ``render`` (HTML and
Markdown), ``report`` (the command). Nothing here writes to MLflow except the report's own artifacts.
"""
