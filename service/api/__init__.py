"""The REST API under ``/api/v1``: one routes module per resource."""
