"""`lgd compare`: baseline and LGD trained with the same recipe, data and seeds, then compared.

experiment.py runs the whole comparison; runner.py holds its settings, folder guard and worker
processes, worker.py one run in a fresh process, stats.py the paired statistics, report.py the
tables and files, plots.py the PNGs.
"""
