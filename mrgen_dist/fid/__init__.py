"""FID and KID per scanner (see `metrics`)."""
