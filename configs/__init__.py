"""Config files: each has `get_config()` returning an ml_collections.ConfigDict."""
