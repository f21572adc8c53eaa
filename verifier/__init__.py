"""The verification service (API, persistence, spot-check workers): built on the `refute` core."""
