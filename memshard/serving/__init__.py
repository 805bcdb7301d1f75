"""The served checkpoint behind an HTTP endpoint (Ray Serve)."""
