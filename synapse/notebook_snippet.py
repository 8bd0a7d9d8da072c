# Synapse (or Fabric) PySpark notebook: embed a Delta table with sparkembed.
#
# The pool needs the sparkembed wheel (a workspace package assigned to the pool). The API key
# is read once, on the driver, from Azure Key Vault: through the linked service below the
# workspace managed identity reads the vault (grant it "Get" on secrets); drop
# `linked_service` to read it with your own identity instead. The key reaches the executors
# inside the job's closure and never enters Spark conf, which the Spark UI and the event log
# show to anyone who can read them.

# %%
from pyspark.sql import SparkSession

from sparkembed import write
from sparkembed.config import validate_config
from sparkembed.spark.secrets import apply_secret

spark = SparkSession.builder.getOrCreate()  # the notebook's own session

CONFIG = {
    "endpoint": {
        "url": "https://my-resource.openai.azure.com/openai/v1",
        "model": "text-embedding-3-small",
    },
    "auth": {
        "mode": "key",
        "key_source": "keyvault",
        "key_vault_url": "https://my-keyvault.vault.azure.net/",
        "secret_name": "azure-inference-key",
        "linked_service": "ls_keyvault",
    },
    "limits": {"tokens_per_minute": 350000, "requests_per_minute": 2100},
}
SOURCE = "abfss://lake@mydatalake.dfs.core.windows.net/silver/documents"
TARGET = "abfss://lake@mydatalake.dfs.core.windows.net/gold/document_vectors"

# %%
config = apply_secret(validate_config(CONFIG), spark=spark)
documents = spark.read.format("delta").load(SOURCE)
summary = write(documents, TARGET, id_col="id", text_col="text", passthrough=("title",), config=config)
print(summary.to_json())  # rows ok / skipped / failed, tokens, estimated cost
