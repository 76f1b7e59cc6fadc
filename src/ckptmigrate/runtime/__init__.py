"""Running revision scripts against a plan."""
