"""Who may call the service and how often: keys, allow-lists, where a request came from and rate budgets."""
