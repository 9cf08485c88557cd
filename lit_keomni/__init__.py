"""lit-keomni."""
