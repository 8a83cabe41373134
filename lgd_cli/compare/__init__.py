"""`lgd compare`: baseline and LGD trained with the same recipe, data and seeds, then compared.

stats.py holds the paired statistics, worker.py one run in a fresh process, runner.py the
runs and the output folder, report.py the tables and files, plots.py the PNGs.
"""
