"""The gRPC front end: uploads, validation, auth, health, job submission. Never imports torch."""
