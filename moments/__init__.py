"""Moments: find when things happen in long videos.

This package holds what the front end (``service``) and the workers (``workers``) share: settings,
Redis key names, job and result records, the generated API code and the CLI/client.
"""
