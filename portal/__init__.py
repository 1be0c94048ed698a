"""The contributor portal: server-rendered pages beside the API."""
