"""Helper programs the guarantee tests run in their own processes."""
