"""ml_collections configs for muse_jax (`configs/<name>.py` files with `get_config(arg)`)."""
