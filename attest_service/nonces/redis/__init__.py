"""The Redis nonce store: standalone, behind Sentinel, or a Redis Cluster."""
