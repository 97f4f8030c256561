"""decoder stage."""
