"""The operations revision scripts call; they record steps into a plan."""
