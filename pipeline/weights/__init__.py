"""weights stage."""
