"""The HTTP server: an app factory, thin routes, and the error mapping."""
