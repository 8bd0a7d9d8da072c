"""Nothing here is a pytest test: ``run_spark35.py`` runs under scripts/compat_spark35.sh, half of it
inside a pyspark 3.5 venv, so the main test run must not collect or import it."""

collect_ignore_glob = ["*"]
