"""Step 1 of the layout change (moves only)."""
