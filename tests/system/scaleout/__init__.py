"""Scale-out tests: several service instances sharing one Redis or one Redis Cluster."""
