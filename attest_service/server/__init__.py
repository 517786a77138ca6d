"""Running the service under gunicorn: start-up checks, the master's snapshot, the workers and their logs."""
