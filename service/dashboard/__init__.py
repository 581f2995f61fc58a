"""The dashboard: server-rendered page shells (Jinja2) whose small scripts read the API.

Pages hold no data, so they need no token; their scripts call ``/api/v1`` with the token the
user entered once (kept in the browser session). Charts are plotly.js from the installed
``plotly`` package: nothing is fetched from the internet.
"""
