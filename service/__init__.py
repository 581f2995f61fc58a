"""The HTTP face of cbam-nas: REST API, dashboard and the `cbam-nas` command line."""
