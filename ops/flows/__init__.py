"""Optional scheduler flows around the serving modes (their schedulers are not dependencies)."""
