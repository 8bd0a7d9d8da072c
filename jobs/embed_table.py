"""spark-submit entry point; takes the same arguments as ``sparkembed run``.

spark-submit jobs/embed_table.py --config conf/local.yaml --source data/sample.parquet --target out/t
"""

import sys

from sparkembed.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command(sys.argv[1:], prog="embed_table.py", local_master=False))
